"""Gaia XP readers and the batched continuous -> sampled conversion, against GaiaXPy and the archive.

Real data: the single-star datalink products (Gaia DR3 5937083312263887616) that astroquery ships
for its own tests, in CSV, ECSV, FITS and VOTable. GaiaXPy is called twice, on small inputs.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import io
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from specsearch.errors import InputError
from specsearch.grids import N_XP, XP_WAVELENGTH
from specsearch.schema import REJECTS_SCHEMA, SHARD_SCHEMA, column_matrix
from specsearch.surveys import gaia_xp
from specsearch.surveys.gaia_xp import (
    BANDS,
    N_XP_BASES,
    coefficient_covariance,
    continuous_to_sampled,
    design_matrix,
    looks_like_gaia_xp,
    read_gaia_xp,
    read_xp_continuous,
    read_xp_sampled,
    sampled_from_columns,
)

STAR = 5937083312263887616
FORMATS = ("csv", "ecsv", "fits", "vot")
N_PERTURBED = 20
# the archive's XP_SAMPLED differs from GaiaXPy's (and our) conversion of its own XP_CONTINUOUS by
# up to 4.04e-6 relative in flux and 1.7e-6 in flux_error (noise-like, not float32 rounding)
ARCHIVE_RTOL = 5e-6
GAIAXPY_RTOL = 1e-12  # achieved: ~2e-15


def _archive_zip(fmt: str) -> Path:
    spec = importlib.util.find_spec("astroquery")
    if spec is None or spec.origin is None:
        pytest.skip("astroquery is not installed")
    path = Path(spec.origin).parent / "gaia" / "tests" / "data"
    path = path / f"gaia_dr3_source_id_{STAR}_dl_products_{fmt}.zip"
    if not path.is_file():
        pytest.skip(f"astroquery lacks {path.name}")
    return path


def _member(fmt: str, product: str, tmp_path: Path) -> Path:
    """Extract one product of the archive zip to tmp_path."""
    with zipfile.ZipFile(_archive_zip(fmt)) as archive:
        name = next(n for n in archive.namelist() if n.startswith(product))
        return Path(archive.extract(name, tmp_path))


def _text_array(values: np.ndarray) -> str:
    return "(" + ", ".join(repr(float(v)) for v in values) + ")"


@pytest.fixture(scope="module")
def star() -> dict[str, np.ndarray]:
    """The real star's XP_CONTINUOUS row, parsed independently of the reader (csv module)."""
    with zipfile.ZipFile(_archive_zip("csv")) as archive:
        name = next(n for n in archive.namelist() if n.startswith("XP_CONTINUOUS"))
        row = next(csv.DictReader(io.StringIO(archive.read(name).decode())))
    return {
        key: np.array([float(v) for v in value.strip("()").split(",")])
        if value.startswith("(")
        else float(value)
        for key, value in row.items()
    }


@pytest.fixture(scope="module")
def archive_sampled() -> dict[str, np.ndarray]:
    with zipfile.ZipFile(_archive_zip("csv")) as archive:
        name = next(n for n in archive.namelist() if n.startswith("XP_SAMPLED"))
        rows = list(csv.DictReader(io.StringIO(archive.read(name).decode())))
    return {
        key: np.array([float(r[key]) for r in rows]) for key in ("wavelength", "flux", "flux_error")
    }


@pytest.fixture(scope="module")
def perturbed(star) -> dict[str, np.ndarray]:
    """20 sources: the star's coefficients drawn from its own covariance, errors scaled by 0.5-2,
    correlations shrunk by 0.5-1 (still a valid correlation matrix), standard deviations 0.8-1.5,
    and four band spectra truncated to 12-54 bases."""
    rng = np.random.default_rng(20250701)
    sources: dict[str, np.ndarray] = {"source_id": np.arange(1, N_PERTURBED + 1, dtype=np.int64)}
    for band in BANDS:
        errors, correlations = (
            star[f"{band}_coefficient_errors"],
            star[f"{band}_coefficient_correlations"],
        )
        chol = np.linalg.cholesky(coefficient_covariance(errors[None], correlations[None])[0])
        noise = rng.standard_normal((N_PERTURBED, N_XP_BASES)) @ chol.T
        sources[f"{band}_coefficients"] = star[f"{band}_coefficients"] + noise
        sources[f"{band}_coefficient_errors"] = errors * rng.uniform(0.5, 2.0, (N_PERTURBED, 1))
        sources[f"{band}_coefficient_correlations"] = correlations * rng.uniform(
            0.5, 1.0, (N_PERTURBED, 1)
        )
        sources[f"{band}_standard_deviation"] = rng.uniform(0.8, 1.5, N_PERTURBED)
        sources[f"{band}_n_relevant_bases"] = np.full(N_PERTURBED, N_XP_BASES)
    sources["bp_n_relevant_bases"][[3, 7]] = [30, 12]
    sources["rp_n_relevant_bases"][[3, 9]] = [54, 20]
    return sources


