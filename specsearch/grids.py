"""The one place that defines specsearch's wavelength grids and spectrum preprocessing.

Every array function here works on a batch: arrays of shape ``(n_stars, n_pixels)`` (a single
spectrum may be passed as 1-D and comes back 1-D). Bad pixels carry inverse variance 0 and a
finite flux, never NaN.
"""

from __future__ import annotations

import numpy as np

# --- LAMOST low-resolution grid (SpecCLIP's): log10(lambda / A) = 3.602 + 1e-4 i, i = 0..1461
LRS_LOGLAM_START = 3.602
LRS_LOGLAM_STEP = 1e-4
N_LRS = 1462
LRS_LOGLAM = LRS_LOGLAM_START + LRS_LOGLAM_STEP * np.arange(N_LRS)
LRS_WAVELENGTH = 10.0**LRS_LOGLAM  # Angstrom, vacuum, 3999.5 - 5598.4

# --- Gaia DR3 XP sampled grid: 336-1020 nm in 2 nm steps
N_XP = 343
XP_WAVELENGTH = np.linspace(336.0, 1020.0, N_XP)  # nm
XP_NORM_WINDOW_NM = (500.0, 600.0)
XP_NORM_SLICE = slice(
    int(np.searchsorted(XP_WAVELENGTH, XP_NORM_WINDOW_NM[0])),
    int(np.searchsorted(XP_WAVELENGTH, XP_NORM_WINDOW_NM[1], side="right")),
)
XP_INDEX_550NM = 107  # the published SpecCLIP normalisation pixel, kept for reference

# A resampled pixel needs this fraction of the canonical grid to be covered by the input.
MIN_LRS_COVERAGE = 0.9


def _as_batch(a: np.ndarray) -> tuple[np.ndarray, bool]:
    a = np.asarray(a)
    return (a[None, :], True) if a.ndim == 1 else (a, False)


