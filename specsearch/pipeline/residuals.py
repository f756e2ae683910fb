"""Residual statistics between observed and predicted spectra (used by embed and score).

A residual in sigma is z = (observed - predicted) / sqrt(1/ivar + floor^2): the observational
noise plus a per-pixel model-error floor learned on a reference release (``fit_floor``). Per
star, ``residual_stats`` gives the mean z^2 over good pixels (broad mismatches) and the largest
standardised chi^2 of a window of pixels at several widths (narrow features that a mean over the
whole spectrum would average away), plus the strongest windows for the explanation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MEDIAN_CHI2_1 = 0.454936423119572
"""The median of a chi-squared variable with one degree of freedom."""

TOP_WINDOWS = 3
"""Windows kept per star and comparison for the explanation."""


def chi2_per_pixel(
    observed: np.ndarray,
    ivar: np.ndarray,
    predicted: np.ndarray,
    model_floor: float | np.ndarray = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Reduced chi^2 of observed against predicted spectra, per star.

    observed, ivar, predicted: (n, m). ``model_floor``: a model-error sigma in the flux's units,
    scalar or (m,), added in quadrature to the observational variance. Pixels with ivar 0 or
    non-finite values are skipped. Returns (chi2 per good pixel (n,), number of good pixels (n,));
    a star with no good pixel gets NaN.
    """
    z, good = residual_sigma(observed, ivar, predicted, model_floor)
    n_good = good.sum(axis=1)
    with np.errstate(invalid="ignore"):
        chi2 = np.where(n_good > 0, (z * z).sum(axis=1) / np.maximum(n_good, 1), np.nan)
    return chi2.astype(np.float32), n_good.astype(np.int32)


