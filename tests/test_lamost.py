"""specsearch.surveys.lamost: both FITS layouts onto the canonical LRS grid, and bad input."""

from __future__ import annotations

import gzip

import numpy as np
import pyarrow as pa
import pytest
from astropy.io import fits

from specsearch.errors import InputError
from specsearch.grids import LRS_WAVELENGTH, N_LRS, canonical_lrs, continuum_lrs
from specsearch.schema import SHARD_SCHEMA, column_matrix
from specsearch.surveys.lamost import (
    looks_like_lamost_fits,
    read_lamost,
    read_lamost_file,
    write_lamost_fits,
)

GAIA_ID = 4_295_806_720_124_513_920
# a LAMOST-like native grid, half a pixel off the canonical one: 3909 pixels, 3699.6-9107.6 A
NATIVE = 10.0 ** (3.56815 + 1e-4 * np.arange(3909))


def star(wavelength: np.ndarray, scale: float = 800.0) -> np.ndarray:
    """Smooth continuum with broad absorption lines (sigma 6 A), LAMOST-like flux units."""
    flux = scale * (wavelength / 5000.0) ** -1.5
    for centre in (4102.0, 4341.0, 4861.0, 5175.0):
        flux *= 1 - 0.4 * np.exp(-0.5 * ((wavelength - centre) / 6.0) ** 2)
    return flux


def read_all(paths, **kwargs) -> tuple[pa.Table, pa.Table]:
    shards, rejects = zip(*read_lamost(paths, "DR1", **kwargs), strict=True)
    return pa.concat_tables(shards), pa.concat_tables(rejects)


@pytest.fixture
def good_files(tmp_path):
    ivar = np.full(NATIVE.size, 4e-3)
    image = write_lamost_fits(
        tmp_path / "image.fits",
        NATIVE,
        star(NATIVE),
        ivar,
        header={"OBSID": 101, "DESIGNAT": "J120000.00+300000.0", "GAIA_SOURCE_ID": GAIA_ID},
    )
    table = write_lamost_fits(
        tmp_path / "table.fits",
        NATIVE,
        star(NATIVE),
        ivar,
        layout="table",
        header={"OBSID": 102, "DESIG": "J130000.00+300000.0", "GAIA_ID": str(GAIA_ID + 1)},
    )
    return image, table


def test_both_layouts_round_trip_onto_the_canonical_grid(good_files):
    shards, rejects = read_all(good_files)
    assert rejects.num_rows == 0 and shards.num_rows == 2
    assert shards.schema.names == [*SHARD_SCHEMA.names, "designation"]
    flux, ivar = column_matrix(shards, "lrs_flux"), column_matrix(shards, "lrs_ivar")
    assert flux.shape == (2, N_LRS) and (ivar > 0).all()
    # the same pipeline on the input arrays: the file round trip loses nothing but float32
    expected_flux, expected_ivar = canonical_lrs(NATIVE, star(NATIVE), np.full(NATIVE.size, 4e-3))
    for row in range(2):
        np.testing.assert_allclose(flux[row], expected_flux, rtol=2e-6)
        np.testing.assert_allclose(ivar[row], expected_ivar, rtol=1e-4)
    # and against the analytic spectrum on the canonical grid, normalised the same way
    truth = star(LRS_WAVELENGTH)
    truth = truth / continuum_lrs(truth, np.ones(N_LRS))
    assert np.abs(flux[0] - truth).max() < 2e-3
    assert flux[0].min() == pytest.approx(0.6, abs=0.01)  # the 40% deep lines survive


def test_header_ids(good_files):
    shards, _ = read_all(good_files)
    assert shards.column("source_id").to_pylist() == [GAIA_ID, GAIA_ID + 1]
    assert shards.column("obsid").to_pylist() == [101, 102]
    assert shards.column("designation").to_pylist() == [
        "J120000.00+300000.0",
        "J130000.00+300000.0",
    ]
    assert shards.column("release").to_pylist() == ["DR1", "DR1"]
    spectrum = read_lamost_file(good_files[1])
    assert spectrum.layout == "table" and spectrum.wavelength.shape == (3909,)


def test_missing_gaia_id_falls_back_to_minus_obsid(tmp_path):
    path = write_lamost_fits(
        tmp_path / "a.fits", NATIVE, star(NATIVE), np.ones(NATIVE.size), header={"OBSID": 555}
    )
    shards, rejects = read_all([path])
    assert shards.column("source_id").to_pylist() == [-555]
    assert shards.column("obsid").to_pylist() == [555]
    assert shards.column("designation").to_pylist() == [None]


def test_no_ids_at_all_is_rejected(tmp_path):
    path = write_lamost_fits(tmp_path / "a.fits", NATIVE, star(NATIVE), np.ones(NATIVE.size))
    shards, rejects = read_all([path])
    assert shards.num_rows == 0
    assert rejects.column("reason").to_pylist() == ["no Gaia source_id and no OBSID in the header"]


