"""DuckDB over the store: views, joins, attached catalogs, output formats, errors."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from astropy.table import MaskedColumn, Table
from typer.testing import CliRunner

from specsearch.cli.app import app
from specsearch.errors import SpecsearchError
from specsearch.files import write_parquet_atomic
from specsearch.grids import N_LRS, N_XP
from specsearch.query.output import emit_relation
from specsearch.query.sql import connect
from specsearch.schema import make_shard_table
from specsearch.store import Store

D = 8


def write_embeddings(store, release, modality, ids, with_labels=False):
    vectors = np.random.default_rng(int(ids[0])).standard_normal((len(ids), D)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    columns = {
        "source_id": pa.array(ids, pa.int64()),
        "modality": pa.array([modality] * len(ids)),
        "model_id": pa.array(["m1"] * len(ids)),
        "embedding": pa.FixedSizeListArray.from_arrays(
            pa.array(vectors.astype(np.float16).ravel()), D
        ),
    }
    if with_labels:
        columns["pred_teff"] = pa.array(np.linspace(4000, 6000, len(ids)).astype(np.float32))
        columns["pred_teff_err"] = pa.array(np.full(len(ids), 50.0, np.float32))
    path = store.embedding_path(release, modality, "part-00000.parquet")
    write_parquet_atomic(pa.table(columns), path)
    store.record_embeddings("m1")
    return vectors


@pytest.fixture
def store(tmp_path):
    store = Store(tmp_path / "store")
    rng = np.random.default_rng(0)
    for release, ids in (("DR1", np.arange(100, 130)), ("DR2", np.arange(130, 150))):
        n = len(ids)
        table = make_shard_table(
            ids,
            release,
            lrs_flux=rng.random((n, N_LRS)),
            lrs_ivar=np.ones((n, N_LRS)),
            xp_flux=rng.random((n, N_XP)),
            xp_flux_error=np.ones((n, N_XP)),
            labels={"teff": np.full(n, 5000.0)},
        )
        store.write_release(release, [table])
        write_embeddings(store, release, "xp", ids, with_labels=True)
    write_embeddings(store, "DR1", "lrs", np.arange(100, 110))
    neighbors = pa.table(
        {
            "source_id": pa.array([100, 100], pa.int64()),
            "modality": ["xp", "xp"],
            "rank": pa.array([1, 2], pa.int32()),
            "neighbor_id": pa.array([101, 102], pa.int64()),
            "similarity": pa.array([0.9, 0.8], pa.float32()),
            "release": ["DR1", "DR1"],
        }
    )
    write_parquet_atomic(neighbors, store.score_path("DR1", "neighbors.parquet"))
    store.record_scores("DR1", {"files": {"neighbors": "neighbors.parquet"}})
    return store


def test_views_count_and_join(store):
    con = connect(store)
    assert con.execute("SELECT count(*) FROM shards").fetchone()[0] == 50
    assert con.execute("SELECT count(*) FROM embeddings").fetchone()[0] == 60
    assert (
        con.execute(
            "SELECT count(*) FROM embeddings WHERE modality = 'xp' AND release = 'DR2'"
        ).fetchone()[0]
        == 20
    )
    columns = [row[0] for row in con.execute("DESCRIBE shards").fetchall()]
    assert "xp_flux" not in columns and "teff" in columns and "source_id" in columns
    joined = con.execute(
        "SELECT count(*) FROM shards s JOIN embeddings e USING (source_id) WHERE e.modality = 'lrs'"
    ).fetchone()[0]
    assert joined == 10
    # the embedding is a FLOAT[d] array: cosine similarity with itself is 1
    similarity = con.execute(
        "SELECT min(array_cosine_similarity(embedding, embedding)) FROM embeddings"
    ).fetchone()[0]
    assert similarity == pytest.approx(1.0, abs=1e-5)
    assert con.execute("SELECT neighbor_id FROM neighbors ORDER BY rank").fetchall() == [
        (101,),
        (102,),
    ]
    assert con.execute("SELECT count(*) FROM scores").fetchone()[0] == 0
    assert con.execute(
        "SELECT count(*), min(pred_teff), max(pred_teff_err) FROM labels"
    ).fetchone() == (50, 4000.0, 50.0)
    with_arrays = connect(store, with_arrays=True)
    assert with_arrays.execute("SELECT len(xp_flux) FROM shards LIMIT 1").fetchone()[0] == N_XP


def test_views_of_an_empty_store(tmp_path):
    con = connect(Store(tmp_path / "empty"))
    for view in ("shards", "embeddings", "scores", "neighbors", "labels"):
        assert con.execute(f"SELECT count(*) FROM {view}").fetchone()[0] == 0
    assert "neighbor_id" in [row[0] for row in con.execute("DESCRIBE neighbors").fetchall()]
    assert "pred_teff_err" in [row[0] for row in con.execute("DESCRIBE labels").fetchall()]


def test_attach_csv_and_fits(store, tmp_path):
    csv_path = tmp_path / "catalog.csv"
    csv_path.write_text("source_id,name\n100,alpha\n101,beta\n999,gamma\n")
    fits_path = tmp_path / "catalog.fits"
    Table(
        {
            "SOURCE_ID": np.array([100, 101, 102], dtype=">i8"),
            "PARALLAX": MaskedColumn([1.5, 2.5, 0.0], mask=[False, False, True]),
            "CLASS": np.array([b"STAR", b"QSO", b"STAR"]),
            "MAGS": np.arange(6, dtype=np.float32).reshape(3, 2),
        }
    ).write(fits_path)
    ecsv_path = tmp_path / "catalog.ecsv"
    Table({"source_id": [105, 106], "flag": [True, False]}).write(ecsv_path)
    con = connect(store, attach={"cat": csv_path, "gaia": fits_path, "extra": ecsv_path})
    rows = con.execute(
        "SELECT s.source_id, c.name FROM shards s JOIN cat c USING (source_id) ORDER BY 1"
    ).fetchall()
    assert rows == [(100, "alpha"), (101, "beta")]
    rows = con.execute(
        "SELECT g.source_id, g.parallax, g.class, g.mags[2] FROM gaia g "
        "JOIN embeddings e ON e.source_id = g.source_id AND e.modality = 'xp' ORDER BY 1"
    ).fetchall()
    assert rows == [(100, 1.5, "STAR", 1.0), (101, 2.5, "QSO", 3.0), (102, None, "STAR", 5.0)]
    assert con.execute("SELECT count(*) FROM extra WHERE flag").fetchone()[0] == 1
    with pytest.raises(SpecsearchError, match="no such file"):
        connect(store, attach={"x": tmp_path / "missing.csv"})
    with pytest.raises(SpecsearchError, match="one of the store's views"):
        connect(store, attach={"shards": csv_path})


def test_cli_formats(store, tmp_path):
    runner = CliRunner()
    base = ["sql", "--store", str(store.root)]
    query = "SELECT source_id, release FROM shards ORDER BY source_id LIMIT 3"
    result = runner.invoke(app, [*base, query])
    assert result.exit_code == 0, result.output
    assert "100" in result.output and "3 rows" in result.output
    result = runner.invoke(app, [*base, query, "--format", "csv"])
    assert result.exit_code == 0
    assert result.stdout.splitlines()[:2] == ["source_id,release", "100,DR1"]
    result = runner.invoke(
        app, [*base, "SELECT source_id, embedding FROM embeddings LIMIT 2", "--format", "json"]
    )
    records = json.loads(result.stdout)
    assert len(records) == 2 and len(records[0]["embedding"]) == D
    out = tmp_path / "result.parquet"
    result = runner.invoke(app, [*base, query, "--format", "parquet", "--output", str(out)])
    assert result.exit_code == 0 and pq.read_table(out).num_rows == 3
    result = runner.invoke(app, [*base, query, "--format", "parquet"])
    assert result.exit_code == 2 and "--output" in result.output


def test_cli_attach_and_errors(store, tmp_path):
    runner = CliRunner()
    csv_path = tmp_path / "cat.csv"
    csv_path.write_text("source_id,mag\n100,12.5\n")
    result = runner.invoke(
        app,
        [
            "sql",
            "--store",
            str(store.root),
            "--format",
            "csv",
            "--attach",
            f"cat={csv_path}",
            "SELECT mag FROM cat JOIN shards USING (source_id)",
        ],
    )
    assert result.exit_code == 0 and result.stdout.splitlines() == ["mag", "12.5"]
    result = runner.invoke(app, ["sql", "--store", str(store.root), "SELEC nonsense FROM shards"])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "syntax error" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["sql", "--store", str(store.root), "SELECT nope FROM shards"])
    assert result.exit_code == 2 and result.output.strip().count("\n") == 0
    result = runner.invoke(app, ["sql", "--store", str(tmp_path / "nowhere"), "SELECT 1"])
    assert result.exit_code == 2 and "not a specsearch store" in result.output
    with pytest.raises(SpecsearchError, match="--format"):
        emit_relation(connect(store).sql("SELECT 1"), fmt="xml", output=tmp_path / "x.xml")
    result = runner.invoke(app, ["sql", "--store", str(store.root), "SELECT 1", "--format", "xml"])
    assert result.exit_code == 2 and "--format 'xml' must be one of" in result.output
