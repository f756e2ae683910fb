"""Damaged store files are never served: a one-line error naming the file and the fix, and
``check`` finds them; ``check --repair`` makes derived files again."""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest
from typer.testing import CliRunner

from specsearch.cli.app import app
from specsearch.files import file_sha256
from tests.reliability.harness import cli, damage

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, code=None):
    assert result.exit_code != 0, result.output
    if code is not None:
        assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


COUNT = "SELECT count(*) AS n, round(sum(teff), 3) AS s FROM shards"


def shard_of(store, release="DR1"):
    return sorted((store / "shards" / f"release={release}").glob("part-*.parquet"))[0]


def test_random_bytes_inside_a_shard_are_an_error_everywhere(store, probe_id):
    shard = shard_of(store)
    with open(shard, "r+b") as f:  # 64 KB of random bytes in the middle of the data
        f.seek(shard.stat().st_size // 2)
        f.write(os.urandom(65536))
    for args in (
        ["sql", "--store", store, "SELECT count(*) FROM shards"],
        ["sql", "--store", store, "SELECT count(*) FROM shards_history"],
        ["show", "--store", store, "--source-id", probe_id],
        ["embed", "--store", store],
    ):
        line = one_line_error(run(*args), code=1)
        assert str(shard) in line and "--replace" in line, line
    result = run("check", "--store", store)
    assert result.exit_code == 1
    assert f"damaged shards: {shard}" in result.stdout
    assert "specsearch ingest SOURCE" in result.stdout or "specsearch ingest" in result.stdout


def test_a_shard_replaced_by_another_valid_shard_is_not_served(store):
    target, other = shard_of(store, "DR1"), shard_of(store, "DR2")
    shutil.copy(other, target)  # a valid Parquet shard, but not the one ingested
    line = one_line_error(run("sql", "--store", store, "SELECT count(*) FROM shards"), code=1)
    assert str(target) in line


@pytest.mark.parametrize("how", ["truncate", "flip", "garbage"])
def test_a_damaged_embedding_file_is_an_error_and_repair_remakes_it(store, probe_id, how):
    expected = run("sql", "--store", store, "SELECT * FROM embeddings ORDER BY source_id, modality")
    assert expected.exit_code == 0
    path = sorted((store / "embeddings" / "release=DR1" / "modality=xp").glob("*.parquet"))[0]
    damage(path, how, random.Random(3))
    for args in (
        ["sql", "--store", store, "SELECT count(*) FROM embeddings"],
        ["search", "--store", store, "--source-id", probe_id, "--modality", "xp"],
    ):
        line = one_line_error(run(*args), code=1)
        assert str(path) in line or "stale" in line, line
    check = run("check", "--store", store)
    assert check.exit_code == 1 and str(path) in check.stdout
    repaired = run("check", "--store", store, "--repair")
    assert repaired.exit_code == 0, repaired.output
    assert f"embedded again: {path}" in repaired.stdout
    again = run("sql", "--store", store, "SELECT * FROM embeddings ORDER BY source_id, modality")
    assert again.stdout == expected.stdout
    assert run("check", "--store", store).exit_code == 0


def test_damaged_scores_and_calibration_are_made_again(store):
    query = "SELECT source_id, round(score, 3) AS s FROM scores ORDER BY source_id"
    expected = run("sql", "--store", store, query, "--format", "csv").stdout
    scores = store / "scores" / "release=DR2" / "scores.parquet"
    damage(scores, "flip", random.Random(1))
    one_line_error(run("sql", "--store", store, query), code=1)
    calibration = store / "scores" / "reference" / "calibration.safetensors"
    damage(calibration, "truncate", random.Random(2))
    check = run("check", "--store", store)
    assert check.exit_code == 1
    assert str(scores) in check.stdout and str(calibration) in check.stdout
    repaired = run("check", "--store", store, "--repair")
    assert repaired.exit_code == 0, repaired.output
    assert run("sql", "--store", store, query, "--format", "csv").stdout == expected


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"\x93\xff\x00 random", "not JSON"),
        (b"[1, 2, 3]", "a list, not an object"),
        (b'{"format": 1}', "no 'releases'"),
        (b'{"format": 1, "releases": {"DR1": 3}}', "release 'DR1' lists no files"),
        (b'{"format": 7, "releases": {}}', "store format 7"),
    ],
)
def test_a_corrupt_manifest_is_one_line_and_exit_1(store, content, why):
    (store / "manifest.json").write_bytes(content)
    for args in (
        ["sql", "--store", store, "SELECT count(*) FROM shards"],
        ["release", "list", "--store", store],
        ["embed", "--store", store],
        ["ingest", store / "shards" / "release=DR2", "--store", store, "--release", "DR3"],
    ):
        line = one_line_error(run(*args), code=1)
        assert f"corrupt manifest ({why}" in line and "check --store" in line, line