def test_wavelength_row_without_coeff_keys_and_gzip(tmp_path):
    # linear in lambda, so no COEFF0/COEFF1: the reader must use the wavelength row
    linear = np.linspace(3700.0, 9100.0, 4000)
    path = write_lamost_fits(
        tmp_path / "lin.fits", linear, star(linear), np.ones(linear.size), header={"OBSID": 7}
    )
    assert "COEFF0" not in fits.getheader(path)
    with open(path, "rb") as f, gzip.open(tmp_path / "lin.fits.gz", "wb") as g:
        g.write(f.read())
    shards, rejects = read_all([path, tmp_path / "lin.fits.gz"])
    assert rejects.num_rows == 0
    flux = column_matrix(shards, "lrs_flux")
    np.testing.assert_array_equal(flux[0], flux[1])
    truth = star(LRS_WAVELENGTH)
    assert np.abs(flux[0] - truth / continuum_lrs(truth, np.ones(N_LRS))).max() < 5e-3


def test_andmask_nan_and_negative_ivar_become_ivar_zero(tmp_path):
    flux, ivar = star(NATIVE), np.full(NATIVE.size, 4e-3)
    andmask = np.zeros(NATIVE.size, dtype=int)
    andmask[(NATIVE > 4600) & (NATIVE < 4650)] = 4
    flux[(NATIVE > 5000) & (NATIVE < 5010)] = np.nan
    ivar[(NATIVE > 5300) & (NATIVE < 5320)] = -1.0
    path = write_lamost_fits(
        tmp_path / "m.fits", NATIVE, flux, ivar, header={"OBSID": 9}, andmask=andmask
    )
    shards, rejects = read_all([path])
    assert rejects.num_rows == 0
    out_flux, out_ivar = column_matrix(shards, "lrs_flux")[0], column_matrix(shards, "lrs_ivar")[0]
    assert np.isfinite(out_flux).all()
    for lo, hi in ((4600, 4650), (5000, 5010), (5300, 5320)):
        inside = (LRS_WAVELENGTH > lo + 1.5) & (LRS_WAVELENGTH < hi - 1.5)
        assert inside.sum() > 5 and (out_ivar[inside] == 0).all()
    # bad pixels: the three windows plus one grid pixel each side of each
    expected_bad = sum(
        ((LRS_WAVELENGTH > lo) & (LRS_WAVELENGTH < hi)).sum()
        for lo, hi in ((4600, 4650), (5000, 5010), (5300, 5320))
    )
    assert expected_bad <= (out_ivar == 0).sum() <= expected_bad + 6


def test_mostly_nan_flux_is_rejected_with_a_reason(tmp_path):
    flux = star(NATIVE)
    flux[NATIVE < 5000] = np.nan  # 1309 native pixels; 970 of the 1462 grid pixels lie below 5000 A
    assert (NATIVE < 5000).sum() == 1309 and (LRS_WAVELENGTH < 5000).sum() == 970
    path = write_lamost_fits(
        tmp_path / "nan.fits", NATIVE, flux, np.ones(NATIVE.size), header={"OBSID": 11}
    )
    shards, rejects = read_all([path])
    assert shards.num_rows == 0
    (reject,) = rejects.to_pylist()
    assert reject["file"] == str(path) and reject["obsid"] == 11 and reject["source_id"] == -11
    assert reject["reason"] == (
        # (1462 - 970 - 1 neighbour) / 1462 = 34% good
        "only 34% of the LRS grid has good pixels (1309 NaN/inf flux, 0 negative or non-finite ivar, "
        "0 ANDMASK pixels), needs >= 50%"
    )


def test_red_arm_only_is_rejected_for_coverage(tmp_path):
    red = 10.0 ** (np.log10(5700.0) + 1e-4 * np.arange(2000))
    path = write_lamost_fits(
        tmp_path / "red.fits",
        red,
        star(red),
        np.ones(red.size),
        layout="table",
        header={"OBSID": 12},
    )
    shards, rejects = read_all([path])
    assert shards.num_rows == 0
    assert rejects.column("reason").to_pylist() == [
        "wavelength 5700.0-9031.8 A covers 0% of the LRS grid 3999.4-5598.9 A, needs >= 90%"
    ]
    assert rejects.column("obsid").to_pylist() == [12]


def test_truncated_and_corrupt_files_are_rejected(tmp_path, good_files):
    image, table = good_files
    data = image.read_bytes()
    (tmp_path / "trunc.fits").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.fits").write_bytes(b"not a fits file at all" * 200)
    (tmp_path / "trunc_table.fits").write_bytes(table.read_bytes()[:-20000])
    paths = [
        tmp_path / "trunc.fits",
        tmp_path / "garbage.fits",
        tmp_path / "trunc_table.fits",
        image,
    ]
    shards, rejects = read_all(paths)
    assert shards.column("obsid").to_pylist() == [101]
    reasons = dict(
        zip(rejects.column("file").to_pylist(), rejects.column("reason").to_pylist(), strict=True)
    )
    # one 2880-byte header block, then 5 rows x 3909 pixels x 4 bytes = 81060 bytes
    assert reasons[str(tmp_path / "trunc.fits")] == (
        f"truncated FITS: the file has {len(data) // 2} bytes, its headers announce 81060"
    )
    assert reasons[str(tmp_path / "trunc_table.fits")].startswith("truncated FITS: the file has ")
    assert reasons[str(tmp_path / "garbage.fits")].startswith("corrupt or truncated FITS: ")
    # a truncated file still has a readable header: its ids go into the rejects row
    assert rejects.filter(
        pa.compute.equal(rejects.column("file"), str(tmp_path / "trunc.fits"))
    ).column("obsid").to_pylist() == [101]


