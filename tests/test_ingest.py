"""specsearch ingest: dispatch by content, merge by source_id, rejects, the CLI contract."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from specsearch.cli.app import app
from specsearch.errors import InputError
from specsearch.grids import N_LRS, N_XP, XP_WAVELENGTH
from specsearch.pipeline.ingest import ingest
from specsearch.schema import SHARD_SCHEMA, TRUTH_SCHEMA, column_matrix, make_shard_table
from specsearch.store import Store
from specsearch.surveys.lamost import write_lamost_fits
from specsearch.surveys.shards import read_shards
from specsearch.surveys.sources import detect_format, median_snr_lrs, median_snr_xp

G1, G2, G3 = 1_000_000_000_000_001, 1_000_000_000_000_002, 1_000_000_000_000_003
NATIVE = 10.0 ** (3.56815 + 1e-4 * np.arange(3909))
runner = CliRunner()


def star(wavelength: np.ndarray) -> np.ndarray:
    flux = 800.0 * (wavelength / 5000.0) ** -1.5
    for centre in (4341.0, 4861.0, 5175.0):
        flux *= 1 - 0.4 * np.exp(-0.5 * ((wavelength - centre) / 6.0) ** 2)
    return flux


def lamost(path, header, ivar=4e-3, layout="image"):
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_lamost_fits(
        path, NATIVE, star(NATIVE), np.full(NATIVE.size, ivar), layout=layout, header=header
    )


def xp_spectrum(n: int) -> tuple[np.ndarray, np.ndarray]:
    flux = 1e-17 * (XP_WAVELENGTH / 550.0)[None, :] ** -2 * np.arange(1, n + 1)[:, None]
    return flux, flux / 50.0  # S/N 50


@pytest.fixture(scope="module")
def release_folder(tmp_path_factory):
    """LAMOST image + table layouts, one without Gaia id, an XP shard, a truth table, 2 bad files."""
    root = tmp_path_factory.mktemp("release")
    lamost(root / "lamost" / "spec-1.fits", {"OBSID": 101, "GAIA_SOURCE_ID": G1})
    lamost(root / "lamost" / "spec-2.fits", {"OBSID": 102, "GAIA_SOURCE_ID": G2}, layout="table")
    lamost(root / "lamost" / "spec-3.fits", {"OBSID": 103})
    data = (root / "lamost" / "spec-1.fits").read_bytes()
    (root / "lamost" / "spec-4.fits").write_bytes(data[: len(data) // 2])
    (root / "notes.txt").write_text("observing log\n")
    (root / ".DS_Store").write_bytes(b"\0\0")  # hidden files are not data
    xp_flux, xp_error = xp_spectrum(2)
    shard = make_shard_table(
        [G3, G1],
        "ANY",
        xp_flux=xp_flux,
        xp_flux_error=xp_error,
        labels={"teff": np.array([5000.0, 5800.0])},
    )
    pq.write_table(shard, root / "xp.parquet")
    pq.write_table(
        pa.table(
            {"source_id": [G1], "anomaly_class": ["none"], "parameters": ["{}"]},
            schema=TRUTH_SCHEMA,
        ),
        root / "truth.parquet",
    )
    return root


def test_cli_ingest_folder(release_folder, tmp_path):
    result = runner.invoke(
        app, ["ingest", str(release_folder), "--store", str(tmp_path / "store"), "--release", "DR1"]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == (
        f"ingested DR1: 4 stars (3 LRS, 2 XP, 1 both) from 6 files, 2 rejected, 1 side tables skipped"
        f" -> {tmp_path / 'store' / 'shards' / 'release=DR1'}"
    )
    store = Store(tmp_path / "store", create=False)
    table = store.shards("DR1").to_table()
    assert table.column("source_id").to_pylist() == [-103, G1, G2, G3]
    assert table.column("obsid").to_pylist() == [103, 101, 102, None]
    assert table.column("release").to_pylist() == ["DR1"] * 4
    assert table.column("lrs_flux").is_valid().to_pylist() == [True, True, True, False]
    assert table.column("xp_flux").is_valid().to_pylist() == [False, True, False, True]
    # labels and XP of G1 come from the shard, its LRS from spec-1.fits
    assert table.column("teff").to_pylist() == [None, 5800.0, None, 5000.0]
    np.testing.assert_allclose(column_matrix(table, "xp_flux")[1], xp_spectrum(2)[0][1], rtol=1e-6)
    assert set(table.column_names) >= set(SHARD_SCHEMA.names) and not any(
        c.startswith("_") for c in table.column_names
    )
    rejects = store.rejects("DR1")
    assert rejects.column("file").to_pylist() == ["lamost/spec-4.fits", "notes.txt"]
    assert (
        rejects.column("reason").to_pylist()[1]
        == "not a LAMOST LRS FITS file, Gaia XP product or canonical shard"
    )
    assert rejects.column("reason").to_pylist()[0].startswith("truncated FITS: the file has ")
    assert rejects.column("obsid").to_pylist()[0] == 101
    assert store.read_manifest()["releases"]["DR1"]["rejects"] == 2


def test_ingest_twice_gives_identical_files(release_folder, tmp_path):
    ingest(release_folder, tmp_path / "a", "DR1", show_progress=False)
    ingest(release_folder, tmp_path / "b", "DR1", show_progress=False)

    def contents(store):  # checksums and sizes; mtimes differ by design
        files = Store(tmp_path / store).read_manifest()["releases"]["DR1"]["files"]
        return {k: (v["sha256"], v["size"]) for k, v in files.items()}

    first = contents("a")
    ingest(release_folder, tmp_path / "a", "DR1", show_progress=False, replace=True)
    assert first == contents("a") == contents("b")
    rejects = [
        (tmp_path / s / "shards" / "release=DR1" / "rejects.parquet").read_bytes() for s in "ab"
    ]
    assert rejects[0] == rejects[1]


def test_cli_bad_single_file_is_one_line_exit_2(release_folder, tmp_path):
    bad = release_folder / "lamost" / "spec-4.fits"
    result = runner.invoke(
        app, ["ingest", str(bad), "--store", str(tmp_path / "s"), "--release", "DR1"]
    )
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"error: {bad}: truncated FITS: the file has ")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("notes.txt", "notes.txt: not a LAMOST LRS FITS file, Gaia XP product or canonical shard"),
        ("truth.parquet", "truth.parquet: a rejects or truth table, not survey spectra"),
        ("missing.fits", "missing.fits: no such file or directory"),
    ],
)
def test_cli_other_bad_single_sources(release_folder, tmp_path, name, message):
    result = runner.invoke(
        app,
        ["ingest", str(release_folder / name), "--store", str(tmp_path / "s"), "--release", "DR1"],
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert (
        result.stderr.strip()
        == f"error: {release_folder / message.split(':')[0]}:{message.split(':', 1)[1]}"
    )


def test_cli_single_good_file(release_folder, tmp_path):
    result = runner.invoke(
        app,
        [
            "ingest",
            str(release_folder / "lamost" / "spec-2.fits"),
            "--store",
            str(tmp_path / "s"),
            "--release",
            "N1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(
        "ingested N1: 1 stars (1 LRS, 0 XP, 0 both) from 1 files, 0 rejected"
    )


def test_single_file_with_too_few_good_pixels_is_an_error(tmp_path):
    flux = star(NATIVE)
    flux[NATIVE < 5000] = np.nan
    path = write_lamost_fits(
        tmp_path / "nan.fits", NATIVE, flux, np.ones(NATIVE.size), header={"OBSID": 5}
    )
    with pytest.raises(InputError, match=r"nan\.fits: only 34% of the LRS grid has good pixels"):
        ingest(path, tmp_path / "s", "DR1", show_progress=False)


def test_empty_release_is_an_error(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text("nothing here")
    result = runner.invoke(
        app, ["ingest", str(tmp_path / "src"), "--store", str(tmp_path / "s"), "--release", "DR1"]
    )
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"error: {tmp_path / 'src'}: no usable spectra for release DR1 (1 rejected; first: notes.txt: "
        "not a LAMOST LRS FITS file, Gaia XP product or canonical shard)"
    )
    assert Store(tmp_path / "s").releases() == []


def test_only_side_tables_is_an_empty_release(release_folder, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "truth.parquet").write_bytes(
        (release_folder / "truth.parquet").read_bytes()
    )
    with pytest.raises(InputError, match=r"no usable spectra for release DR1 \(0 rejected\)$"):
        ingest(tmp_path / "src", tmp_path / "s", "DR1", show_progress=False)


def test_duplicates_keep_the_highest_median_snr(tmp_path):
    src = tmp_path / "src"
    lamost(src / "a_low.fits", {"OBSID": 1, "GAIA_SOURCE_ID": G1}, ivar=1e-3)
    lamost(src / "b_high.fits", {"OBSID": 2, "GAIA_SOURCE_ID": G1}, ivar=4e-3, layout="table")
    lamost(src / "c_low.fits", {"OBSID": 3, "GAIA_SOURCE_ID": G1}, ivar=1e-3)
    summary = ingest(src, tmp_path / "s", "DR1", show_progress=False)
    assert str(summary).startswith(
        "ingested DR1: 1 stars (1 LRS, 0 XP, 0 both) from 3 files, 2 rejected"
    )
    store = Store(tmp_path / "s")
    assert store.shards("DR1").to_table().column("obsid").to_pylist() == [2]
    rejects = store.rejects("DR1").to_pylist()
    assert [r["obsid"] for r in rejects] == [1, 3]
    for r in rejects:
        match = re.fullmatch(
            r"duplicate source_id: LRS kept from b_high\.fits \(median S/N ([\d.]+) vs ([\d.]+)\)",
            r["reason"],
        )
        assert match, r["reason"]
        # ivar 4x higher -> S/N 2x higher
        assert float(match[1]) / float(match[2]) == pytest.approx(2.0, rel=0.01)


def test_median_snr():
    flux = np.ones((2, N_LRS))
    ivar = np.full((2, N_LRS), 100.0)
    ivar[1] = 0.0
    np.testing.assert_allclose(median_snr_lrs(flux, ivar), [10.0, 0.0])
    xp_flux, xp_error = xp_spectrum(3)
    np.testing.assert_allclose(median_snr_xp(xp_flux, xp_error), [50.0, 50.0, 50.0])


def test_detect_format(release_folder):
    assert detect_format(release_folder / "lamost" / "spec-1.fits") == "lamost"
    assert detect_format(release_folder / "lamost" / "spec-2.fits") == "lamost"
    assert (
        detect_format(release_folder / "lamost" / "spec-4.fits") == "lamost"
    )  # truncated: read, then rejected
    assert detect_format(release_folder / "xp.parquet") == "shards"
    assert detect_format(release_folder / "truth.parquet") == "side_table"
    assert detect_format(release_folder / "notes.txt") == "unknown"


# ---------------------------------------------------------------- canonical shards as a source


def messy_shard(path):
    """Eight rows, variable-length lists, each row with one problem (or none)."""
    good_lrs, good_ivar = np.ones(N_LRS).tolist(), np.full(N_LRS, 100.0).tolist()
    xp_flux, xp_error = (a[0].tolist() for a in xp_spectrum(1))
    nan_xp = list(xp_flux)
    nan_xp[10] = float("nan")
    holes = np.ones(N_LRS)
    holes[[5, 6, 7]] = np.nan
    rows = [
        (1, good_lrs, good_ivar, xp_flux, xp_error),
        (2, [1.0] * 1000, [1.0] * 1000, xp_flux, xp_error),
        (3, [float("nan")] * N_LRS, good_ivar, None, None),
        (None, good_lrs, good_ivar, None, None),
        (5, None, None, nan_xp, xp_error),
        (6, None, None, None, None),
        (7, good_lrs, None, None, None),
        (8, holes.tolist(), good_ivar, None, None),
    ]
    columns = list(zip(*rows, strict=True))
    table = pa.table(
        {
            "source_id": pa.array(columns[0], pa.int64()),
            "release": ["OLD"] * 8,
            "lrs_flux": pa.array(columns[1], pa.list_(pa.float64())),
            "lrs_ivar": pa.array(columns[2], pa.list_(pa.float64())),
            "xp_flux": pa.array(columns[3], pa.list_(pa.float32())),
            "xp_flux_error": pa.array(columns[4], pa.list_(pa.float32())),
            "note": [f"row {i}" for i in range(8)],
        }
    )
    pq.write_table(table, path)
    return path


def test_read_shards_row_checks(tmp_path):
    path = messy_shard(tmp_path / "messy.parquet")
    ((shards, rejects),) = list(read_shards(path, "DR9", provenance=True))
    assert shards.column("source_id").to_pylist() == [1, 2, 8]
    assert shards.column("release").to_pylist() == ["DR9"] * 3
    assert shards.column("note").to_pylist() == ["row 0", "row 1", "row 7"]
    assert shards.column("_row").to_pylist() == [0, 1, 7]
    assert shards.schema.field("lrs_flux").type == SHARD_SCHEMA.field("lrs_flux").type
    assert shards.column("lrs_flux").is_valid().to_pylist() == [True, False, True]
    lrs_flux, lrs_ivar = column_matrix(shards, "lrs_flux")[2], column_matrix(shards, "lrs_ivar")[2]
    assert lrs_flux[[5, 6, 7]].tolist() == [0.0, 0.0, 0.0] and lrs_ivar[[5, 6, 7]].tolist() == [
        0.0,
        0.0,
        0.0,
    ]
    assert (lrs_ivar[8:] == 100.0).all()
    assert dict(
        zip(rejects.column("row").to_pylist(), rejects.column("reason").to_pylist(), strict=True)
    ) == {
        1: "lrs_flux has length 1000, expected 1462 (LRS dropped, row kept)",
        2: "lrs: only 0% good pixels (1462 NaN/inf flux), needs >= 50%",
        3: "source_id is null",
        4: "xp: 1 pixels with non-finite flux or non-positive error",
        5: "no LRS or XP spectrum",
        6: "lrs_flux without lrs_ivar",
    }
    assert rejects.column("source_id").to_pylist() == [2, 3, None, 5, 6, 7]


def test_read_shards_file_level_problems(tmp_path):
    no_id = tmp_path / "no_id.parquet"
    pq.write_table(pa.table({"xp_flux": pa.array([[1.0] * N_XP], pa.list_(pa.float32()))}), no_id)
    wide = tmp_path / "wide.parquet"
    pq.write_table(
        pa.table(
            {"source_id": [1], "lrs_flux": pa.array([[1.0] * 1000], pa.list_(pa.float32(), 1000))}
        ),
        wide,
    )
    ((_, rejects),) = list(read_shards(wide, "DR1"))
    assert rejects.column("reason").to_pylist() == [
        "column lrs_flux has length 1000, expected 1462"
    ]
    with pytest.raises(
        InputError, match=r"wide\.parquet: column lrs_flux has length 1000, expected 1462"
    ):
        list(read_shards(wide, "DR1", on_error="raise"))
    with pytest.raises(InputError, match=r"no_id\.parquet: not a canonical shard"):
        list(read_shards(no_id, "DR1", on_error="raise"))


def test_ingest_shard_with_duplicates_and_bad_rows(tmp_path):
    (tmp_path / "src").mkdir()
    messy_shard(tmp_path / "src" / "a.parquet")
    xp_flux, xp_error = xp_spectrum(2)
    # source 1 again, with a brighter (same S/N) XP: the first in file order wins the tie
    pq.write_table(
        make_shard_table([1, 9], "X", xp_flux=xp_flux, xp_flux_error=xp_error / 2),
        tmp_path / "src" / "b.parquet",
    )
    summary = ingest(tmp_path / "src", tmp_path / "s", "DR1", show_progress=False)
    assert str(summary).startswith(
        "ingested DR1: 4 stars (2 LRS, 3 XP, 1 both) from 2 files, 7 rejected"
    )
    store = Store(tmp_path / "s")
    assert store.shards("DR1").to_table().column("source_id").to_pylist() == [1, 2, 8, 9]
    rejects = store.rejects("DR1")
    dup = rejects.filter(pa.compute.match_substring(rejects.column("reason"), "duplicate"))
    assert dup.to_pylist() == [
        {
            "release": "DR1",
            "file": "a.parquet",
            "row": 0,
            "source_id": 1,
            "obsid": None,
            "reason": "duplicate source_id: XP kept from b.parquet (median S/N 100.0 vs 50.0)",
        }
    ]
    # the XP of source 1 now comes from b.parquet, its LRS from a.parquet
    table = store.shards("DR1").to_table()
    np.testing.assert_allclose(column_matrix(table, "xp_flux_error")[0], xp_error[0] / 2, rtol=1e-6)
    assert table.column("lrs_flux").is_valid().to_pylist() == [True, False, True, False]


def test_gaia_xp_sampled_product_pairs_with_lamost(tmp_path):
    pytest.importorskip("specsearch.surveys.gaia_xp")
    src = tmp_path / "src"
    lamost(src / "spec-1.fits", {"OBSID": 101, "GAIA_SOURCE_ID": G1})
    xp_flux, xp_error = xp_spectrum(2)
    lines = ["source_id,wavelength,flux,flux_error"]
    for source_id, flux, error in zip((G1, G3), xp_flux, xp_error, strict=True):
        lines += [
            f"{source_id},{w:.1f},{f:.9e},{e:.9e}"
            for w, f, e in zip(XP_WAVELENGTH, flux, error, strict=True)
        ]
    (src / "XP_SAMPLED_test.csv").write_text("\n".join(lines) + "\n")
    assert detect_format(src / "XP_SAMPLED_test.csv") == "gaia_xp"
    summary = ingest(src, tmp_path / "s", "DR1", show_progress=False)
    assert str(summary).startswith(
        "ingested DR1: 2 stars (1 LRS, 2 XP, 1 both) from 2 files, 0 rejected"
    )
    table = Store(tmp_path / "s").shards("DR1").to_table()
    assert table.column("source_id").to_pylist() == [G1, G3]
    np.testing.assert_allclose(column_matrix(table, "xp_flux"), xp_flux, rtol=1e-5)
    assert table.column("obsid").to_pylist() == [101, None]


def random_shards(folder, rng, n_files=3, rows=40, pool=70):
    """Shard files drawn from one pool of source_ids: duplicates within and across files, XP of
    random S/N, an LRS (all of S/N 10) for some rows, and an extra column in the first file only.

    Returns {source_id: (xp winner (file, row), its xp_flux, lrs winner (file, row) or None)}."""
    folder.mkdir(parents=True, exist_ok=True)
    candidates, lrs_rows = [], {}
    for f in range(n_files):
        ids = rng.integers(1, pool, rows)
        flux = rng.uniform(1e-16, 2e-16, (rows, N_XP)).astype(np.float32)  # W m^-2 nm^-1
        error = (flux / rng.uniform(5.0, 100.0, (rows, 1))).astype(np.float32)
        lrs = rng.random(rows) < 0.3
        table = make_shard_table(
            ids,
            "X",
            xp_flux=flux,
            xp_flux_error=error,
            lrs_flux=np.where(lrs[:, None], 1.0, np.nan).astype(np.float32) * np.ones(N_LRS),
            lrs_ivar=np.where(lrs[:, None], 100.0, np.nan).astype(np.float32) * np.ones(N_LRS),
        )
        if f == 0:
            table = table.append_column("note", pa.array([f"n{i}" for i in range(rows)]))
        pq.write_table(table, folder / f"part{f}.parquet")
        for i in range(rows):
            snr = float(np.median(flux[i] / error[i]))
            candidates.append((int(ids[i]), -snr, f, i, flux[i]))
            if lrs[i]:  # equal S/N: the first in reading order wins
                lrs_rows.setdefault(int(ids[i]), (f, i))
    best = {}
    for sid, _, f, i, flux in sorted(candidates, key=lambda c: c[:4]):
        best.setdefault(sid, ((f, i), flux, lrs_rows.get(sid)))
    return best


def test_spilled_ingest_equals_in_memory_and_keeps_the_best(tmp_path, monkeypatch):
    import specsearch.surveys.sources as sources_module

    best = random_shards(tmp_path / "src", np.random.default_rng(5))
    ingest(tmp_path / "src", tmp_path / "memory", "DR1", rows_per_batch=16, show_progress=False)
    # every reader batch its own run, 4-row row groups, 7 source_ids merged at a time
    monkeypatch.setattr(sources_module, "_RUN_BYTES", 1)
    monkeypatch.setattr(sources_module, "_RUN_ROW_GROUP", 4)
    monkeypatch.setattr(sources_module, "_MERGE_ROWS", 7)
    summary = ingest(
        tmp_path / "src",
        tmp_path / "spill",
        "DR1",
        rows_per_batch=16,
        rows_per_file=30,
        show_progress=False,
    )
    assert str(summary).startswith(f"ingested DR1: {len(best)} stars")
    spilled, memory = Store(tmp_path / "spill"), Store(tmp_path / "memory")
    files = spilled.shard_files("DR1")
    assert [pq.ParquetFile(f).metadata.num_rows for f in files] == [30] * (len(best) // 30) + (
        [len(best) % 30] if len(best) % 30 else []
    )
    table = spilled.shards("DR1").to_table()
    assert table.equals(memory.shards("DR1").to_table())
    assert spilled.rejects("DR1").equals(memory.rejects("DR1"))
    assert table.column("source_id").to_pylist() == sorted(best)
    expected = np.stack([best[s][1] for s in sorted(best)])
    np.testing.assert_array_equal(column_matrix(table, "xp_flux"), expected)

    def note(where):  # only the first file has the column
        return None if where is None or where[0] != 0 else f"n{where[1]}"

    # scalar columns come from the LRS row, filled from the XP row where null
    expected_notes = [note(best[s][2]) or note(best[s][0]) for s in sorted(best)]
    assert table.column("note").to_pylist() == expected_notes
    assert sum(n is not None for n in expected_notes) > 10
    assert not any(p.name.startswith(".ingest") for p in (tmp_path / "spill").iterdir())


def test_xp_file_failing_part_way_adds_no_rows(tmp_path, monkeypatch):
    import specsearch.surveys.sources as sources_module

    src = tmp_path / "src"
    lamost(src / "spec-1.fits", {"OBSID": 101, "GAIA_SOURCE_ID": G1})
    (src / "xp.csv").write_text("stand-in for an XP product\n")
    xp_flux, xp_error = xp_spectrum(2)

    def fails_part_way(path, release, rows_per_batch):
        yield make_shard_table([G1, G2], release, xp_flux=xp_flux, xp_flux_error=xp_error), None
        raise ValueError("line 2: unexpected end of data")

    real_detect = sources_module.detect_format
    monkeypatch.setattr(
        sources_module,
        "detect_format",
        lambda p: "gaia_xp" if p.name == "xp.csv" else real_detect(p),
    )
    monkeypatch.setattr(sources_module, "read_gaia_xp", fails_part_way)
    monkeypatch.setattr(sources_module, "_RUN_BYTES", 1)
    summary = ingest(src, tmp_path / "s", "DR1", show_progress=False)
    assert str(summary).startswith(
        "ingested DR1: 1 stars (1 LRS, 0 XP, 0 both) from 2 files, 1 rejected"
    )
    reason = Store(tmp_path / "s").rejects("DR1").column("reason").to_pylist()
    assert reason == ["unreadable Gaia XP product: line 2: unexpected end of data"]


def test_failed_first_ingest_leaves_no_store(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text("not spectra\n")
    with pytest.raises(InputError, match="no usable spectra"):
        ingest(tmp_path / "src", tmp_path / "new-store", "DR1", show_progress=False)
    assert not (tmp_path / "new-store").exists()


@pytest.mark.parametrize("run_bytes", [1, 1 << 30])  # spilled runs, or one run in memory
def test_files_disagreeing_on_a_column_type_is_one_line(tmp_path, monkeypatch, run_bytes):
    import specsearch.surveys.sources as sources_module

    monkeypatch.setattr(sources_module, "_RUN_BYTES", run_bytes)
    xp_flux, xp_error = xp_spectrum(1)
    (tmp_path / "src").mkdir()
    for name, value in (("a", pa.array([1.5])), ("b", pa.array(["text"]))):
        table = make_shard_table([int(ord(name))], "X", xp_flux=xp_flux, xp_flux_error=xp_error)
        pq.write_table(table.append_column("extra", value), tmp_path / f"src/{name}.parquet")
    with pytest.raises(InputError, match=r"^\S+src: files disagree on a column type \(.*\)$"):
        ingest(tmp_path / "src", tmp_path / "store", "DR1", show_progress=False)


def test_xp_files_in_worker_processes_give_the_same_release(tmp_path, monkeypatch):
    pytest.importorskip("specsearch.surveys.gaia_xp")
    import specsearch.pool

    started = []
    real_pool = specsearch.pool.ProcessPoolExecutor
    monkeypatch.setattr(
        specsearch.pool,
        "ProcessPoolExecutor",
        lambda n, **kw: started.append(n) or real_pool(n, **kw),
    )
    src = tmp_path / "src"
    src.mkdir()
    xp_flux, xp_error = xp_spectrum(4)
    for i, ids in enumerate(((G1, G2), (G2, G3), (G3, G1))):  # every star twice, S/N differs
        lines = ["source_id,wavelength,flux,flux_error"]
        rows = slice(i, i + 2)
        for source_id, flux, error in zip(
            ids, xp_flux[rows], xp_error[rows] * (i + 1), strict=True
        ):
            lines += [
                f"{source_id},{w:.1f},{f:.9e},{e:.9e}"
                for w, f, e in zip(XP_WAVELENGTH, flux, error, strict=True)
            ]
        (src / f"XP_SAMPLED_{i}.csv").write_text("\n".join(lines) + "\n")
    (src / "XP_SAMPLED_9.csv").write_text("source_id,wavelength,flux,flux_error\n1,336.0,1e-17")
    stores = {}
    for workers in (1, 2):
        stores[workers] = Store(tmp_path / f"s{workers}")
        summary = ingest(src, stores[workers].root, "DR1", workers=workers, show_progress=False)
        assert str(summary).startswith(
            "ingested DR1: 3 stars (0 LRS, 3 XP, 0 both) from 4 files, 4"
        )
    assert started == [2]  # workers=1 reads in this process
    assert stores[2].shards("DR1").to_table().equals(stores[1].shards("DR1").to_table())
    assert stores[2].rejects("DR1").equals(stores[1].rejects("DR1"))
    reasons = stores[2].rejects("DR1").column("reason").to_pylist()
    assert [r.split(" (")[0] for r in reasons[:3]] == [
        "duplicate source_id: XP kept from XP_SAMPLED_0.csv",  # G2 in file 1
        "duplicate source_id: XP kept from XP_SAMPLED_0.csv",  # G1 in file 2
        "duplicate source_id: XP kept from XP_SAMPLED_1.csv",  # G3 in file 2
    ]
    assert reasons[3].startswith("unreadable Gaia XP product: cannot read Gaia XP file")