def test_a_lost_manifest_is_rebuilt_and_nothing_leaves_the_store(store, probe_id):
    query = (
        "SELECT release, count(*) AS n, round(sum(teff), 2) AS t FROM shards GROUP BY 1 ORDER BY 1"
    )
    expected = run("sql", "--store", store, query, "--format", "csv").stdout
    scores_query = "SELECT source_id, round(score, 4) AS s FROM scores ORDER BY 1"
    expected_scores = run("sql", "--store", store, scores_query, "--format", "csv").stdout
    (store / "manifest.json").unlink()
    # an ingest no longer starts a fresh manifest (DR1 would silently leave the store)
    line = one_line_error(
        run("ingest", store / "shards" / "release=DR2", "--store", store, "--release", "DR3"),
        code=1,
    )
    assert "manifest is missing" in line and "--repair" in line
    assert run("check", "--store", store).exit_code == 1
    repaired = run("check", "--store", store, "--repair")
    assert repaired.exit_code == 0, repaired.output
    assert "manifest rebuilt from the files (2 releases)" in repaired.stdout
    assert run("sql", "--store", store, query, "--format", "csv").stdout == expected
    assert run("sql", "--store", store, scores_query, "--format", "csv").stdout == expected_scores
    assert run("search", "--store", store, "--source-id", probe_id).exit_code == 0


def test_check_lists_orphans_and_repair_removes_them(store):
    orphan = store / "embeddings" / "release=DR1" / "modality=lrs" / "part-99999-r00000000.parquet"
    shutil.copy(next(orphan.parent.glob("*.parquet")), orphan)
    stray = store / "indexes" / "xp.faiss.1234.tmp"
    stray.write_bytes(b"half an index")
    check = run("check", "--store", store)
    assert check.exit_code == 1
    assert f"orphan embeddings: {orphan}" in check.stdout and str(stray) in check.stdout
    assert run("check", "--store", store, "--repair").exit_code == 0
    assert not orphan.exists() and not stray.exists()


def test_a_file_touched_or_copied_with_the_same_content_is_still_trusted(store):
    shard = shard_of(store)
    os.utime(shard, ns=(1, 1))  # e.g. a copy without -p, or a backup restore
    result = run("sql", "--store", store, COUNT, "--format", "csv")
    assert result.exit_code == 0, result.output


def test_check_of_an_intact_store_verifies_every_file(store):
    result = run("check", "--store", store)
    assert result.exit_code == 0, result.output
    manifest = json.loads((store / "manifest.json").read_text())
    n_files = sum(len(e["files"]) + 1 for e in manifest["releases"].values())
    assert f"{n_files}" not in ("0",)
    listed = int(result.stdout.split("files verified")[0].split()[-1])
    assert listed >= n_files + 4  # shards and rejects, embeddings, scores, indexes, calibration
    assert "all intact" in result.stdout
    assert file_sha256(store / "manifest.json")  # untouched and readable


def test_an_index_of_the_other_modality_copied_over_is_not_served(store, probe_id):
    shutil.copy(store / "indexes" / "lrs.faiss", store / "indexes" / "xp.faiss")
    result = run("search", "--store", store, "--source-id", probe_id, "--modality", "xp")
    line = one_line_error(result, code=1)
    assert "xp.faiss" in line and "index build" in line, line


def test_bit_rot_inside_an_index_is_refused_even_with_its_time_kept(store, probe_id):
    """Damage that keeps a file's size and time is not re-hashed on every read (``check`` finds
    it): a search still refuses vectors whose similarities no unit vectors can have."""
    query = ["search", "--store", store, "--source-id", probe_id, "--modality", "xp", "-k", "50"]
    clean = run(*query, "--format", "csv")
    assert clean.exit_code == 0
    path = store / "indexes" / "xp.faiss"
    stat = path.stat()
    rng = random.Random(5)
    with open(path, "r+b") as f:
        f.seek(stat.st_size // 3)
        f.write(rng.randbytes(stat.st_size // 3))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    # a fresh process, as a user's (this one holds the index it loaded before the damage)
    result = cli("search", "--store", str(store), "--source-id", str(probe_id), "--modality", "xp")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "xp.faiss" in line and "index build" in line, line
    check = run("check", "--store", store)
    assert check.exit_code == 1 and f"damaged index: {path}" in check.stdout
    assert run("check", "--store", store, "--repair").exit_code == 0
    again = run(*query, "--format", "csv")
    assert again.exit_code == 0 and again.stdout == clean.stdout