def clean_flux_ivar(flux: np.ndarray, ivar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return copies where non-finite flux, non-finite or negative ivar become ivar 0, flux 0."""
    flux = np.array(flux, dtype=np.float64, copy=True)
    ivar = np.array(ivar, dtype=np.float64, copy=True)
    bad = ~np.isfinite(flux) | ~np.isfinite(ivar) | (ivar < 0)
    flux[bad] = 0.0
    ivar[bad] = 0.0
    return flux, ivar


def resample_lrs(
    wavelength: np.ndarray, flux: np.ndarray, ivar: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Resample spectra onto the canonical LRS grid by linear interpolation in log lambda.

    wavelength: (n, m) or (m,) in Angstrom, increasing along the last axis (one per spectrum or shared).
    flux, ivar: (n, m) or (m,). Returns (flux, ivar) of shape (n, 1462) float32.
    Variance propagates through the interpolation weights, var = (1-w)^2 var_i + w^2 var_{i+1};
    a grid pixel outside the input coverage, or next to a bad input pixel, gets ivar 0.
    """
    flux_b, single = _as_batch(flux)
    ivar_b, _ = _as_batch(ivar)
    wave_b, _ = _as_batch(wavelength)
    flux_b, ivar_b = clean_flux_ivar(flux_b, ivar_b)
    n, m = flux_b.shape
    if wave_b.shape[0] == 1 and n > 1:
        wave_b = np.broadcast_to(wave_b, (n, m))
    with np.errstate(divide="ignore", invalid="ignore"):
        loglam = np.log10(wave_b.astype(np.float64))
    # one searchsorted for the whole batch: offset each row so rows never interleave
    # a non-finite wavelength marks its pixel bad and must not break the sort order
    bad_wave = ~np.isfinite(loglam)
    if bad_wave.any():
        ivar_b = np.where(bad_wave, 0.0, ivar_b)
        loglam = np.fmax.accumulate(np.where(bad_wave, -np.inf, loglam), axis=1)
        loglam = np.where(np.isfinite(loglam), loglam, 0.0)
    offset = 10.0 * np.arange(n)[:, None]
    flat = loglam + offset
    right = np.searchsorted(flat.ravel(), (LRS_LOGLAM[None, :] + offset).ravel())
    right = right.reshape(n, N_LRS) - m * np.arange(n)[:, None]  # (n, N_LRS)
    inside = (right < m) & (LRS_LOGLAM[None, :] >= loglam[:, :1])
    right = np.clip(right, 1, m - 1)
    left = right - 1
    rows = np.arange(n)[:, None]
    x0, x1 = loglam[rows, left], loglam[rows, right]
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(x1 > x0, (LRS_LOGLAM[None, :] - x0) / (x1 - x0), 0.0)
    w = np.clip(w, 0.0, 1.0)
    f0, f1 = flux_b[rows, left], flux_b[rows, right]
    i0, i1 = ivar_b[rows, left], ivar_b[rows, right]
    good = inside & (i0 > 0) & (i1 > 0)
    with np.errstate(divide="ignore"):
        var = (1 - w) ** 2 / np.where(i0 > 0, i0, np.inf) + w**2 / np.where(i1 > 0, i1, np.inf)
    out_flux = np.where(inside, (1 - w) * f0 + w * f1, 0.0)
    out_ivar = np.where(good & (var > 0), 1.0 / np.where(var > 0, var, 1.0), 0.0)
    out_flux, out_ivar = out_flux.astype(np.float32), out_ivar.astype(np.float32)
    return (out_flux[0], out_ivar[0]) if single else (out_flux, out_ivar)


def lrs_coverage(wavelength_min: np.ndarray, wavelength_max: np.ndarray) -> np.ndarray:
    """Fraction of the canonical LRS grid covered by an input spanning [min, max] Angstrom."""
    lo = np.clip(np.log10(np.asarray(wavelength_min, dtype=float)), LRS_LOGLAM[0], LRS_LOGLAM[-1])
    hi = np.clip(np.log10(np.asarray(wavelength_max, dtype=float)), LRS_LOGLAM[0], LRS_LOGLAM[-1])
    return np.clip((hi - lo) / (LRS_LOGLAM[-1] - LRS_LOGLAM[0]), 0.0, 1.0)


def continuum_lrs(
    flux: np.ndarray,
    ivar: np.ndarray,
    degree: int = 5,
    n_iter: int = 5,
    median_width: int = 7,
    savgol_window: int = 31,
    low_clip: float = 1.0,
    high_clip: float = 3.0,
) -> np.ndarray:
    """Estimate the LRS continuum by an iterative polynomial upper envelope, batched.

    The flux is median filtered (width 7) and Savitzky-Golay smoothed, then a polynomial in the
    scaled log wavelength is fitted by weighted least squares; each iteration drops pixels that
    fall more than ``low_clip`` sigma below the fit (absorption lines) or ``high_clip`` above it
    (spikes), so the fit rises to the upper envelope. Returns the continuum, shape like ``flux``.
    """
    from scipy.ndimage import median_filter  # scipy.signal costs ~1 s to import: only when needed
    from scipy.signal import savgol_filter

    flux_b, single = _as_batch(flux)
    ivar_b, _ = _as_batch(ivar)
    flux_b, ivar_b = clean_flux_ivar(flux_b, ivar_b)
    n, m = flux_b.shape
    good = ivar_b > 0
    # fill bad pixels by the row median so the filters do not see zeros
    with np.errstate(all="ignore"):
        row_median = np.nanmedian(np.where(good, flux_b, np.nan), axis=1)
    row_median = np.where(np.isfinite(row_median), row_median, 1.0)
    filled = np.where(good, flux_b, row_median[:, None])
    smooth = median_filter(filled, size=(1, median_width), mode="nearest")
    window = min(savgol_window, m - (1 - m % 2))
    if window > degree + 2:
        smooth = savgol_filter(smooth, window_length=window, polyorder=3, axis=-1, mode="interp")
    x = np.linspace(-1.0, 1.0, m)
    design = np.vander(x, degree + 1, increasing=True)  # (m, d)
    d = degree + 1
    outer = (design[:, :, None] * design[:, None, :]).reshape(m, d * d)  # (m, d*d)
    weight = good.astype(np.float64)
    continuum = np.repeat(row_median[:, None], m, axis=1)
    for _ in range(n_iter):
        # batched weighted normal equations (A^T W A) c = A^T W y, as two matrix products
        ata = (weight @ outer).reshape(n, d, d) + 1e-9 * np.eye(d)[None]
        aty = (weight * smooth) @ design
        coeff = np.linalg.solve(ata, aty[..., None])[..., 0]
        continuum = coeff @ design.T
        resid = smooth - continuum
        sigma = np.sqrt(np.sum(weight * resid**2, axis=1) / np.maximum(weight.sum(axis=1), 1.0))
        keep = (resid > -low_clip * sigma[:, None]) & (resid < high_clip * sigma[:, None]) & good
        # never let a star lose all its points
        enough = keep.sum(axis=1) > 2 * (degree + 1)
        weight = np.where(enough[:, None], keep, weight).astype(np.float64)
    continuum = np.where(continuum > 0, continuum, np.maximum(row_median[:, None], 1e-30))
    return continuum[0] if single else continuum


def normalise_lrs(flux: np.ndarray, ivar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Continuum-normalise LRS flux; ivar scales by continuum^2. Returns float32 (flux, ivar)."""
    flux_c, ivar_c = clean_flux_ivar(flux, ivar)
    cont = continuum_lrs(flux_c, ivar_c)
    return (flux_c / cont).astype(np.float32), (ivar_c * cont**2).astype(np.float32)


def lrs_model_input(
    flux: np.ndarray, ivar: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Z-score each continuum-normalised spectrum for the LRS encoder.

    Returns (z, stats): z of shape (n, 1462) float32 (bad pixels set to 0, the mean), and stats of
    shape (n, 2) = [mean, log10(std)] that the encoder receives as its stats token.
    """
    flux_b, single = _as_batch(flux)
    if ivar is None:
        good = np.isfinite(flux_b)
    else:
        good = (_as_batch(ivar)[0] > 0) & np.isfinite(flux_b)
    f = np.where(good, flux_b, 0.0).astype(np.float64)
    count = np.maximum(good.sum(axis=1, keepdims=True), 1)
    mean = f.sum(axis=1, keepdims=True) / count
    std = np.sqrt((np.where(good, f - mean, 0.0) ** 2).sum(axis=1, keepdims=True) / count)
    std = np.maximum(std, 1e-6)
    z = np.where(good, (f - mean) / std, 0.0).astype(np.float32)
    stats = np.concatenate([mean, np.log10(std)], axis=1).astype(np.float32)
    return (z[0], stats[0]) if single else (z, stats)


def xp_norm(xp_flux: np.ndarray) -> np.ndarray:
    """Robust XP normalisation: mean flux over 500-600 nm, shape (n,). Non-positive -> NaN."""
    flux_b, single = _as_batch(xp_flux)
    norm = np.nanmean(np.where(np.isfinite(flux_b), flux_b, np.nan)[:, XP_NORM_SLICE], axis=1)
    norm = np.where(norm > 0, norm, np.nan)
    return norm[0] if single else norm


def xp_model_input(
    xp_flux: np.ndarray, xp_flux_error: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Normalise XP spectra for the encoders.

    Returns (x, stats): x = flux / norm, shape (n, 343) float32, and stats (n, 1) = log10(norm)
    in log10(W m^-2 nm^-1), which the encoders receive so absolute brightness is not lost.
    """
    flux_b, single = _as_batch(xp_flux)
    norm = xp_norm(flux_b)
    safe = np.where(np.isfinite(norm), norm, 1.0)
    x = np.where(np.isfinite(flux_b), flux_b / safe[:, None], 0.0).astype(np.float32)
    stats = np.log10(safe)[:, None].astype(np.float32)
    return (x[0], stats[0]) if single else (x, stats)