def residual_sigma(
    observed: np.ndarray,
    ivar: np.ndarray,
    predicted: np.ndarray,
    model_floor: float | np.ndarray = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """(z (n, m) float64 with 0 at bad pixels, good (n, m) bool): residuals in sigma."""
    observed = np.asarray(observed, dtype=np.float64)
    predicted = np.asarray(predicted, dtype=np.float64)
    ivar = np.asarray(ivar, dtype=np.float64)
    good = (ivar > 0) & np.isfinite(observed) & np.isfinite(predicted) & np.isfinite(ivar)
    floor2 = np.asarray(model_floor, dtype=np.float64) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        var = np.where(good, 1.0 / np.where(good, ivar, 1.0) + floor2, 1.0)
        z = np.where(good, (observed - predicted) / np.sqrt(var), 0.0)
    return z, good


def xp_ivar(xp_flux_error: np.ndarray) -> np.ndarray:
    """Inverse variance from XP 1-sigma errors; non-positive or non-finite errors give 0."""
    err = np.asarray(xp_flux_error, dtype=np.float64)
    ok = np.isfinite(err) & (err > 0)
    return np.where(ok, 1.0 / np.where(ok, err, 1.0) ** 2, 0.0)


def fit_floor(observed: np.ndarray, ivar: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """The per-pixel model-error floor (m,) that makes residuals unit-variance on a reference.

    For each pixel, the smallest f >= 0 such that the median over stars of
    (observed - predicted)^2 / (1/ivar + f^2) is the median of a chi^2 with one degree of
    freedom, c: a median, so the few anomalies a reference holds do not set it. Each star's
    ratio exceeds c exactly when f^2 < t = r^2 / c - 1/ivar, so the median is c where f^2 is
    the median of t: f = sqrt(max(median t, 0)), no search needed. Pixels good in fewer than
    10 stars get 0.
    """
    observed = np.asarray(observed, dtype=np.float64)
    predicted = np.asarray(predicted, dtype=np.float64)
    ivar = np.asarray(ivar, dtype=np.float64)
    good = (ivar > 0) & np.isfinite(observed) & np.isfinite(predicted)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(
            good,
            (observed - predicted) ** 2 / MEDIAN_CHI2_1 - 1.0 / np.where(good, ivar, 1.0),
            np.nan,
        )
    usable = good.sum(axis=0) >= 10
    floor = np.zeros(observed.shape[1])
    if usable.any():
        floor2 = np.nanmedian(t[:, usable], axis=0)
        floor[usable] = np.sqrt(np.maximum(floor2, 0.0))
    return floor


@dataclass
class ResidualStats:
    """Per star statistics of one comparison (observed vs one prediction); NaN where unusable.

    chi2: mean z^2 over good pixels. peak: the largest standardised window chi^2,
    (sum z^2 - n) / sqrt(2 n), over every window of every width. At the explanation width,
    consecutive windows whose standardised chi^2 exceeds 3 merge into flagged ranges; the
    TOP_WINDOWS strongest ranges per star: windows, their strongest window's centre pixel (-1:
    none); window_low / window_high, the range's first and last pixel; window_sigma, its rms z;
    window_mean, its mean signed z (> 0: more flux than predicted).
    """

    chi2: np.ndarray
    peak: np.ndarray
    n_good: np.ndarray
    windows: np.ndarray
    window_low: np.ndarray
    window_high: np.ndarray
    window_sigma: np.ndarray
    window_mean: np.ndarray
    binned: np.ndarray | None = None  # (n, bins) mean z in equal pixel bins: the residual's shape


def residual_stats(
    observed: np.ndarray,
    ivar: np.ndarray,
    predicted: np.ndarray,
    floor: np.ndarray,
    widths: tuple[int, ...],
    explain_width: int,
    bins: int = 0,
) -> ResidualStats:
    """Mean, window-peak and strongest windows of z for a batch (see ResidualStats), and with
    ``bins`` the mean z in that many equal pixel bins (0 where a bin has no good pixel).

    Windows of each width step by half a width; a window needs at least half its pixels good.
    """
    z, good = residual_sigma(observed, ivar, predicted, floor)
    n, m = z.shape
    n_good = good.sum(axis=1)
    z2 = z * z
    with np.errstate(invalid="ignore", divide="ignore"):
        chi2 = np.where(n_good > 0, z2.sum(axis=1) / np.maximum(n_good, 1), np.nan)
    peak = np.full(n, -np.inf)
    sums = _window_sums(z2, good, z, widths)
    for width, (s2, count, _) in sums.items():
        with np.errstate(invalid="ignore", divide="ignore"):
            standard = np.where(
                count >= width / 2, (s2 - count) / np.sqrt(2 * np.maximum(count, 1)), -np.inf
            )
        peak = np.maximum(peak, standard.max(axis=1) if standard.shape[1] else peak)
    peak = np.where(np.isfinite(peak) & (n_good > 0), peak, np.nan)
    windows, low, high, sigma, mean = _top_ranges(*sums[explain_width], explain_width, m)
    binned = None
    if bins:
        edges = np.linspace(0, m, bins + 1).astype(int)
        total = np.add.reduceat(z, edges[:-1], axis=1)
        count = np.add.reduceat(good, edges[:-1], axis=1)
        binned = np.where(count > 0, total / np.maximum(count, 1), 0.0).astype(np.float32)
    return ResidualStats(
        chi2.astype(np.float32),
        peak.astype(np.float32),
        n_good.astype(np.int32),
        windows,
        low,
        high,
        sigma,
        mean,
        binned,
    )


def _window_sums(
    z2: np.ndarray, good: np.ndarray, z: np.ndarray, widths: tuple[int, ...]
) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per width: (sum z^2, good pixels, sum z) of every window, (n, windows)."""
    n, m = z2.shape
    zeros = np.zeros((n, 1))
    c2 = np.concatenate([zeros, np.cumsum(z2, axis=1)], axis=1)
    cg = np.concatenate([zeros, np.cumsum(good, axis=1)], axis=1)
    c1 = np.concatenate([zeros, np.cumsum(z, axis=1)], axis=1)
    out = {}
    for width in widths:
        width = min(width, m)
        starts = np.arange(0, m - width + 1, max(width // 2, 1))
        stops = starts + width
        out[width] = (
            c2[:, stops] - c2[:, starts],
            cg[:, stops] - cg[:, starts],
            c1[:, stops] - c1[:, starts],
        )
    return out


def _top_ranges(
    s2: np.ndarray, count: np.ndarray, s1: np.ndarray, width: int, n_pixels: int
) -> tuple[np.ndarray, ...]:
    """The TOP_WINDOWS strongest flagged ranges per star (runs of consecutive windows with a
    standardised chi^2 above 3): (peak centre, first pixel, last pixel, rms z, mean z), each
    (n, TOP_WINDOWS); -1 / NaN where a star has fewer."""
    n, k = s2.shape
    with np.errstate(invalid="ignore", divide="ignore"):
        standard = np.where(
            count >= width / 2, (s2 - count) / np.sqrt(2 * np.maximum(count, 1)), -np.inf
        )
    step = max(width // 2, 1)
    shape = (n, TOP_WINDOWS)
    centre, low, high = (np.full(shape, -1, np.int32) for _ in range(3))
    rms, mean = np.full(shape, np.nan, np.float32), np.full(shape, np.nan, np.float32)
    flagged = standard > 3.0
    for i in np.flatnonzero(flagged.any(axis=1)):
        # runs of consecutive flagged windows: [start, stop) in window numbers
        edges = np.diff(np.concatenate([[0], flagged[i].astype(np.int8), [0]]))
        starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        strength = [standard[i, a:b].max() for a, b in zip(starts, stops, strict=True)]
        for j, r in enumerate(np.argsort(strength)[::-1][:TOP_WINDOWS]):
            a, b = starts[r], stops[r]
            best = a + int(np.argmax(standard[i, a:b]))
            pixels = count[i, a:b].sum()  # windows overlap by half: z counted twice, evenly
            centre[i, j] = best * step + width // 2
            low[i, j] = a * step
            high[i, j] = min((b - 1) * step + width, n_pixels) - 1
            rms[i, j] = np.sqrt(s2[i, a:b].sum() / max(pixels, 1))
            mean[i, j] = s1[i, a:b].sum() / max(pixels, 1)
    return centre, low, high, rms, mean
