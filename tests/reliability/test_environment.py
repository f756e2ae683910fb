"""The environment fails: a full disk, a refused write, impossible values in the input, a killed
run's leftovers, worker processes of a killed parent. One line, exit 1 for the environment (2 for
bad input), and the store as it was."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from specsearch.cli.app import app
from specsearch.files import file_sha256
from specsearch.schema import SHARD_SCHEMA, column_matrix, fixed_list
from specsearch.store import Store
from tests.reliability.harness import CLI, REPO, _group_members, cli, fill, source_release, tmpfs

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def snapshot(store):
    return {p: file_sha256(p) for p in store.rglob("*") if p.is_file() and p.name != ".lock"}


def one_line(result_stderr: str) -> str:
    lines = result_stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result_stderr
    assert "Traceback" not in result_stderr
    return lines[0]


# ------------------------------------------------------------------ a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 40 MB tmpfs (needs root and permission to mount; else the test is skipped and the
    injected-ENOSPC test below covers the same paths)."""
    with tmpfs(tmp_path / "disk", 40) as mount:
        if mount is None:
            pytest.skip("cannot mount a tmpfs here")
        yield mount


def test_disk_full_in_every_writing_stage_leaves_the_store_as_it_was(small_disk, tmp_path):
    store = small_disk / "store"
    small = source_release(tmp_path / "small", 0, 200)
    for command in (["ingest", str(small), "--release", "DR1"], ["embed"], ["index", "build"]):
        assert cli(*command, "--store", str(store)).returncode == 0
    new = source_release(tmp_path / "new", 200, 600)
    stages = [
        (["ingest", str(new), "--release", "DR2"], 1 << 20),  # runs out while spilling or writing
        (["embed"], 64 << 10),
        (["index", "build"], 64 << 10),
        (["score", "--release", "DR2"], 64 << 10),
    ]
    previous: list[str] = []
    for command, leave in stages:
        if previous:  # the next stage needs the one before it done
            (small_disk / "filler").unlink(missing_ok=True)
            assert cli(*previous, "--store", str(store)).returncode == 0
        fill(small_disk, leave)
        before = snapshot(store)
        result = cli(*command, "--store", str(store))
        assert result.returncode == 1, (command, result.stdout, result.stderr)
        line = one_line(result.stderr)
        assert "no space left on the device" in line and "store is as it was" in line, line
        assert snapshot(store) == before, command
        assert not (store / ".scratch").exists() or not any((store / ".scratch").iterdir())
        previous = command
    (small_disk / "filler").unlink()
    for command in (["score", "--release", "DR2"], ["check"]):
        result = cli(*command, "--store", str(store))
        assert result.returncode == 0, (command, result.stdout, result.stderr)


def test_injected_enospc_and_eacces_are_one_line_exit_1(store, monkeypatch, tmp_path):
    """Where no tmpfs can be mounted: the rename that commits a file fails as a full disk would."""
    import specsearch.files as files

    source = source_release(tmp_path / "src", 0, 100)  # re-observed stars
    assert run("ingest", source, "--store", store, "--release", "DR3").exit_code == 0

    real = os.replace

    for code, words in ((errno.ENOSPC, "no space left"), (errno.EACCES, "permission denied")):

        def refuse(src, dst, code=code):
            if str(dst).endswith(".parquet"):
                raise OSError(code, os.strerror(code), str(dst))
            return real(src, dst)

        monkeypatch.setattr(files.os, "replace", refuse)
        before = snapshot(store)
        result = run("embed", "--store", store)
        monkeypatch.setattr(files.os, "replace", real)
        assert result.exit_code == 1, result.output
        assert words in one_line(result.stderr)
        assert snapshot(store) == before


# ------------------------------------------------------------------ impossible values


