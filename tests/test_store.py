"""specsearch.store: layout, atomic writes, manifest, releases."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from specsearch.errors import SpecsearchError
from specsearch.files import atomic_path, file_sha256, write_parquet_atomic
from specsearch.schema import (
    REJECTS_SCHEMA,
    check_release,
    column_matrix,
    make_shard_table,
    rejects_table,
)
from specsearch.store import SUBDIRS, Store


def shard(n: int, release: str = "DR1", first_id: int = 1) -> pa.Table:
    rng = np.random.default_rng(n)
    return make_shard_table(
        np.arange(first_id, first_id + n),
        release,
        xp_flux=rng.normal(1.0, 0.1, (n, 343)),
        xp_flux_error=np.full((n, 343), 0.01),
    )


def leftovers(root) -> list[str]:
    return sorted(p.name for p in root.rglob("*") if p.name.endswith(".tmp"))


def test_new_store_layout_and_manifest(tmp_path):
    store = Store(tmp_path / "s")
    assert all((tmp_path / "s" / sub).is_dir() for sub in SUBDIRS)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["format"] == 1 and manifest["releases"] == {} and "updated" in manifest
    assert store.releases() == []
    with pytest.raises(SpecsearchError, match="no ingested release"):
        store.shards()


def test_open_existing_without_create(tmp_path):
    with pytest.raises(SpecsearchError, match="not a specsearch store"):
        Store(tmp_path / "missing", create=False)
    Store(tmp_path / "s")
    assert Store(tmp_path / "s", create=False).releases() == []


def test_write_release_round_trip_and_manifest(tmp_path):
    store = Store(tmp_path)
    table = shard(25)
    rejects = rejects_table("DR1", [{"file": "x.fits", "reason": "truncated FITS"}])
    entry = store.write_release(
        "DR1", [table.slice(0, 10), table.slice(10)], rejects, rows_per_file=10, sources=["src"]
    )
    assert entry["rows"] == 25 and entry["rejects"] == 1 and entry["sources"] == ["src"]
    parts = sorted(p.name for p in store.shard_dir("DR1").glob("part-*.parquet"))
    assert parts == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert {k: v["sha256"] for k, v in entry["files"].items()} == {
        name: file_sha256(store.shard_dir("DR1") / name) for name in parts
    }
    assert all(
        v["size"] == (store.shard_dir("DR1") / k).stat().st_size for k, v in entry["files"].items()
    )
    assert store.read_manifest()["releases"]["DR1"]["rows"] == 25
    back = store.shards("DR1").to_table()
    assert back.column("source_id").to_pylist() == list(range(1, 26))
    np.testing.assert_array_equal(column_matrix(back, "xp_flux"), column_matrix(table, "xp_flux"))
    assert store.rejects("DR1").column("reason").to_pylist() == ["truncated FITS"]
    assert store.rejects("DR1").schema == REJECTS_SCHEMA
    assert sum(b.num_rows for b in store.iter_shard_batches("DR1", batch_size=7)) == 25
    assert max(b.num_rows for b in store.iter_shard_batches("DR1", batch_size=7)) <= 7
    assert leftovers(tmp_path) == []


def test_write_release_twice_replaces(tmp_path):
    store = Store(tmp_path)
    store.write_release("DR1", [shard(25)], rows_per_file=10)
    with pytest.raises(SpecsearchError, match="already in the store; pass --replace"):
        store.write_release("DR1", [shard(4, first_id=100)], rows_per_file=10)
    store.write_release("DR1", [shard(4, first_id=100)], rows_per_file=10, replace=True)
    parts = sorted(p.name for p in store.shard_dir("DR1").glob("part-*.parquet"))
    assert parts == ["part-00000.parquet"]
    assert store.shards("DR1").to_table().column("source_id").to_pylist() == [100, 101, 102, 103]
    entry = store.read_manifest()["releases"]["DR1"]
    assert entry["rows"] == 4 and list(entry["files"]) == ["part-00000.parquet"]
    assert store.rejects("DR1").num_rows == 0
    assert leftovers(tmp_path) == []


def test_releases_and_all_release_reads(tmp_path):
    store = Store(tmp_path)
    store.write_release("DR1", [shard(3)])
    store.write_release("DR2", [shard(2, release="DR2", first_id=10)])
    assert store.releases() == ["DR1", "DR2"]
    assert store.shards().count_rows() == 5
    assert (
        sorted(store.shards().to_table().column("release").to_pylist()) == ["DR1"] * 3 + ["DR2"] * 2
    )


def test_releases_keep_the_order_they_were_added(tmp_path):
    store = Store(tmp_path)
    store.write_release("DR2", [shard(2, release="DR2")])
    store.write_release("DR10", [shard(2, release="DR10")])
    assert store.releases() == ["DR2", "DR10"]


def test_empty_release_writes_one_empty_part(tmp_path):
    store = Store(tmp_path)
    entry = store.write_release("E", [])
    assert entry["rows"] == 0 and list(entry["files"]) == ["part-00000.parquet"]
    assert store.shards("E").count_rows() == 0


def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "t.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half-written")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert leftovers(tmp_path) == []
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and leftovers(tmp_path) == []


def test_write_parquet_atomic(tmp_path):
    path = write_parquet_atomic(shard(3), tmp_path / "sub" / "x.parquet")
    assert pq.read_table(path).num_rows == 3 and leftovers(tmp_path) == []


@pytest.mark.parametrize("name", ["", "a/b", "../up", "DR 1"])
def test_bad_release_names(name):
    with pytest.raises(SpecsearchError, match="release name"):
        check_release(name)


def test_good_release_names():
    assert check_release("DR1_v2.0-rc") == "DR1_v2.0-rc"


def test_corrupt_manifest_is_a_one_line_error(tmp_path):
    store = Store(tmp_path)
    store.manifest_path.write_text("{not json")
    with pytest.raises(SpecsearchError, match="corrupt manifest") as err:
        store.read_manifest()
    assert "\n" not in str(err.value)


def test_missing_release_shards_is_an_error(tmp_path):
    store = Store(tmp_path)
    store.write_release("DR1", [shard(2)])
    for part in store.shard_dir("DR1").glob("part-*.parquet"):
        part.unlink()
    with pytest.raises(
        SpecsearchError, match=r"release=DR1/part-00000.parquet: missing; re-run .*--replace"
    ):
        store.shards("DR1")


def test_a_write_that_fails_part_way_leaves_the_release_as_it_was(tmp_path):
    store = Store(tmp_path)
    store.write_release("DR1", [shard(25)], rows_per_file=10)
    before = store.read_manifest()["releases"]["DR1"]
    (store.shard_dir("DR1") / ".staging-killed").mkdir()  # what a killed write leaves

    def tables():
        yield shard(12, first_id=100)  # fills part-00000 and starts part-00001
        raise RuntimeError("reader failed")

    with pytest.raises(RuntimeError, match="reader failed"):
        store.write_release("DR1", tables(), rows_per_file=10, replace=True)
    assert store.read_manifest()["releases"]["DR1"] == before
    assert store.shards("DR1").to_table().column("source_id").to_pylist() == list(range(1, 26))
    assert {name: file_sha256(store.shard_dir("DR1") / name) for name in before["files"]} == {
        name: record["sha256"] for name, record in before["files"].items()
    }
    assert sorted(p.name for p in store.shard_dir("DR1").iterdir()) == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
        "rejects.parquet",
    ]


def test_rows_by_id_read_one_row_group_at_a_time(tmp_path, monkeypatch):
    """Ids in no particular order make every row group a candidate by its statistics; only the
    groups that hold a wanted id are read in full, one at a time."""
    from specsearch.store import rows_with_ids

    rng = np.random.default_rng(0)
    ids = rng.permutation(np.arange(1, 10_001, dtype=np.int64) * 7919)
    flux = rng.normal(size=(10_000, 8)).astype(np.float32)
    table = pa.table(
        {
            "source_id": ids,
            "flux": pa.FixedSizeListArray.from_arrays(pa.array(flux.ravel()), 8),
        }
    )
    path = tmp_path / "part.parquet"
    pq.write_table(table, path, row_group_size=1000)  # 10 groups, each spanning all ids
    wanted = ids[[5, 17, 4321, 9999]]  # in groups 0, 0, 4 and 9
    full_reads = []
    original = pq.ParquetFile.read_row_group

    def spy(self, group, columns=None, **kwargs):
        if columns != ["source_id"]:
            full_reads.append(group)
        return original(self, group, columns=columns, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    got = rows_with_ids(path, ["source_id", "flux"], wanted)
    assert full_reads == [0, 4, 9]
    assert sorted(got.column("source_id").to_pylist()) == sorted(wanted.tolist())
    rows = {int(i): n for n, i in enumerate(ids)}
    got_ids, got_flux = got.column("source_id").to_pylist(), got.column("flux").to_pylist()
    for sid, values in zip(got_ids, got_flux, strict=True):
        np.testing.assert_array_equal(values, flux[rows[sid]])
    assert rows_with_ids(path, ["source_id"], np.array([3], np.int64)).num_rows == 0