def test_on_error_raise_gives_one_line_naming_the_file(tmp_path, good_files):
    bad = tmp_path / "trunc.fits"
    bad.write_bytes(good_files[0].read_bytes()[:5000])
    with pytest.raises(InputError) as err:
        read_all([good_files[0], bad], on_error="raise")
    message = str(err.value)
    assert message.startswith(f"{bad}: truncated FITS") and "\n" not in message
    with pytest.raises(InputError, match=r"nonexistent\.fits: no such file$"):
        read_lamost_file(tmp_path / "nonexistent.fits")


def test_batches_keep_file_order(tmp_path):
    paths = [
        write_lamost_fits(
            tmp_path / f"s{i}.fits",
            NATIVE,
            star(NATIVE, 100.0 * (i + 1)),
            np.ones(NATIVE.size),
            header={"OBSID": 1000 + i},
        )
        for i in range(5)
    ]
    batches = list(read_lamost(paths, "DR1", batch_size=2, provenance=True))
    assert [b[0].num_rows for b in batches] == [2, 2, 1]
    shards = pa.concat_tables([b[0] for b in batches])
    assert shards.column("obsid").to_pylist() == [1000, 1001, 1002, 1003, 1004]
    assert shards.column("_file").to_pylist() == [str(p) for p in paths]
    # normalisation removes the flux scale: all five are the same spectrum
    flux = column_matrix(shards, "lrs_flux")
    np.testing.assert_allclose(flux, flux[[0]].repeat(5, axis=0), rtol=1e-5)


def test_looks_like_lamost_fits(tmp_path, good_files):
    image, table = good_files
    assert looks_like_lamost_fits(image) and looks_like_lamost_fits(table)
    truncated = tmp_path / "t.fits"
    truncated.write_bytes(image.read_bytes()[:3000])  # header intact, data cut
    assert looks_like_lamost_fits(truncated)
    plain = tmp_path / "plain.fits"
    fits.PrimaryHDU(np.zeros((3, 3))).writeto(plain)
    assert not looks_like_lamost_fits(plain)
    text = tmp_path / "notes.txt"
    text.write_text("SIMPLE but not FITS")
    assert not looks_like_lamost_fits(text)
    assert not looks_like_lamost_fits(tmp_path / "missing.fits")


def test_write_lamost_fits_layouts(tmp_path):
    path = write_lamost_fits(
        tmp_path / "a.fits", NATIVE, star(NATIVE), np.ones(NATIVE.size), header={"OBSID": 3}
    )
    with fits.open(path) as hdul:
        assert hdul[0].data.shape == (5, 3909)
        assert hdul[0].header["COEFF0"] == pytest.approx(3.56815) and hdul[0].header[
            "COEFF1"
        ] == pytest.approx(1e-4)
    path = write_lamost_fits(
        tmp_path / "b.fits", NATIVE, star(NATIVE), np.ones(NATIVE.size), layout="table"
    )
    with fits.open(path) as hdul:
        assert hdul[1].name == "COADD" and hdul[1].data["FLUX"].shape == (1, 3909)
    with pytest.raises(ValueError, match="layout"):
        write_lamost_fits(tmp_path / "c.fits", NATIVE, NATIVE, NATIVE, layout="cube")


def test_worker_processes_give_the_same_rows_and_rejects(tmp_path, good_files, monkeypatch):
    import specsearch.pool

    image, table = good_files
    data = image.read_bytes()
    (tmp_path / "trunc.fits").write_bytes(data[: len(data) // 2])
    paths = [image, tmp_path / "trunc.fits", table] * 4  # 12 files, 3 batches of 5
    started = []
    real_pool = specsearch.pool.ProcessPoolExecutor
    monkeypatch.setattr(
        specsearch.pool,
        "ProcessPoolExecutor",
        lambda n, **kw: started.append(n) or real_pool(n, **kw),
    )
    alone = read_all(paths, batch_size=5)
    assert started == []  # workers=1: no pool
    pooled = read_all(paths, batch_size=5, workers=2)
    assert started == [2]
    assert pooled[0].equals(alone[0]) and pooled[1].equals(alone[1])
    assert pooled[0].column("obsid").to_pylist() == [101, 102] * 4
    # the truncated file's ids travel back from the worker with its reason
    assert pooled[1].column("obsid").to_pylist() == [101] * 4
    assert all(r.startswith("truncated FITS") for r in pooled[1].column("reason").to_pylist())
    with pytest.raises(InputError, match=r"trunc\.fits: truncated FITS"):
        read_all(paths, batch_size=5, workers=2, on_error="raise")
