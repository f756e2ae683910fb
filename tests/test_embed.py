"""The embed stage and similarity search on a small store with a tiny (untrained) model."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from specsearch.cli.app import app
from specsearch.errors import SpecsearchError
from specsearch.files import write_parquet_atomic
from specsearch.pipeline.embed import embed_store, plan_chunks
from specsearch.pipeline.ingest import ingest
from specsearch.query.search import search
from specsearch.store import Store

from .conftest import N_STARS, synthetic_shard


@pytest.fixture()
def store(tmp_path):
    src = tmp_path / "src"
    write_parquet_atomic(synthetic_shard(N_STARS, 0, "DR1"), src / "part-00000.parquet")
    ingest(src, tmp_path / "store", "DR1", show_progress=False)
    return tmp_path / "store"


def _embedding_tables(store):
    st = Store(store, create=False)
    out = {}
    for path in sorted((st.root / "embeddings").rglob("part-*.parquet")):
        out[str(path.relative_to(st.root))] = pq.read_table(path)
    return out


def test_embed_writes_one_row_per_present_spectrum(store, tiny_model):
    summary = embed_store(store, model=str(tiny_model), show_progress=False, chunk_rows=128)
    assert (summary.lrs, summary.xp, summary.chunks) == (270, 300, 3)
    assert "270 LRS and 300 XP" in str(summary)
    lrs = Store(store).embeddings("lrs")
    xp = Store(store).embeddings("xp")
    assert lrs.num_rows == 270 and xp.num_rows == 300
    vectors = np.asarray(
        xp.column("embedding").combine_chunks().flatten().to_numpy(), dtype=np.float32
    )
    norms = np.linalg.norm(vectors.reshape(300, -1), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=2e-3)  # float16 on disk
    # stars with both spectra carry cross chi^2 and align_cos; LRS-less stars do not
    assert xp.column("cross_chi2").null_count == 30 and xp.column("align_cos").null_count == 30
    assert np.all(np.asarray(xp.column("recon_chi2").to_numpy()) > 0)
    assert set(xp.column("model_id").to_pylist()) == {"tiny-test-model"}


def test_second_embed_adds_nothing(store, tiny_model):
    embed_store(store, model=str(tiny_model), show_progress=False, chunk_rows=128)
    before = {
        k: (v, (Store(store).root / k).stat().st_mtime_ns)
        for k, v in _embedding_tables(store).items()
    }
    summary = embed_store(store, model=str(tiny_model), show_progress=False, chunk_rows=128)
    assert summary.chunks == 0 and summary.already_done == 3
    assert str(summary).startswith("embed: nothing to do (3 chunks")
    after = _embedding_tables(store)
    assert set(after) == set(before)
    assert all((Store(store).root / k).stat().st_mtime_ns == before[k][1] for k in after)


def test_killed_run_resumes_to_the_same_files(tmp_path, store, tiny_model):
    clean = tmp_path / "clean"
    shutil.copytree(store, clean)
    embed_store(clean, model=str(tiny_model), show_progress=False, chunk_rows=128)
    # a run that died after one chunk, plus a stray temporary file from the interrupted write
    embed_store(store, model=str(tiny_model), show_progress=False, chunk_rows=128, max_chunks=1)
    assert len(_embedding_tables(store)) == 2
    embed_store(store, model=str(tiny_model), show_progress=False, chunk_rows=128)
    resumed, reference = _embedding_tables(store), _embedding_tables(clean)
    assert set(resumed) == set(reference) and len(resumed) == 6
    for name, table in reference.items():
        assert resumed[name].equals(table), name


def test_new_release_embeds_only_new_rows(tmp_path, store, tiny_model):
    embed_store(store, model=str(tiny_model), show_progress=False, chunk_rows=128)
    src2 = tmp_path / "src2"
    write_parquet_atomic(
        synthetic_shard(50, 1, "DR2", first_id=10_000), src2 / "part-00000.parquet"
    )
    ingest(src2, store, "DR2", show_progress=False)
    summary = embed_store(store, model=str(tiny_model), show_progress=False, chunk_rows=128)
    assert (summary.lrs, summary.xp, summary.already_done) == (45, 50, 3)
    assert "45 LRS and 50 XP" in str(summary) and "(3 already done)" in str(summary)
    assert len(plan_chunks(Store(store), chunk_rows=128)) == 4


@pytest.mark.slow
def test_ray_engine_writes_the_same_rows(tmp_path, store, tiny_model):
    pytest.importorskip("ray")
    other = tmp_path / "ray"
    shutil.copytree(store, other)
    embed_store(store, model=str(tiny_model), show_progress=False, chunk_rows=128)
    embed_store(
        other,
        model=str(tiny_model),
        engine="ray",
        device="cpu",
        show_progress=False,
        chunk_rows=128,
    )
    local, remote = _embedding_tables(store), _embedding_tables(other)
    assert set(local) == set(remote)
    for name, table in local.items():
        assert table.column("source_id").equals(remote[name].column("source_id"))
        a = np.asarray(table.column("embedding").combine_chunks().flatten(), dtype=np.float32)
        b = np.asarray(
            remote[name].column("embedding").combine_chunks().flatten(), dtype=np.float32
        )
        np.testing.assert_allclose(a, b, atol=1e-5)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_ray_engine_on_an_existing_cluster_spreads_chunks_over_actors(tmp_path, store, tiny_model):
    """A Ray cluster started apart from specsearch (`ray start --head`, 4 CPU slots: 2 actors of
    2 CPUs); `embed --engine ray --ray-address` joins it and writes the local engine's rows.
    The head is started as a user would: with token authentication on if this machine already
    holds a Ray token (an earlier local Ray wrote one), off otherwise."""
    pytest.importorskip("ray")
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    ray_cli = Path(sys.executable).with_name("ray")
    temp = tempfile.mkdtemp(prefix="/tmp/ray-")  # Ray's socket paths must stay short
    port = _free_port()
    env = {**__import__("os").environ, "RAY_USAGE_STATS_ENABLED": "0"}
    start = subprocess.run(
        [
            str(ray_cli),
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=4",
            "--num-gpus=0",
            "--include-dashboard=false",
            f"--temp-dir={temp}",
            "--disable-usage-stats",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert start.returncode == 0, start.stderr[-2000:]
    try:
        other = tmp_path / "cluster"
        shutil.copytree(store, other)
        local = embed_store(store, model=str(tiny_model), show_progress=False, chunk_rows=64)
        remote = embed_store(
            other,
            model=str(tiny_model),
            engine="ray",
            device="cpu",
            ray_address=f"127.0.0.1:{port}",
            show_progress=False,
            chunk_rows=64,
        )
        assert remote.chunks == local.chunks == 5  # 300 stars in chunks of 64
        assert (remote.lrs, remote.xp) == (local.lrs, local.xp)
        assert remote.workers == 2 and "by 2 Ray actors" in str(remote)
        tables_local, tables_remote = _embedding_tables(store), _embedding_tables(other)
        assert set(tables_local) == set(tables_remote)
        for name, table in tables_local.items():
            assert table.column("source_id").equals(tables_remote[name].column("source_id"))
            a = table.column("embedding").combine_chunks().flatten().to_numpy()
            b = tables_remote[name].column("embedding").combine_chunks().flatten().to_numpy()
            np.testing.assert_allclose(a, b, atol=1e-5)
        # the CLI passes the address through: a second run finds every chunk done
        again = CliRunner().invoke(
            app,
            [
                "embed",
                "--store",
                str(other),
                "--model",
                str(tiny_model),
                "--engine",
                "ray",
                "--ray-address",
                f"127.0.0.1:{port}",
            ],
        )
        assert again.exit_code == 0, again.output
        assert again.output.startswith("embed: nothing to do")
    finally:
        subprocess.run([str(ray_cli), "stop", "--force"], capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_engine_with_nothing_at_the_address_is_one_line_in_seconds(store, tiny_model):
    pytest.importorskip("ray")
    import time

    address = f"127.0.0.1:{_free_port()}"  # nothing listens there
    t0 = time.perf_counter()
    result = CliRunner().invoke(
        app,
        ["embed", "--store", str(store), "--model", str(tiny_model), "--engine", "ray"]
        + ["--ray-address", address],
    )
    assert time.perf_counter() - t0 < 30  # Ray alone retries for minutes
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: cannot join the Ray cluster at {address}: nothing answers there "
        "(Connection refused); start it with `ray start --head` or check the address"
    ]


@pytest.fixture()
def indexed_store(store, tiny_model):
    from specsearch.indexes import build_store_indexes

    embed_store(store, model=str(tiny_model), show_progress=False, chunk_rows=128)
    build_store_indexes(store)
    return store


def test_search_by_id_in_and_across_modalities(indexed_store, tiny_model):
    xp = Store(indexed_store).embeddings("xp")
    query = int(xp.column("source_id")[21].as_py())
    table = search(
        indexed_store, source_ids=np.array([query]), modality="xp", k=5, model=str(tiny_model)
    )
    assert table.num_rows == 5 and query not in table.column("neighbor_id").to_pylist()
    sims = table.column("similarity").to_numpy()
    assert np.all(np.diff(sims) <= 1e-6) and np.all(sims <= 1.0 + 1e-3)
    # the neighbours are exactly those of a brute-force cosine search over the stored vectors
    ids = xp.column("source_id").to_numpy()
    vectors = np.asarray(
        xp.column("embedding").combine_chunks().flatten(), dtype=np.float32
    ).reshape(len(ids), -1)
    cos = vectors @ vectors[21]
    cos[21] = -np.inf
    fifth = np.sort(cos)[-5]
    found = np.searchsorted(ids, table.column("neighbor_id").to_numpy())
    assert np.all(ids[found] == table.column("neighbor_id").to_numpy())
    # each neighbour is among the true top 5 up to float16 ties, with its true similarity
    assert np.all(cos[found] >= fifth - 3e-4) and fifth > np.median(cos[np.isfinite(cos)]) + 0.03
    np.testing.assert_allclose(sims, cos[found], atol=3e-4)
    cross = search(
        indexed_store,
        source_ids=np.array([query]),
        modality="lrs",
        target="xp",
        k=3,
        model=str(tiny_model),
    )
    assert cross.column("target_modality").to_pylist() == ["xp"] * 3
    assert "teff" in cross.column_names  # neighbours carry their catalog labels


def test_search_unknown_id_is_one_line_error(indexed_store, tiny_model):
    with pytest.raises(SpecsearchError, match="source_id 42 has no xp embedding"):
        search(indexed_store, source_ids=np.array([42]), modality="xp", model=str(tiny_model))
    result = CliRunner().invoke(app, ["search", "--store", str(indexed_store), "--source-id", "42"])
    assert result.exit_code == 2
    assert "source_id 42 has no xp embedding" in result.output and "Traceback" not in result.output


def test_search_by_spectrum_file_finds_the_star_itself(tmp_path, indexed_store, tiny_model):
    one = synthetic_shard(N_STARS, 0, "Q").slice(33, 1)  # star 33 of the store, as a file
    path = tmp_path / "query.parquet"
    write_parquet_atomic(one, path)
    table = search(indexed_store, spectrum=path, modality="xp", k=3, model=str(tiny_model))
    assert table.column("neighbor_id")[0].as_py() == one.column("source_id")[0].as_py()
    assert table.column("similarity")[0].as_py() > 0.999


def test_a_chunk_reads_exactly_its_rows_across_row_groups(tmp_path):
    from specsearch.pipeline.embed import Chunk, read_chunk

    table = synthetic_shard(350, 2, "DR1")
    path = tmp_path / "part-00000.parquet"
    pq.write_table(table, path, row_group_size=100)
    rows = read_chunk(Chunk("DR1", str(path), "x", 150, 320))
    assert rows.column("source_id").to_pylist() == table.column("source_id").to_pylist()[150:320]
