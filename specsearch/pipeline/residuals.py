"""Residual statistics between observed and predicted spectra (used by embed and score)."""

from __future__ import annotations

import numpy as np


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
    observed = np.asarray(observed, dtype=np.float64)
    predicted = np.asarray(predicted, dtype=np.float64)
    ivar = np.asarray(ivar, dtype=np.float64)
    good = (ivar > 0) & np.isfinite(observed) & np.isfinite(predicted) & np.isfinite(ivar)
    floor2 = np.asarray(model_floor, dtype=np.float64) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        var = np.where(good, 1.0 / np.where(good, ivar, 1.0) + floor2, 1.0)
        terms = np.where(good, (observed - predicted) ** 2 / var, 0.0)
    n_good = good.sum(axis=1)
    with np.errstate(invalid="ignore"):
        chi2 = np.where(n_good > 0, terms.sum(axis=1) / np.maximum(n_good, 1), np.nan)
    return chi2.astype(np.float32), n_good.astype(np.int32)


def xp_ivar(xp_flux_error: np.ndarray) -> np.ndarray:
    """Inverse variance from XP 1-sigma errors; non-positive or non-finite errors give 0."""
    err = np.asarray(xp_flux_error, dtype=np.float64)
    ok = np.isfinite(err) & (err > 0)
    return np.where(ok, 1.0 / np.where(ok, err, 1.0) ** 2, 0.0)