def _truncated(
    sources: dict[str, np.ndarray], band: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A band's arrays zero beyond n_relevant_bases, as a file with n_parameters = p stores them."""
    p = sources[f"{band}_n_relevant_bases"][:, None]
    keep = np.arange(N_XP_BASES) < p
    keep_corr = np.arange(N_XP_BASES * (N_XP_BASES - 1) // 2) < p * (p - 1) // 2
    return (
        np.where(keep, sources[f"{band}_coefficients"], 0.0),
        np.where(keep, sources[f"{band}_coefficient_errors"], 0.0),
        np.where(keep_corr, sources[f"{band}_coefficient_correlations"], 0.0),
    )


@pytest.fixture(scope="module")
def gaiaxpy_spectra(perturbed) -> tuple[np.ndarray, np.ndarray]:
    """gaiaxpy.calibrate (default sampling, truncation to each row's n_relevant_bases) of the 20."""
    gaiaxpy = pytest.importorskip("gaiaxpy")
    import pandas as pd

    frame = pd.DataFrame({"source_id": perturbed["source_id"]})
    for band in BANDS:
        frame[f"{band}_n_parameters"] = N_XP_BASES
        for name in ("coefficients", "coefficient_errors", "coefficient_correlations"):
            frame[f"{band}_{name}"] = list(perturbed[f"{band}_{name}"])
        for name in ("standard_deviation", "n_relevant_bases"):
            frame[f"{band}_{name}"] = perturbed[f"{band}_{name}"]
    spectra, sampling = gaiaxpy.calibrate(frame, truncation=True, save_file=False)
    np.testing.assert_allclose(sampling, XP_WAVELENGTH, rtol=0, atol=1e-9)
    spectra = spectra.sort_values("source_id")
    return np.stack(spectra["flux"]), np.stack(spectra["flux_error"])


def _ours(sources: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    (bp, bp_err, bp_corr), (rp, rp_err, rp_corr) = (_truncated(sources, band) for band in BANDS)
    return continuous_to_sampled(
        bp,
        rp,
        bp_coefficient_errors=bp_err,
        bp_coefficient_correlations=bp_corr,
        rp_coefficient_errors=rp_err,
        rp_coefficient_correlations=rp_corr,
    )


def _max_relative(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.max(np.abs(ours / reference - 1.0)))


# ------------------------------------------------------------------------ design matrix, conversion


def test_shipped_design_matrix_equals_a_fresh_gaiaxpy_build():
    pytest.importorskip("gaiaxpy")
    fresh = gaia_xp.build_design_matrix()  # also checks that zero coefficients give zero flux
    shipped = gaia_xp.load_shipped_design_matrix()
    assert shipped is not None and shipped.shape == (2 * N_XP_BASES, N_XP)
    np.testing.assert_array_equal(shipped, fresh)
    assert not design_matrix().flags.writeable
    # BP ends at 643 nm and RP starts at 635 nm: merge weights zero the bases outside their band
    assert np.all(fresh[:N_XP_BASES, XP_WAVELENGTH > 643] == 0)
    assert np.all(fresh[N_XP_BASES:, XP_WAVELENGTH < 635] == 0)


def test_batched_conversion_equals_gaiaxpy_calibrate(perturbed, gaiaxpy_spectra):
    flux, flux_error = _ours(perturbed)
    reference_flux, reference_error = gaiaxpy_spectra
    assert flux.shape == flux_error.shape == (N_PERTURBED, N_XP)
    # varied standard deviations, errors, correlations and truncations all agree to rounding
    assert _max_relative(flux, reference_flux) < GAIAXPY_RTOL
    assert _max_relative(flux_error, reference_error) < GAIAXPY_RTOL


def test_covariance_path_equals_correlation_path(perturbed, gaiaxpy_spectra):
    (bp, bp_err, bp_corr), (rp, rp_err, rp_corr) = (_truncated(perturbed, band) for band in BANDS)
    _, flux_error = continuous_to_sampled(
        bp, rp, coefficient_covariance(bp_err, bp_corr), coefficient_covariance(rp_err, rp_corr)
    )
    assert _max_relative(flux_error, gaiaxpy_spectra[1]) < GAIAXPY_RTOL
    flux, no_error = continuous_to_sampled(bp, rp)
    assert no_error is None
    assert _max_relative(flux, gaiaxpy_spectra[0]) < GAIAXPY_RTOL


def test_correlation_order_is_the_archives_column_major_upper_triangle(perturbed, gaiaxpy_spectra):
    covariance = coefficient_covariance(
        np.ones((1, 4)), np.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    )[0]
    expected = np.array(
        [[1, 0.1, 0.2, 0.4], [0.1, 1, 0.3, 0.5], [0.2, 0.3, 1, 0.6], [0.4, 0.5, 0.6, 1]]
    )
    np.testing.assert_array_equal(covariance[:4, :4], expected)
    assert np.all(covariance[4:] == 0) and np.all(covariance[:, 4:] == 0)
    # row-major upper triangle, the other plausible reading, is measurably wrong
    bp, bp_err, bp_corr = _truncated(perturbed, "bp")
    rows, cols = np.triu_indices(N_XP_BASES, k=1)
    matrix = np.zeros((N_PERTURBED, N_XP_BASES, N_XP_BASES))
    matrix[:, rows, cols] = bp_corr
    matrix[:, cols, rows] = bp_corr
    matrix[:, np.arange(N_XP_BASES), np.arange(N_XP_BASES)] = 1.0
    wrong_bp_cov = bp_err[:, :, None] * matrix * bp_err[:, None, :]
    rp, rp_err, rp_corr = _truncated(perturbed, "rp")
    _, wrong = continuous_to_sampled(bp, rp, wrong_bp_cov, coefficient_covariance(rp_err, rp_corr))
    assert _max_relative(wrong, gaiaxpy_spectra[1]) > 1e-3


def test_single_source_and_input_checks(perturbed):
    flux, _ = continuous_to_sampled(
        perturbed["bp_coefficients"][0], perturbed["rp_coefficients"][0]
    )
    assert flux.shape == (1, N_XP)
    with pytest.raises(ValueError, match="bp_coefficients"):
        continuous_to_sampled(np.zeros((2, 56)), np.zeros((2, 55)))
    with pytest.raises(ValueError, match="rp_coefficient_correlations"):
        continuous_to_sampled(
            np.zeros((2, 55)),
            np.zeros((2, 55)),
            bp_coefficient_errors=np.ones((2, 55)),
            bp_coefficient_correlations=np.zeros((2, 1485)),
            rp_coefficient_errors=np.ones((2, 55)),
        )


# ------------------------------------------------------------------------ the archive's products


@pytest.mark.parametrize("fmt", FORMATS)
def test_archive_zip_continuous_reproduces_the_archive_sampled_spectrum(fmt):
    path = _archive_zip(fmt)
    assert looks_like_gaia_xp(path)
    ((continuous, continuous_rejects),) = list(read_gaia_xp(path, "DR3"))
    ((sampled, sampled_rejects),) = list(read_xp_sampled(path, "DR3"))
    assert continuous.schema.equals(SHARD_SCHEMA) and sampled.schema.equals(SHARD_SCHEMA)
    assert continuous_rejects.num_rows == sampled_rejects.num_rows == 0
    assert continuous["source_id"].to_pylist() == sampled["source_id"].to_pylist() == [STAR]
    assert continuous["release"].to_pylist() == ["DR3"]
    for column in ("xp_flux", "xp_flux_error"):
        ours = column_matrix(continuous, column).astype(np.float64)
        archive = column_matrix(sampled, column).astype(np.float64)
        assert _max_relative(ours, archive) < ARCHIVE_RTOL


def test_real_star_matches_the_archive_sampled_product_to_its_precision(star, archive_sampled):
    flux, flux_error = sampled_from_columns(star)
    np.testing.assert_allclose(archive_sampled["wavelength"], XP_WAVELENGTH, rtol=0, atol=1e-9)
    # the archive's own XP_SAMPLED is 1e-6 to 4e-6 away from the exact conversion of its coefficients
    assert 1e-6 < _max_relative(flux[0], archive_sampled["flux"]) < ARCHIVE_RTOL
    assert _max_relative(flux_error[0], archive_sampled["flux_error"]) < ARCHIVE_RTOL


@pytest.mark.parametrize("fmt", FORMATS)
def test_single_product_files_are_read_and_detected(fmt, tmp_path):
    continuous = _member(fmt, "XP_CONTINUOUS", tmp_path)
    sampled = _member(fmt, "XP_SAMPLED", tmp_path)  # source_id in the header for ecsv, fits, vot
    assert looks_like_gaia_xp(continuous) and looks_like_gaia_xp(sampled)
    ((from_continuous, _),) = list(read_xp_continuous(continuous, "DR3"))
    ((from_sampled, _),) = list(read_gaia_xp(sampled, "DR3"))
    assert (
        from_continuous["source_id"].to_pylist() == from_sampled["source_id"].to_pylist() == [STAR]
    )
    with pytest.raises(InputError, match="not a Gaia XP_CONTINUOUS table"):
        list(read_xp_continuous(sampled, "DR3"))


def test_gzipped_ecsv(tmp_path):
    ecsv = _member("ecsv", "XP_CONTINUOUS", tmp_path)
    packed = tmp_path / "XpContinuousMeanSpectrum_000000-003111.ecsv.gz"
    packed.write_bytes(gzip.compress(ecsv.read_bytes()))
    ((shards, _),) = list(read_gaia_xp(packed, "DR3"))
    ((direct, _),) = list(read_gaia_xp(ecsv, "DR3"))
    assert shards.equals(direct)


# ------------------------------------------------------------------------ batches and rejects


def _continuous_file_rows(perturbed) -> list[dict[str, object]]:
    """20 good sources (four truncated: n_parameters < 55) then six bad rows, as archive CSV text."""
    rows = []
    for i in range(N_PERTURBED):
        row: dict[str, object] = {"source_id": int(perturbed["source_id"][i])}
        for band in BANDS:
            coefficients, errors, correlations = (a[i] for a in _truncated(perturbed, band))
            p = int(perturbed[f"{band}_n_relevant_bases"][i])
            row[f"{band}_n_parameters"] = p
            row[f"{band}_standard_deviation"] = float(perturbed[f"{band}_standard_deviation"][i])
            row[f"{band}_coefficients"] = _text_array(coefficients[:p])
            row[f"{band}_coefficient_errors"] = _text_array(errors[:p])
            row[f"{band}_coefficient_correlations"] = _text_array(correlations[: p * (p - 1) // 2])
        rows.append(row)
    good = rows[0]
    with_nan = perturbed["bp_coefficients"][0].copy()
    with_nan[5] = np.nan
    nan_row = dict(good, source_id=101, bp_coefficients=_text_array(with_nan))
    no_rp = dict(
        good,
        source_id=102,
        rp_coefficients="",
        rp_coefficient_errors="",
        rp_coefficient_correlations="",
    )
    duplicate = dict(rows[1])
    not_a_number = dict(
        good,
        source_id=103,
        rp_coefficient_errors=good["rp_coefficient_errors"].replace("(", "(abc, ", 1),
    )
    short = dict(
        good, source_id=104, bp_coefficients=_text_array(perturbed["bp_coefficients"][0][:54])
    )
    no_id = dict(good, source_id="")
    return rows + [nan_row, no_rp, duplicate, not_a_number, short, no_id]


EXPECTED_REASONS = {
    20: "non-finite value in bp_coefficients",
    21: "missing RP spectrum (no rp_coefficients)",
    22: "duplicate source_id",
    23: "rp_coefficient_errors holds a value that is not a number",
    24: "bp_coefficients has 54 values but bp_n_parameters is 55",
    25: "missing source_id",
}


def _write_csv(rows: list[dict[str, object]], path: Path) -> Path:
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _read_all(reader) -> tuple[list[int], pa.Table, pa.Table]:
    batches = list(reader)
    shards = pa.concat_tables([b[0] for b in batches])
    rejects = pa.concat_tables([b[1] for b in batches])
    return [b[0].num_rows + b[1].num_rows for b in batches], shards, rejects


def test_csv_batches_convert_and_reject_with_reasons(perturbed, gaiaxpy_spectra, tmp_path):
    path = _write_csv(_continuous_file_rows(perturbed), tmp_path / "xp_continuous.csv")
    sizes, shards, rejects = _read_all(read_xp_continuous(path, "DR3", batch_size=8))
    assert sizes == [8, 8, 8, 2]
    assert shards["source_id"].to_pylist() == list(range(1, N_PERTURBED + 1))
    reference_flux, reference_error = gaiaxpy_spectra
    # float32 storage in the shard is the only difference from GaiaXPy
    assert _max_relative(column_matrix(shards, "xp_flux"), reference_flux) < 1e-7
    assert _max_relative(column_matrix(shards, "xp_flux_error"), reference_error) < 1e-7
    assert rejects.schema.equals(REJECTS_SCHEMA)
    assert (
        dict(zip(rejects["row"].to_pylist(), rejects["reason"].to_pylist(), strict=True))
        == EXPECTED_REASONS
    )
    assert set(rejects["file"].to_pylist()) == {str(path)}
    assert rejects["source_id"].to_pylist()[-1] is None


def test_parquet_list_columns_give_the_same_spectra(perturbed, tmp_path):
    rows = _continuous_file_rows(perturbed)[:N_PERTURBED]
    columns = {key: [row[key] for row in rows] for key in rows[0]}
    for key, values in columns.items():
        if isinstance(values[0], str):
            columns[key] = [[float(v) for v in text.strip("()").split(",")] for text in values]
    path = tmp_path / "xp_continuous.parquet"
    pq.write_table(pa.table(columns), path)
    _, from_parquet, rejects = _read_all(read_gaia_xp(path, "DR3", batch_size=7))
    _, from_csv, _ = _read_all(read_gaia_xp(_write_csv(rows, tmp_path / "same.csv"), "DR3"))
    assert rejects.num_rows == 0
    assert from_parquet.equals(from_csv)


@pytest.mark.parametrize("suffix", ["fits", "xml"])
def test_multi_row_fits_and_votable_with_variable_length_arrays(perturbed, suffix, tmp_path):
    from astropy.table import Table

    rows = _continuous_file_rows(perturbed)[:N_PERTURBED]  # four rows have n_parameters < 55
    columns = {}
    for key in rows[0]:
        values = [row[key] for row in rows]
        if isinstance(values[0], str):
            cells = np.empty(len(values), dtype=object)
            cells[:] = [
                np.array([float(v) for v in text.strip("()").split(",")]) for text in values
            ]
            values = cells
        columns[key] = values
    path = tmp_path / f"XP_CONTINUOUS_COMBINED.{suffix}"
    Table(columns).write(path, format="votable" if suffix == "xml" else "fits")
    _, shards, rejects = _read_all(read_gaia_xp(path, "DR3", batch_size=6))
    _, from_csv, _ = _read_all(read_gaia_xp(_write_csv(rows, tmp_path / "same.csv"), "DR3"))
    assert rejects.num_rows == 0
    assert shards.equals(from_csv)


def test_array_text_cells():
    text = pa.array(["(1, 2.5)", "[3.0,null]", "", None, "null", "(1E-3, x)", "[-Infinity]"])
    values, counts, unparseable = gaia_xp._ragged_matrix(text, 3)
    np.testing.assert_array_equal(counts, [2, 2, 0, 0, 0, 2, 1])
    np.testing.assert_array_equal(unparseable, [0, 0, 0, 0, 0, 1, 0])
    np.testing.assert_array_equal(values[0], [1.0, 2.5, np.nan])
    np.testing.assert_array_equal(values[1], [3.0, np.nan, np.nan])
    assert values[6, 0] == -np.inf


def test_array_text_fast_path_agrees_with_the_careful_one():
    # cells the fast path (', ' joined numbers only) takes, alone and mixed with ones it cannot
    plain = ["(1.0, 2.5, -3e-05)", "[4,5]", "(6.25)"]
    values, counts, unparseable = gaia_xp._ragged_matrix(pa.array(plain), 3)
    np.testing.assert_array_equal(counts, [3, 2, 1])
    np.testing.assert_array_equal(values[0], [1.0, 2.5, -3e-05])
    assert not unparseable.any()
    mixed, mixed_counts, _ = gaia_xp._ragged_matrix(pa.array([*plain, "(7, null)"]), 3)
    np.testing.assert_array_equal(mixed[:3], values)
    np.testing.assert_array_equal(mixed_counts[:3], counts)
    # two numbers without a comma are one bad token, never the number 12
    values, counts, unparseable = gaia_xp._ragged_matrix(pa.array(["(1 2)", "(3)"]), 3)
    np.testing.assert_array_equal(counts, [1, 1])
    np.testing.assert_array_equal(unparseable, [1, 0])
    assert np.isnan(values[0, 0])


# ------------------------------------------------------------------------ sampled layouts


def _long_rows(source_ids, archive_sampled, wavelength=XP_WAVELENGTH) -> list[dict[str, object]]:
    rows = []
    for k, source_id in enumerate(source_ids):
        order = np.arange(len(wavelength))[:: -1 if k % 2 else 1]  # odd sources: reversed rows
        for i in order:
            rows.append(
                {
                    "source_id": source_id,
                    "wavelength": float(wavelength[i]),
                    "flux": (k + 1) * archive_sampled["flux"][i],
                    "flux_error": archive_sampled["flux_error"][i],
                }
            )
    return rows


def test_long_sampled_streams_across_batches(archive_sampled, tmp_path):
    path = _write_csv(
        _long_rows([11, 12, 13, 14, 15], archive_sampled), tmp_path / "XP_SAMPLED.csv"
    )
    sizes, shards, rejects = _read_all(read_gaia_xp(path, "DR3", batch_size=2))
    assert sizes == [2, 2, 1] and rejects.num_rows == 0
    assert shards["source_id"].to_pylist() == [11, 12, 13, 14, 15]
    flux = column_matrix(shards, "xp_flux")
    np.testing.assert_allclose(flux / flux[0], np.arange(1, 6)[:, None] * np.ones(N_XP), rtol=1e-6)
    np.testing.assert_allclose(
        column_matrix(shards, "xp_flux_error")[3], archive_sampled["flux_error"], rtol=1e-6
    )


def test_long_sampled_rejects_a_source_with_missing_rows(archive_sampled, tmp_path):
    rows = _long_rows([11, 12, 13], archive_sampled)
    del rows[343 + 100]
    rows[2 * 343 + 5]["flux"] = "nan"
    path = _write_csv(rows, tmp_path / "XP_SAMPLED.csv")
    _, shards, rejects = _read_all(read_xp_sampled(path, "DR3"))
    assert shards["source_id"].to_pylist() == [11]
    assert rejects["source_id"].to_pylist() == [12, 13]
    assert rejects["row"].to_pylist() == [343, 2 * 343 - 1]
    assert rejects["reason"].to_pylist() == [
        f"342 wavelength rows that are not {gaia_xp.GRID_TEXT}",
        "non-finite value in flux",
    ]


def test_sampled_on_another_grid_raises(archive_sampled, tmp_path):
    other = np.arange(400.0, 802.0, 2.0)
    path = _write_csv(_long_rows([11], archive_sampled, other), tmp_path / "XP_SAMPLED.csv")
    with pytest.raises(
        InputError, match=r"different wavelength grid.*\(first source: 201 samples at 400-800 nm\)"
    ):
        list(read_xp_sampled(path, "DR3"))
    wide = tmp_path / "xp_sampled.parquet"
    pq.write_table(
        pa.table({"source_id": [1], "flux": [np.ones(200)], "flux_error": [np.ones(200)]}), wide
    )
    with pytest.raises(InputError, match="200 samples"):
        list(read_xp_sampled(wide, "DR3"))


def test_wide_sampled_layouts(archive_sampled, tmp_path):
    flux, flux_error = archive_sampled["flux"], archive_sampled["flux_error"]
    bad = flux.copy()
    bad[7] = np.inf
    table = pa.table(
        {
            "source_id": [1, 2, 1, 3],
            "flux": [flux, 2 * flux, flux, bad],
            "flux_error": [flux_error, flux_error, flux_error, flux_error],
        }
    )
    pq.write_table(table, tmp_path / "wide.parquet")
    rows = [
        {"source_id": s, "flux": _text_array(f), "flux_error": _text_array(e)}
        for s, f, e in zip(
            [1, 2, 1, 3], table["flux"].to_pylist(), table["flux_error"].to_pylist(), strict=True
        )
    ]
    _write_csv(rows, tmp_path / "wide.csv")  # GaiaXPy's own output layout
    for name in ("wide.parquet", "wide.csv"):
        _, shards, rejects = _read_all(read_gaia_xp(tmp_path / name, "DR3"))
        assert shards["source_id"].to_pylist() == [1, 2]
        np.testing.assert_allclose(column_matrix(shards, "xp_flux")[1], 2 * flux, rtol=1e-7)
        assert rejects["reason"].to_pylist() == ["duplicate source_id", "non-finite value in flux"]


# ------------------------------------------------------------------------ bad files


def _assert_one_line_error(path: Path, reader=read_gaia_xp) -> None:
    with pytest.raises(InputError) as caught:
        list(reader(path, "DR3"))
    message = str(caught.value)
    assert "\n" not in message and path.name in message


def test_truncated_and_corrupt_files_raise_one_line_input_errors(perturbed, tmp_path):
    for fmt in ("fits", "vot", "csv"):
        whole = _member(fmt, "XP_CONTINUOUS", tmp_path).read_bytes()
        for cut in (len(whole) // 3, 2 * len(whole) // 3):
            truncated = tmp_path / f"truncated_{cut}.{'xml' if fmt == 'vot' else fmt}"
            truncated.write_bytes(whole[:cut])
            _assert_one_line_error(truncated, read_xp_continuous)
    csv_path = _write_csv(_continuous_file_rows(perturbed)[:3], tmp_path / "ok.csv")
    cut_csv = tmp_path / "cut.csv"
    cut_csv.write_bytes(csv_path.read_bytes()[:-5000])
    _assert_one_line_error(cut_csv)
    parquet = tmp_path / "ok.parquet"
    pq.write_table(
        pa.table({"source_id": [1], "flux": [np.ones(N_XP)], "flux_error": [np.ones(N_XP)]}),
        parquet,
    )
    cut_parquet = tmp_path / "cut.parquet"
    cut_parquet.write_bytes(parquet.read_bytes()[:-40])
    _assert_one_line_error(cut_parquet, read_xp_sampled)
    cut_zip = tmp_path / "cut.zip"
    cut_zip.write_bytes(_archive_zip("fits").read_bytes()[:20000])
    _assert_one_line_error(cut_zip)
    garbage = tmp_path / "garbage.fits"
    garbage.write_bytes(b"SIMPLE  = nonsense" * 200)
    _assert_one_line_error(garbage, read_xp_continuous)


def test_looks_like_gaia_xp_is_cheap_and_never_raises(tmp_path):
    from astropy.io import fits

    lamost = tmp_path / "spec-55859-F5902_sp01-001.fits"
    columns = [
        fits.Column(name=n, format="10E", array=np.ones((1, 10)))
        for n in ("FLUX", "IVAR", "WAVELENGTH")
    ]
    fits.BinTableHDU.from_columns(columns).writeto(lamost)
    other = tmp_path / "catalog.csv"
    other.write_text("source_id,teff\n1,5000\n")
    assert not looks_like_gaia_xp(lamost)
    assert not looks_like_gaia_xp(other)
    assert not looks_like_gaia_xp(tmp_path / "missing.csv")
    assert not looks_like_gaia_xp(tmp_path)
    with pytest.raises(InputError, match="not a Gaia XP product"):
        list(read_gaia_xp(other, "DR3"))
