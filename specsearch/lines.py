"""Strong spectral features on the canonical grids, to name where a residual lies.

Wavelengths are vacuum (LAMOST and Gaia XP both work in vacuum), rounded to 1 A: enough to name
a window of tens of A (LRS) or tens of nm (XP). Bands are listed at their head or centre.
"""

from __future__ import annotations

import numpy as np

from .grids import LRS_WAVELENGTH, XP_WAVELENGTH

# (name, vacuum wavelength in A) within 3999-5599 A, the canonical LRS range
LRS_FEATURES = (
    ("H delta", 4103.0),
    ("Ca I 4227", 4228.0),
    ("CN 4216 band", 4216.0),
    ("CH G band", 4306.0),
    ("H gamma", 4342.0),
    ("Fe I 4384", 4385.0),
    ("He I 4472", 4473.0),
    ("He II 4686", 4687.0),
    ("C2 Swan 4737", 4738.0),
    ("MgH 4780", 4781.0),
    ("H beta", 4863.0),
    ("TiO 4955", 4956.0),
    ("[O III] 4959", 4961.0),
    ("[O III] 5007", 5008.0),
    ("C2 Swan 5165", 5167.0),
    ("Mg b", 5177.0),
    ("Fe I 5270", 5271.0),
    ("Fe I 5335", 5336.0),
    ("Fe I 5406", 5407.0),
    ("C2 Swan 5636", 5637.0),
)

# (name, vacuum wavelength in A) within 3360-10200 A, the Gaia XP sampled range
XP_FEATURES = (
    ("Balmer jump", 3650.0),
    ("Ca II H&K", 3950.0),
    ("H delta", 4103.0),
    ("H gamma", 4342.0),
    ("H beta", 4863.0),
    ("Mg b", 5177.0),
    ("Na D", 5895.0),
    ("BP/RP boundary", 6400.0),
    ("H alpha", 6565.0),
    ("TiO 7050", 7050.0),
    ("TiO 7600", 7600.0),
    ("Ca II triplet", 8600.0),
    ("Paschen series", 9300.0),
)

FEATURES = {"lrs": LRS_FEATURES, "xp": XP_FEATURES}
WAVELENGTH_A = {"lrs": LRS_WAVELENGTH, "xp": XP_WAVELENGTH * 10.0}
TOLERANCE_A = {"lrs": 30.0, "xp": 150.0}
"""How far from a feature a window may lie and still take its name."""


def nearest_feature(modality: str, wavelength_a: np.ndarray) -> list[str]:
    """The name of the nearest strong feature of each wavelength (A), or "continuum"."""
    names = [name for name, _ in FEATURES[modality]]
    centres = np.array([w for _, w in FEATURES[modality]])
    wavelength_a = np.atleast_1d(np.asarray(wavelength_a, dtype=np.float64))
    distance = np.abs(wavelength_a[:, None] - centres[None, :])
    best = distance.argmin(axis=1)
    near = distance[np.arange(len(best)), best] <= TOLERANCE_A[modality]
    return [names[b] if ok else "continuum" for b, ok in zip(best, near, strict=True)]


def pixel_wavelength(modality: str, pixel: np.ndarray) -> np.ndarray:
    """Wavelength (A) of pixel indices on a modality's grid (clipped to the grid)."""
    grid = WAVELENGTH_A[modality]
    return grid[np.clip(np.asarray(pixel, dtype=np.int64), 0, len(grid) - 1)]