def test_impossible_values_go_to_rejects_and_never_become_vectors(tmp_path):
    table = pq.read_table(source_release(tmp_path / "src", 0, 60) / "part.parquet")
    table = table.select([c for c in table.column_names if c in SHARD_SCHEMA.names])
    flux = column_matrix(table, "lrs_flux")
    flux[0, :] = 3e38  # every pixel beyond any plausible normalised flux
    flux[1, :5] = 1e9  # a few pixels: masked, the spectrum kept
    teff = table.column("teff").to_numpy(zero_copy_only=False).copy()
    teff[2] = -1e30
    xp = column_matrix(table, "xp_flux")
    xp[3, 10] = 3e38
    table = table.set_column(
        table.schema.get_field_index("lrs_flux"), "lrs_flux", fixed_list(flux, 1462, 60)
    )
    table = table.set_column(table.schema.get_field_index("teff"), "teff", pa.array(teff))
    table = table.set_column(
        table.schema.get_field_index("xp_flux"), "xp_flux", fixed_list(xp, 343, 60)
    )
    pq.write_table(table, tmp_path / "bad.parquet")
    store = tmp_path / "store"
    result = run("ingest", tmp_path / "bad.parquet", "--store", store, "--release", "DR1")
    assert result.exit_code == 0, result.output
    assert "60 stars (59 LRS, 59 XP, 58 both)" in result.stdout and "4 rejected" in result.stdout
    st = Store(store)
    reasons = dict(
        zip(
            st.rejects().column("source_id").to_pylist(),
            st.rejects().column("reason").to_pylist(),
            strict=True,
        )
    )
    ids = table.column("source_id").to_pylist()
    assert "1462 pixels beyond any plausible flux" in reasons[ids[0]]
    assert "(LRS dropped, row kept)" in reasons[ids[0]]
    assert "5 pixels beyond any plausible flux" in reasons[ids[1]]
    assert "teff -1e+30" in reasons[ids[2]] and "label dropped" in reasons[ids[2]]
    assert "(XP dropped, row kept)" in reasons[ids[3]]
    rows = st.read_shards(columns=["source_id", "teff", "lrs_flux", "xp_flux"])
    by_id = {s: i for i, s in enumerate(rows.column("source_id").to_pylist())}
    assert rows.column("teff")[by_id[ids[2]]].as_py() is None
    assert rows.column("lrs_flux")[by_id[ids[0]]].as_py() is None
    assert np.nanmax(np.abs(column_matrix(rows, "lrs_flux"))) < 1e4
    assert run("embed", "--store", store).exit_code == 0
    for modality in ("lrs", "xp"):
        vectors = np.stack(
            st.embeddings(modality).column("embedding").to_numpy(zero_copy_only=False)
        )
        assert np.isfinite(vectors.astype(np.float32)).all()
    assert run("index", "build", "--store", store).exit_code == 0


# ------------------------------------------------------------------ leftovers and workers


def test_a_killed_ingest_leaves_nothing_after_the_next_run(tmp_path):
    source = source_release(tmp_path / "src", 0, 2000)
    store = tmp_path / "store"
    assert cli("ingest", str(source), "--store", str(store), "--release", "DR0").returncode == 0
    scratch = store / ".scratch" / "ingest+DR1+killed"
    scratch.mkdir(parents=True)
    (scratch / "run-00000.parquet").write_bytes(b"\0" * 1_000_000)
    staging = store / "shards" / "release=DR0" / ".staging-killed"
    staging.mkdir()
    (staging / "part-00000.parquet").write_bytes(b"x")
    (store / "indexes" / ".xp.faiss.tmp").write_bytes(b"half")
    result = cli("ingest", str(source), "--store", str(store), "--release", "DR1")
    assert result.returncode == 0, result.stderr
    assert not scratch.exists() and not staging.exists()
    assert not (store / "indexes" / ".xp.faiss.tmp").exists()


def test_worker_processes_die_with_their_parent(tmp_path):
    sources = tmp_path / "src"
    for i in range(6):
        source_release(sources, i * 300, 300, name=f"xp{i}.parquet")
    process = subprocess.Popen(
        [*CLI, "ingest", str(sources), "--store", str(tmp_path / "s"), "--release", "DR1",
         "--workers", "2"],
        cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 60
    while time.time() < deadline and len(_group_members(process.pid)) < 2:
        time.sleep(0.05)
    members = _group_members(process.pid)
    process.send_signal(signal.SIGKILL)
    process.wait()
    time.sleep(2)
    alive = _group_members(process.pid)
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert alive == [], f"workers outlived their parent (group had {len(members)} processes)"
