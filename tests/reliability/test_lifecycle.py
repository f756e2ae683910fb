"""Releases are replaced or removed with everything derived from them, in one commit; a stale
index or a half-embedded store is said so, never served."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from specsearch.cli.app import app
from specsearch.files import file_sha256
from specsearch.pipeline.embed import embed_store
from specsearch.store import Store
from tests.reliability.harness import source_release

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, code):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def snapshot(store):
    return {p: file_sha256(p) for p in store.rglob("*") if p.is_file() and p.name != ".lock"}


def test_ingesting_an_existing_release_needs_replace(store, tmp_path):
    before = snapshot(store)
    source = source_release(tmp_path / "src", 0, 300)
    line = one_line_error(run("ingest", source, "--store", store, "--release", "DR1"), 2)
    assert "release DR1 is already in the store; pass --replace" in line
    assert snapshot(store) == before


def test_replacing_a_release_drops_what_was_derived_from_it(store, tmp_path, probe_id):
    source = source_release(tmp_path / "src", 0, 300)  # DR1 had 2,000 stars
    old_chunks = list((store / "embeddings" / "release=DR1").rglob("*.parquet"))
    assert old_chunks
    result = run("ingest", source, "--store", store, "--release", "DR1", "--replace")
    assert result.exit_code == 0, result.output
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["releases"]["DR1"]["rows"] == 300
    assert "DR1" not in manifest["embeddings"]["releases"]
    # DR1 was the calibration reference: the calibration and every score went with it
    assert "calibration" not in manifest and not manifest.get("scores")
    assert "DR1" not in manifest.get("reports", {})
    assert not any(p.exists() for p in old_chunks)
    # the indexes covered the old DR1: searches say so instead of answering from it
    line = one_line_error(run("search", "--store", store, "--source-id", probe_id), 1)
    assert "stale" in line and "index build" in line
    # index build refuses a half-embedded store
    line = one_line_error(run("index", "build", "--store", store), 2)
    assert "embeddings are incomplete (DR1 (all) not embedded)" in line
    assert run("embed", "--store", store).exit_code == 0
    assert run("index", "build", "--store", store).exit_code == 0
    st = Store(store)
    current = set(st.read_shards(columns=["source_id"]).column("source_id").to_pylist())
    dr1 = set(st.read_shards(columns=["source_id"], release="DR1").column("source_id").to_pylist())
    dr2 = set(st.read_shards(columns=["source_id"], release="DR2").column("source_id").to_pylist())
    assert len(dr1) == 300 and current == dr1 | dr2
    hits = run("search", "--store", store, "--source-id", probe_id, "-k", "20", "--format", "csv")
    assert hits.exit_code == 0, hits.output
    neighbours = [int(line.split(",")[3]) for line in hits.stdout.strip().splitlines()[1:]]
    assert len(neighbours) == 20 and set(neighbours) <= current
    assert run("check", "--store", store).exit_code == 0


def test_release_rm_removes_everything_derived(store):
    result = run("release", "rm", "DR2", "--store", store)
    line = one_line_error(result, 2)
    assert "needs --yes" in line
    result = run("release", "rm", "DR2", "--store", store, "--yes")
    assert result.exit_code == 0, result.output
    manifest = json.loads((store / "manifest.json").read_text())
    assert list(manifest["releases"]) == ["DR1"]
    assert list(manifest["embeddings"]["releases"]) == ["DR1"]
    assert list(manifest["scores"]) == ["DR1"] and manifest["calibration"]["release"] == "DR1"
    assert "DR2" not in manifest.get("reports", {})
    for part in ("shards", "embeddings", "scores", "reports"):
        assert not (store / part / "release=DR2").exists()
    one_line_error(run("release", "rm", "DR2", "--store", store, "--yes"), 2)
    count = run("sql", "--store", store, "SELECT count(*) AS n FROM shards", "--format", "csv")
    assert count.stdout.split() == ["n", "2000"]
    assert run("index", "build", "--store", store).exit_code == 0
    assert run("check", "--store", store).exit_code == 0


def test_removing_the_reference_release_drops_the_calibration(store):
    assert run("release", "rm", "DR1", "--store", store, "--yes").exit_code == 0
    manifest = json.loads((store / "manifest.json").read_text())
    assert "calibration" not in manifest and not manifest.get("scores")
    assert not (store / "scores" / "reference").exists()


def test_search_on_an_index_older_than_its_embeddings_says_so(store, tmp_path, probe_id):
    source = source_release(tmp_path / "src", 0, 100)
    assert run("ingest", source, "--store", store, "--release", "DR3").exit_code == 0
    assert run("embed", "--store", store).exit_code == 0
    line = one_line_error(run("search", "--store", store, "--source-id", probe_id), 1)
    assert "stale: the xp embeddings changed since the index was built" in line


def test_index_build_on_a_half_embedded_store_says_so(tmp_path):
    source = source_release(tmp_path / "src", 0, 1200)
    assert run("ingest", source, "--store", tmp_path / "s", "--release", "DR1").exit_code == 0
    embed_store(tmp_path / "s", chunk_rows=300, max_chunks=2, show_progress=False)
    st = Store(tmp_path / "s")
    assert st.missing_embeddings() == {"DR1": 2}
    line = one_line_error(run("index", "build", "--store", tmp_path / "s"), 2)
    assert "DR1 (2 chunks) not embedded" in line
    ids = st.embeddings("xp", columns=["source_id"]).column("source_id").to_numpy()
    assert len(ids) == 600 and len(np.unique(ids)) == 600
