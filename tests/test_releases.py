"""One rule for a star seen in several releases: its latest release's row is the current one, in
search, the indexes, predict and the SQL views; earlier rows stay readable as history."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from specsearch.cli.app import app
from specsearch.files import write_parquet_atomic
from specsearch.indexes import build_store_indexes, extend_store_indexes, load_store_index
from specsearch.indexes.io import iter_index_vectors
from specsearch.pipeline.embed import embed_store
from specsearch.pipeline.ingest import ingest
from specsearch.query.predict import predict_store, predict_table
from specsearch.query.search import search
from specsearch.query.sql import connect
from specsearch.schema import column_matrix
from specsearch.store import Store

from .conftest import synthetic_shard

DR1_FIRST, DR1_N = 0, 300
DR2_FIRST, DR2_N = 280, 50  # stars 280-299 are observed again in DR2, with other spectra


@pytest.fixture(scope="module")
def two_releases(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("releases")
    dr1, dr2 = root / "dr1", root / "dr2"
    write_parquet_atomic(synthetic_shard(DR1_N, 0, "DR1", DR1_FIRST), dr1 / "part-00000.parquet")
    write_parquet_atomic(synthetic_shard(DR2_N, 7, "DR2", DR2_FIRST), dr2 / "part-00000.parquet")
    store = root / "store"
    ingest(dr1, store, "DR1", show_progress=False)
    embed_store(store, model=str(tiny_model), show_progress=False)
    build_store_indexes(store, show_progress=False)
    # the nightly path: the next release is embedded and added to the existing indexes
    ingest(dr2, store, "DR2", show_progress=False)
    embed_store(store, model=str(tiny_model), show_progress=False)
    extended = extend_store_indexes(store, "DR2", show_progress=False)
    both = synthetic_shard(DR2_N, 7, "DR2", DR2_FIRST).column("source_id").to_numpy()[:20]
    return Store(store), both, extended, dr2 / "part-00000.parquet"


def _dr2_vector(store: Store, source_id: int, modality: str = "xp") -> np.ndarray:
    rows = store.embeddings(modality, release="DR2", source_ids=np.array([source_id]))
    vector = column_matrix(rows, "embedding")[0]
    return vector / np.linalg.norm(vector)


def test_store_readers_give_the_latest_row_and_keep_history(two_releases):
    store, both, _, _ = two_releases
    current = store.embeddings("xp")
    assert current.num_rows == DR1_N + DR2_N - 20
    assert len(np.unique(current.column("source_id").to_numpy())) == current.num_rows
    again = current.filter(np.isin(current.column("source_id").to_numpy(), both))
    assert set(again.column("release").to_pylist()) == {"DR2"}
    history = store.embeddings("xp", history=True)
    assert history.num_rows == DR1_N + DR2_N
    shards = store.read_shards(columns=["source_id", "release"])
    assert shards.num_rows == DR1_N + DR2_N - 20
    latest = dict(
        zip(*(shards.column(c).to_pylist() for c in ("source_id", "release")), strict=True)
    )
    assert {latest[int(i)] for i in both} == {"DR2"}
    con = connect(store)
    assert con.execute("SELECT count(*) FROM shards").fetchone()[0] == DR1_N + DR2_N - 20
    assert con.execute("SELECT count(*) FROM shards_history").fetchone()[0] == DR1_N + DR2_N
    in_dr2 = con.execute(
        f"SELECT count(*) FROM embeddings WHERE modality = 'xp' AND release = 'DR2' "
        f"AND source_id IN ({', '.join(map(str, both))})"
    ).fetchone()[0]
    assert in_dr2 == 20
    assert con.execute("SELECT count(*) FROM embeddings WHERE modality = 'xp'").fetchone()[0] == (
        DR1_N + DR2_N - 20
    )


@pytest.mark.parametrize("how", ["extended", "rebuilt"])
def test_the_index_holds_each_star_once_with_its_dr2_vector(two_releases, how):
    store, both, extended, _ = two_releases
    if how == "rebuilt":
        build_store_indexes(store, show_progress=False)
    else:
        assert extended.modalities["xp"]["replaced"] == 20
    index, params = load_store_index(store, "xp")
    vectors, ids = map(np.concatenate, zip(*iter_index_vectors(index), strict=True))
    assert len(ids) == len(np.unique(ids)) == DR1_N + DR2_N - 20
    assert params["releases"] == ["DR1", "DR2"]
    for star in both[:5]:
        held = vectors[np.flatnonzero(ids == star)[0]]
        np.testing.assert_allclose(held, _dr2_vector(store, int(star)), atol=1e-6)


def test_search_finds_the_re_observed_star_once_by_its_dr2_spectrum(two_releases, tiny_model):
    store, both, _, dr2_file = two_releases
    star = int(both[3])
    # the star's DR2 spectrum as a query file: it finds itself with similarity 1, once
    query = tmp_file = dr2_file.with_name("query.parquet")
    table = pq.read_table(dr2_file)
    write_parquet_atomic(table.filter(table.column("source_id").to_numpy() == star), tmp_file)
    found = search(store, spectrum=query, modality="xp", k=3, model=str(tiny_model))
    neighbours = found.column("neighbor_id").to_pylist()
    assert found.num_rows == 3 and len(set(neighbours)) == 3
    assert neighbours[0] == star and found.column("similarity")[0].as_py() > 0.999
    assert found.column("release")[0].as_py() == "DR2"
    # by id: the query vector is its DR2 one, and k=3 gives 3 rows (CLI and library alike)
    by_id = search(store, source_ids=np.array([star]), modality="xp", k=3)
    assert by_id.num_rows == 3 and star not in by_id.column("neighbor_id").to_pylist()
    result = CliRunner().invoke(
        app,
        [
            "search",
            "--store",
            str(store.root),
            "--source-id",
            str(star),
            "-k",
            "3",
            "--format",
            "csv",
        ],
    )
    assert result.exit_code == 0, result.output
    assert len(result.stdout.strip().splitlines()) == 1 + 3


def test_predict_store_gives_one_row_per_star_from_its_latest_release(two_releases, tiny_model):
    store, both, _, dr2_file = two_releases
    labels = predict_store(store, model=str(tiny_model))
    ids = labels.column("source_id").to_numpy()
    assert len(ids) == len(np.unique(ids)) == DR1_N + DR2_N - 20
    dr2_rows = pq.read_table(dr2_file)
    expected = predict_table(dr2_rows, str(tiny_model))
    star = int(both[0])
    got = labels.filter(ids == star).column("teff").to_pylist()
    want = expected.filter(expected.column("source_id").to_numpy() == star).column("teff")
    assert got == want.to_pylist()
    older = predict_store(store, release="DR1", model=str(tiny_model))
    assert older.num_rows == DR1_N  # the history stays readable release by release


def test_release_list_is_a_table_that_fits_a_terminal(two_releases):
    store = two_releases[0]
    result = CliRunner().invoke(app, ["release", "list", "--store", str(store.root)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["release", "stars", "rejected", "ingested", "(UTC)", "has"]
    dr1, dr2 = (line.split(None, 5) for line in lines[1:])
    releases = store.read_manifest()["releases"]
    for row, name in ((dr1, "DR1"), (dr2, "DR2")):
        entry = releases[name]
        assert row[:3] == [name, f"{entry['rows']:,}", f"{entry['rejects']:,}"]
        assert row[3] == entry["ingested"][:10]  # the date; then the time to the minute
    assert int(dr1[1]) == DR1_N  # every 10th LRS is all NaN and rejected; the star stays
    assert dr1[5] == dr2[5] == "embeddings"  # not scored, no report yet
    assert all(len(line) <= 80 for line in lines)
