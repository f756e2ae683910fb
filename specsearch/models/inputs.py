"""Canonical spectra -> model inputs, batched: the one preparation that inference and training
share (z-scored LRS with its stats and ivar, normalised XP with its norm)."""

from __future__ import annotations

import warnings

import numpy as np

from ..errors import SpecsearchError
from ..grids import N_LRS, N_XP, lrs_model_input, xp_model_input, xp_norm


def _matrix(values, width: int, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float32)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] != width:
        raise SpecsearchError(f"{name} has shape {array.shape}, expected (n, {width})")
    return array


def lrs_inputs(lrs_flux, lrs_ivar=None) -> dict[str, np.ndarray]:
    """Canonical LRS arrays -> model inputs {z, stats, ivar (of the flux), present}, batched."""
    flux = _matrix(lrs_flux, N_LRS, "lrs_flux")
    finite = np.isfinite(flux)
    if lrs_ivar is None:
        ivar = finite.astype(np.float32)
    else:
        ivar = _matrix(lrs_ivar, N_LRS, "lrs_ivar")
        if ivar.shape != flux.shape:
            raise SpecsearchError(f"lrs_ivar has shape {ivar.shape} but lrs_flux {flux.shape}")
        with np.errstate(invalid="ignore"):
            ivar = np.where(finite & np.isfinite(ivar) & (ivar > 0), ivar, 0.0).astype(np.float32)
    z, stats = lrs_model_input(np.where(finite, flux, 0.0), ivar)
    return {"z": z, "stats": stats, "ivar": ivar, "present": (ivar > 0).any(axis=1)}


def xp_inputs(xp_flux) -> dict[str, np.ndarray]:
    """Canonical XP flux -> model inputs {x, stats, norm, present}, batched."""
    flux = _matrix(xp_flux, N_XP, "xp_flux")
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # mean of an all-NaN row
        norm = xp_norm(flux)
        x, stats = xp_model_input(flux)
    # a norm so close to 0 that flux / norm overflows is no usable spectrum either
    present = np.isfinite(norm) & np.isfinite(x).all(axis=1) & (np.abs(x) < 1e30).all(axis=1)
    x = np.where(present[:, None], x, 0.0).astype(np.float32)
    return {"x": x, "stats": stats, "norm": norm.astype(np.float32), "present": present}
