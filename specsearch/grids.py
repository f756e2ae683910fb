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

# --- The continuum is fitted on the canonical grid widened by whole pixels of the same step:
# 100 in the blue (to 3908.4 A, past Ca II H & K) and 60 in the red (to 5677.0 A, past the C2
# 5636 A band head, short of the dichroic crossover at ~5800 A), so that the ends of the canonical
# grid are not extrapolations of the fit; the canonical pixels are then cut out (`canonical_lrs`).
LRS_FIT_BLUE, LRS_FIT_RED = 100, 60
N_LRS_FIT = LRS_FIT_BLUE + N_LRS + LRS_FIT_RED
LRS_FIT_LOGLAM = LRS_LOGLAM_START + LRS_LOGLAM_STEP * (np.arange(N_LRS_FIT) - LRS_FIT_BLUE)
LRS_FIT_CANONICAL = slice(LRS_FIT_BLUE, LRS_FIT_BLUE + N_LRS)  # the canonical pixels in it

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
    wavelength: np.ndarray,
    flux: np.ndarray,
    ivar: np.ndarray,
    loglam: np.ndarray = LRS_LOGLAM,
) -> tuple[np.ndarray, np.ndarray]:
    """Resample spectra onto a log-lambda grid (default the canonical LRS grid) by linear
    interpolation in log lambda.

    wavelength: (n, m) or (m,) in Angstrom, increasing along the last axis (one per spectrum or shared).
    flux, ivar: (n, m) or (m,). loglam: (k,) the target grid, log10(lambda / A), increasing.
    Returns (flux, ivar) of shape (n, k) float32. Variance propagates through the interpolation
    weights, var = (1-w)^2 var_i + w^2 var_{i+1}; a grid pixel outside the input coverage, or next
    to a bad input pixel that it takes weight from, gets ivar 0. A grid pixel that falls on an
    input pixel (weight 1 within 1e-6, as when the grids share pixels) is that pixel.
    """
    flux_b, single = _as_batch(flux)
    ivar_b, _ = _as_batch(ivar)
    wave_b, _ = _as_batch(wavelength)
    flux_b, ivar_b = clean_flux_ivar(flux_b, ivar_b)
    target = np.asarray(loglam, dtype=np.float64)
    n, m = flux_b.shape
    if wave_b.shape[0] > 1 and np.array_equal(wave_b, np.broadcast_to(wave_b[0], wave_b.shape)):
        wave_b = wave_b[:1]  # one grid for the whole batch (the usual case): locate pixels once
    with np.errstate(divide="ignore", invalid="ignore"):
        log_wave = np.log10(wave_b.astype(np.float64))
    # a non-finite wavelength marks its pixel bad and must not break the sort order
    bad_wave = ~np.isfinite(log_wave)
    if bad_wave.any():
        ivar_b = np.where(bad_wave, 0.0, ivar_b)
        log_wave = np.fmax.accumulate(np.where(bad_wave, -np.inf, log_wave), axis=1)
        log_wave = np.where(np.isfinite(log_wave), log_wave, 0.0)
    rows = np.arange(len(log_wave))[:, None]
    # one searchsorted for all grids: offset each row so rows never interleave
    offset = 10.0 * rows
    right = np.searchsorted((log_wave + offset).ravel(), (target[None, :] + offset).ravel())
    right = right.reshape(len(log_wave), len(target)) - m * rows  # (1 or n, k)
    inside = (right < m) & (target[None, :] >= log_wave[:, :1])
    right = np.clip(right, 1, m - 1)
    left = right - 1
    x0, x1 = log_wave[rows, left], log_wave[rows, right]
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(x1 > x0, (target[None, :] - x0) / (x1 - x0), 0.0)
    w = np.clip(w, 0.0, 1.0)
    w = np.where(w < 1e-6, 0.0, np.where(w > 1.0 - 1e-6, 1.0, w))  # on an input pixel
    if len(log_wave) == 1:
        f0, f1 = flux_b[:, left[0]], flux_b[:, right[0]]
        i0, i1 = ivar_b[:, left[0]], ivar_b[:, right[0]]
    else:
        f0, f1 = flux_b[rows, left], flux_b[rows, right]
        i0, i1 = ivar_b[rows, left], ivar_b[rows, right]
    good = inside & ((i0 > 0) | (w == 1.0)) & ((i1 > 0) | (w == 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        var = np.where(w < 1.0, (1 - w) ** 2 / np.where(i0 > 0, i0, np.inf), 0.0) + np.where(
            w > 0.0, w**2 / np.where(i1 > 0, i1, np.inf), 0.0
        )
    interpolated = np.where(w == 0.0, f0, np.where(w == 1.0, f1, (1 - w) * f0 + w * f1))
    out_flux = np.where(inside, interpolated, 0.0)
    out_ivar = np.where(good & (var > 0), 1.0 / np.where(var > 0, var, 1.0), 0.0)
    out_flux, out_ivar = out_flux.astype(np.float32), out_ivar.astype(np.float32)
    return (out_flux[0], out_ivar[0]) if single else (out_flux, out_ivar)


def lrs_coverage(wavelength_min: np.ndarray, wavelength_max: np.ndarray) -> np.ndarray:
    """Fraction of the canonical LRS grid covered by an input spanning [min, max] Angstrom."""
    lo = np.clip(np.log10(np.asarray(wavelength_min, dtype=float)), LRS_LOGLAM[0], LRS_LOGLAM[-1])
    hi = np.clip(np.log10(np.asarray(wavelength_max, dtype=float)), LRS_LOGLAM[0], LRS_LOGLAM[-1])
    return np.clip((hi - lo) / (LRS_LOGLAM[-1] - LRS_LOGLAM[0]), 0.0, 1.0)


def _fill_bad(values: np.ndarray, good: np.ndarray) -> np.ndarray:
    """Bad pixels replaced by linear interpolation between the nearest good pixels of the row
    (the nearest good value beyond the ends; 1 in a row without any), so that filters never see
    zeros or fill values."""
    out = np.array(values, dtype=np.float64, copy=True)
    todo = np.flatnonzero(~good.all(axis=1))  # most rows have no bad pixel
    if not todo.size:
        return out
    values, good = out[todo], good[todo]
    n, m = values.shape
    index = np.arange(m)
    left = np.maximum.accumulate(np.where(good, index, -1), axis=1)
    right = np.minimum.accumulate(np.where(good, index, m)[:, ::-1], axis=1)[:, ::-1]
    rows = np.arange(n)[:, None]
    left_value = values[rows, np.clip(left, 0, m - 1)]
    right_value = values[rows, np.clip(right, 0, m - 1)]
    has_left, has_right = left >= 0, right < m
    w = (index - left) / np.maximum(right - left, 1)
    between = (1 - w) * left_value + w * right_value
    filled = np.where(
        has_left & has_right,
        between,
        np.where(has_left, left_value, np.where(has_right, right_value, 1.0)),
    )
    out[todo] = np.where(good, values, filled)
    return out


def _gap_penalty(usable: np.ndarray, design: np.ndarray, min_gap: int = 10) -> np.ndarray:
    """(n, d, d) penalty that keeps the fit straight (in log flux) across each interior gap of
    at least ``min_gap`` unusable pixels (a dead fibre, a masked segment): for every gap pixel x
    between usable pixels a and b, the squared difference between the fit at x and the straight
    line from the fit at a to the fit at b, weight 0.3 per pixel (a good pixel weighs up to 1). Without it a polynomial swings
    freely where there is no data and moves the continuum beside the gap too."""
    n, m = usable.shape
    d = design.shape[1]
    penalty = np.zeros((n, d, d))
    index = np.arange(m)
    left = np.maximum.accumulate(np.where(usable, index, -1), axis=1)
    right = np.minimum.accumulate(np.where(usable, index, m)[:, ::-1], axis=1)[:, ::-1]
    gap = ~usable & (left >= 0) & (right < m)
    rows = np.flatnonzero(gap.sum(axis=1) >= min_gap)  # few rows have one
    if not rows.size:
        return penalty
    a, b, gap = np.clip(left[rows], 0, m - 1), np.clip(right[rows], 0, m - 1), gap[rows]
    t = ((index - a) / np.maximum(b - a, 1))[..., None]
    line = design[None] - (1 - t) * design[a] - t * design[b]  # (r, m, d)
    line *= gap[..., None]
    penalty[rows] = 0.3 * np.einsum("rmd,rme->rde", line, line)
    return penalty


def continuum_lrs(
    flux: np.ndarray,
    ivar: np.ndarray,
    degree: int = 5,
    n_iter: int = 8,
    median_width: int = 7,
    smooth_width: int = 31,
    low_clip: float = 1.0,
    high_clip: float = 2.5,
    min_snr: float = 1.0,
) -> np.ndarray:
    """Estimate the LRS continuum by an iterative polynomial upper envelope in log flux, batched.

    flux, ivar: (n, m) or (m,) on a log-lambda grid with equal steps (the canonical or the fitting
    grid), any flux unit. Returns the continuum, shape like ``flux``, in the flux's unit.

    The flux is median filtered (width 7), its log is Savitzky-Golay smoothed (cubic), and a
    polynomial of ``degree`` in the pixel index is fitted to it by least squares weighted by each
    pixel's S/N (saturating at 5). Each iteration drops pixels more than ``low_clip`` sigma below
    the fit (absorption lines, molecular bands) or ``high_clip`` sigma above it (emission lines,
    sky residuals, spikes), so the fit rises to the upper envelope. Pixels whose smoothed flux
    has S/N below ``min_snr`` (a dead fibre's zeros) never count, and across a gap of them the
    fit is held straight (`_gap_penalty`).

    Why in log flux: the raw continuum of a star is its SED times extinction times the residual
    instrument response times a flux scale. In log these are added, and a weighted least-squares
    polynomial fit of (y + p) is the fit of y plus p for any polynomial p of the fit's degree;
    the median filter commutes with a positive factor, the cubic smoothing preserves cubics, and
    the weights and the clipping see only ratios. So a factor exp(p) with p up to a cubic cancels
    exactly in flux / continuum, and any smooth factor (reddening, a response tilt) nearly so.
    """
    from scipy.ndimage import median_filter  # scipy.signal costs ~1 s to import: only when needed
    from scipy.signal import savgol_filter

    flux_b, single = _as_batch(flux)
    ivar_b, _ = _as_batch(ivar)
    flux_b, ivar_b = clean_flux_ivar(flux_b, ivar_b)
    n, m = flux_b.shape
    good = ivar_b > 0
    smooth = median_filter(_fill_bad(flux_b, good), size=(1, median_width), mode="nearest")
    # S/N per pixel of the smoothed flux: a ratio, so unchanged by any factor on the flux; a
    # pixel below S/N 1 (a dead fibre's zeros, the far blue of a cool star) never counts
    snr2 = np.where(good & (smooth > 0), smooth**2 * ivar_b, 0.0)
    usable = snr2 > min_snr**2
    log_flux = np.log(np.where(usable, smooth, 1.0))
    log_flux = _fill_bad(log_flux, usable)
    window = min(smooth_width, m - (1 - m % 2))
    if window > 5:
        log_flux = savgol_filter(
            log_flux, window_length=window, polyorder=3, axis=-1, mode="interp"
        )
    weight_snr = np.where(usable, snr2 / (snr2 + 25.0), 0.0)
    x = np.linspace(-1.0, 1.0, m)
    design = np.polynomial.legendre.legvander(x, degree)  # (m, d), well conditioned
    d = degree + 1
    outer = (design[:, :, None] * design[:, None, :]).reshape(m, d * d)
    penalty = _gap_penalty(usable, design)
    keep = usable
    fit = np.zeros_like(log_flux)
    for _ in range(n_iter):
        weight = np.where(keep, weight_snr, 0.0)
        # batched weighted normal equations (A^T W A) c = A^T W y, as two matrix products
        ata = (weight @ outer).reshape(n, d, d) + penalty + 1e-9 * np.eye(d)[None]
        aty = (weight * log_flux) @ design
        coeff = np.linalg.solve(ata, aty[..., None])[..., 0]
        fit = coeff @ design.T
        resid = log_flux - fit
        total = np.maximum(weight.sum(axis=1), 1e-30)
        sigma = np.sqrt(np.sum(weight * resid**2, axis=1) / total)[:, None]
        new_keep = usable & (resid > -low_clip * sigma) & (resid < high_clip * sigma)
        # never let a star lose (nearly) all its points
        enough = new_keep.sum(axis=1) > 4 * d
        keep = np.where(enough[:, None], new_keep, keep)
    continuum = np.exp(fit)
    return continuum[0] if single else continuum


def normalise_lrs(flux: np.ndarray, ivar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Continuum-normalise LRS flux; ivar scales by continuum^2. Returns float32 (flux, ivar)."""
    flux_c, ivar_c = clean_flux_ivar(flux, ivar)
    cont = continuum_lrs(flux_c, ivar_c)
    return (flux_c / cont).astype(np.float32), (ivar_c * cont**2).astype(np.float32)


def canonical_lrs(
    wavelength: np.ndarray, flux: np.ndarray, ivar: np.ndarray, with_continuum: bool = False
) -> tuple[np.ndarray, ...]:
    """Raw LRS as observed -> the canonical shard arrays: the one path every LAMOST spectrum takes
    (the FITS reader's and the simulator's).

    wavelength: (n, m) or (m,) Angstrom, increasing; flux, ivar: (n, m) on those pixels, any flux
    unit (bad pixels: ivar 0). Resampled onto the fitting grid (``LRS_FIT_LOGLAM``), cleaned,
    divided by the continuum fitted there (`continuum_lrs`), and cut to the canonical grid.
    Returns continuum-normalised (flux, ivar), float32, (n, 1462), and with ``with_continuum``
    the fitted continuum (float64, in the input's flux unit) as a third array.
    """
    fit_flux, fit_ivar = resample_lrs(wavelength, flux, ivar, LRS_FIT_LOGLAM)
    fit_flux, fit_ivar = clean_flux_ivar(fit_flux, fit_ivar)
    continuum = continuum_lrs(fit_flux, fit_ivar)
    cut = (..., LRS_FIT_CANONICAL)
    norm_flux = (fit_flux / continuum)[cut].astype(np.float32)
    norm_ivar = (fit_ivar * continuum**2)[cut].astype(np.float32)
    return (norm_flux, norm_ivar, continuum[cut]) if with_continuum else (norm_flux, norm_ivar)


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
