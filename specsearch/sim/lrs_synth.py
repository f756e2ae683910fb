"""A synthetic generator of LAMOST-like low-resolution spectra (LRS) from stellar labels.

**Everything this module makes is simulated.** No real LAMOST spectrum can be had offline, and no
optical stellar library at LAMOST resolution either, so the LRS side of specsearch is generated
here from a physically motivated but heuristic model (see ``docs/simulator.md``):

- a list of real strong features (Balmer and Paschen series, Ca II H&K and triplet, Ca I 4227,
  Mg b, Na D, Fe I/II, Sr II, Ba II, Ti, Cr, Mn, He I ...) at their laboratory wavelengths,
  plus a statistical forest of weak lines (random positions, fixed seed: *not* a real line list)
  that supplies the line blanketing;
- line strengths from the labels through Boltzmann/Saha-like temperature laws, abundance scaling
  with [Fe/H] and [alpha/M], gravity terms and a curve of growth (linear, flat, damping);
- Voigt-like profiles (an LSF Gaussian, Lorentzian damping wings, Stark-like hydrogen wings whose
  width grows with log g) at R = 1800;
- molecular bands (TiO, MgH, CaH, CN, CH, C2, VO) as saw-tooth band heads;
- a blackbody continuum, CCM (1989) extinction with diffuse interstellar bands, an instrumental
  throughput with the dichroic crossover near 5800 A, sky and read noise, sky-line residuals.

Wavelengths are **vacuum** (as LAMOST delivers them): the tables below are in air (the standard
laboratory lists) and converted with the IAU air-to-vacuum formula.

Two pixel grids, both uniform in log10(lambda) with LAMOST's step of 1e-4:

- the *full* grid, LAMOST's own: log10(lambda) = 3.5682 + 1e-4 i, i = 0..3908 (3700-9100 A);
- the *canonical* grid of :mod:`specsearch.grids` (3999.5-5598.4 A), which is exactly the pixels
  338..1799 of the full grid, so "resampling" to it is an exact slice (no interpolation).

Continuum normalisation: the canonical flux is divided by the star's **true** pseudo-continuum
(blackbody x extinction, the lines excluded), which the simulator knows; this is exact and fast.
``normalisation="fit"`` instead runs :func:`specsearch.grids.normalise_lrs` on the raw flux, as the
ingest path does for real spectra (~1 ms per star, too slow for large releases).

All array work is vectorised over a batch of stars; the only Python loops run over line or band
tables when the (cached) profile basis is built.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import gaussian_filter1d
from scipy.special import erf

from .. import grids

# --------------------------------------------------------------------------------------------
# grids and instrument constants

RESOLVING_POWER = 1800.0
FULL_LOGLAM_START = 3.5682  # LAMOST's native pixel grid starts here (COEFF0)
N_FULL = 3909
FULL_LOGLAM = FULL_LOGLAM_START + grids.LRS_LOGLAM_STEP * np.arange(N_FULL)
FULL_WAVELENGTH = 10.0**FULL_LOGLAM  # Angstrom, vacuum, 3700 - 9100
CANONICAL_OFFSET = int(round((grids.LRS_LOGLAM_START - FULL_LOGLAM_START) / grids.LRS_LOGLAM_STEP))
CANONICAL_SLICE = slice(CANONICAL_OFFSET, CANONICAL_OFFSET + grids.N_LRS)
assert np.allclose(FULL_LOGLAM[CANONICAL_SLICE], grids.LRS_LOGLAM, rtol=0, atol=1e-9)

# Gaussian LSF: sigma_lambda = lambda / (R * 2.3548) is constant in log lambda, i.e. in pixels
LSF_SIGMA_PIX = 1.0 / (
    RESOLVING_POWER * 2.0 * np.sqrt(2.0 * np.log(2.0)) * np.log(10.0) * grids.LRS_LOGLAM_STEP
)
PAD_PIX = 12  # extra pixels on each side so radial-velocity shifts up to ~800 km/s stay inside
OVERSAMPLE = 4  # sub-pixels per pixel when profiles are convolved with the LSF
C_KMS = 299792.458
MAX_RV_KMS = 800.0
RV_PHASES = 8  # sub-pixel steps of the Doppler shift: 1/8 pixel = 8.6 km/s

SUN_TEFF, SUN_LOGG = 5772.0, 4.44
G_BAND_A = (4000.0, 5500.0)  # window over which the g-band S/N is defined (median S/N per pixel)
DICHROIC_A = 5800.0  # blue and red arms join here
READ_NOISE_VAR = 30.0  # e-^2 per extracted pixel


def air_to_vacuum(wavelength_air: np.ndarray) -> np.ndarray:
    """Air -> vacuum wavelength in Angstrom (IAU standard, Morton 2000 via the VALD inverse form)."""
    lam = np.asarray(wavelength_air, dtype=np.float64)
    s2 = (1e4 / lam) ** 2
    n = (
        1.0
        + 8.336624212083e-5
        + 2.408926869968e-2 / (130.1065924522 - s2)
        + 1.599740894897e-4 / (38.92568793293 - s2)
    )
    return lam * n


# --------------------------------------------------------------------------------------------
# line and band tables (air wavelengths, Angstrom)


@dataclass(frozen=True)
class Species:
    """How one ion's line strengths follow temperature, abundance and gravity.

    Neutral species: log10 strength rises towards cool stars with slope ``a`` (per unit theta =
    5040/Teff) and falls steeply (slope ``b``) above the ionisation knee ``theta0``.
    Ions: a bell in theta, peak at ``theta0``, widths ``a`` (hot side) and ``b`` (cool side).
    ``group``: which abundance scales the lines ("fe": [Fe/H]; "alpha": [Fe/H] + [alpha/M]; "none").
    ``lum``: d log10(strength) / d log g (ionised lines are stronger in giants: negative).
    """

    ionised: bool
    theta0: float
    a: float
    b: float
    group: str = "fe"
    lum: float = 0.0


SPECIES = {
    "Fe I": Species(False, 0.87, 1.1, 4.5, "fe"),
    "Fe II": Species(True, 0.74, 0.14, 0.35, "fe", -0.30),
    "Ca I": Species(False, 0.92, 1.3, 5.5, "alpha"),
    "Ca II": Species(True, 1.00, 0.173, 0.40, "alpha", 0.0),
    "Mg I": Species(False, 0.85, 0.9, 4.0, "alpha"),
    "Mg II": Species(True, 0.53, 0.12, 0.16, "alpha", -0.15),
    "Na I": Species(False, 0.95, 1.5, 6.0, "fe"),
    "K I": Species(False, 0.98, 1.8, 6.5, "fe"),
    "Al I": Species(False, 0.92, 1.4, 5.5, "fe"),
    "Si I": Species(False, 0.80, 0.6, 3.5, "alpha"),
    "Si II": Species(True, 0.45, 0.10, 0.14, "alpha", -0.15),
    "Ti I": Species(False, 0.90, 1.8, 5.5, "alpha"),
    "Ti II": Species(True, 0.80, 0.16, 0.35, "alpha", -0.30),
    "Cr I": Species(False, 0.88, 1.4, 5.0, "fe"),
    "Mn I": Species(False, 0.88, 1.3, 5.0, "fe"),
    "Ni I": Species(False, 0.87, 1.1, 4.5, "fe"),
    "Sr II": Species(True, 1.00, 0.20, 0.40, "fe", -0.50),
    "Ba II": Species(True, 0.95, 0.20, 0.40, "fe", -0.40),
    "Sc II": Species(True, 0.85, 0.16, 0.35, "fe", -0.30),
    "O I": Species(True, 0.60, 0.12, 0.20, "alpha", -0.45),
    "He I": Species(True, 0.28, 0.09, 0.09, "none"),
}

# species, air wavelength, EW (A) of a dwarf (log g 4.44) at ref_teff with solar abundances,
# damping scale W_L (A, sets the square-root part of the curve of growth), Lorentz HWHM of the
# wings (A, 0 = no separate wing profile), ref_teff (K).
_SUN = SUN_TEFF
ATOMIC_LINES: tuple[tuple[str, float, float, float, float, float], ...] = (
    ("Ca II", 3933.66, 19.0, 0.60, 3.5, _SUN),  # K
    ("Ca II", 3968.47, 14.0, 0.45, 3.5, _SUN),  # H
    ("Ca II", 8498.02, 1.3, 0.05, 1.5, _SUN),
    ("Ca II", 8542.09, 3.6, 0.20, 2.0, _SUN),
    ("Ca II", 8662.14, 2.7, 0.15, 2.0, _SUN),
    ("Ca I", 4226.73, 1.5, 0.10, 0.7, _SUN),
    ("Ca I", 4302.53, 0.25, 0.005, 0, _SUN),
    ("Ca I", 4318.65, 0.15, 0.003, 0, _SUN),
    ("Ca I", 4434.96, 0.20, 0.004, 0, _SUN),
    ("Ca I", 4454.78, 0.22, 0.005, 0, _SUN),
    ("Ca I", 5270.27, 0.20, 0.004, 0, _SUN),
    ("Ca I", 5588.75, 0.14, 0.003, 0, _SUN),
    ("Ca I", 5857.45, 0.15, 0.003, 0, _SUN),
    ("Ca I", 6102.72, 0.12, 0.003, 0, _SUN),
    ("Ca I", 6122.22, 0.22, 0.006, 0, _SUN),
    ("Ca I", 6162.17, 0.22, 0.006, 0, _SUN),
    ("Ca I", 6439.08, 0.17, 0.004, 0, _SUN),
    ("Ca I", 6493.78, 0.14, 0.003, 0, _SUN),
    ("Na I", 5889.95, 0.75, 0.06, 0.5, _SUN),  # D2
    ("Na I", 5895.92, 0.56, 0.04, 0.5, _SUN),  # D1
    ("Na I", 8183.26, 0.20, 0.01, 0.5, _SUN),  # gravity-sensitive doublet of M dwarfs
    ("Na I", 8194.82, 0.27, 0.015, 0.5, _SUN),
    ("K I", 7664.90, 0.20, 0.01, 0.5, _SUN),
    ("K I", 7698.96, 0.17, 0.01, 0.5, _SUN),
    ("Mg I", 5167.32, 0.90, 0.05, 0.5, _SUN),  # Mg b
    ("Mg I", 5172.68, 1.26, 0.08, 0.5, _SUN),
    ("Mg I", 5183.60, 1.58, 0.10, 0.5, _SUN),
    ("Mg I", 3829.36, 0.85, 0.04, 0.6, _SUN),
    ("Mg I", 3832.30, 1.20, 0.07, 0.6, _SUN),
    ("Mg I", 3838.29, 1.50, 0.09, 0.6, _SUN),
    ("Mg I", 4571.10, 0.11, 0.003, 0, _SUN),
    ("Mg I", 4702.99, 0.33, 0.008, 0, _SUN),
    ("Mg I", 5528.40, 0.29, 0.008, 0, _SUN),
    ("Mg I", 8806.76, 0.50, 0.02, 0, _SUN),
    ("Mg II", 4481.13, 0.45, 0.02, 0, 9500.0),
    ("Al I", 3944.01, 0.49, 0.02, 0, _SUN),
    ("Al I", 3961.52, 0.62, 0.03, 0, _SUN),
    ("Si I", 3905.52, 0.30, 0.01, 0, _SUN),
    ("Si II", 4128.07, 0.25, 0.01, 0, 11000.0),
    ("Si II", 4130.89, 0.22, 0.01, 0, 11000.0),
    ("Si II", 6347.10, 0.40, 0.01, 0, 11000.0),
    ("Si II", 6371.36, 0.30, 0.01, 0, 11000.0),
    ("Ti I", 4981.73, 0.10, 0.002, 0, _SUN),
    ("Ti I", 4991.07, 0.10, 0.002, 0, _SUN),
    ("Ti I", 4999.50, 0.09, 0.002, 0, _SUN),
    ("Ti I", 5064.65, 0.07, 0.002, 0, _SUN),
    ("Ti I", 5173.74, 0.08, 0.002, 0, _SUN),
    ("Ti I", 5192.97, 0.08, 0.002, 0, _SUN),
    ("Ti I", 5210.39, 0.08, 0.002, 0, _SUN),
    ("Ti II", 4395.03, 0.18, 0.004, 0, _SUN),
    ("Ti II", 4443.80, 0.13, 0.003, 0, _SUN),
    ("Ti II", 4468.49, 0.15, 0.003, 0, _SUN),
    ("Ti II", 4501.27, 0.13, 0.003, 0, _SUN),
    ("Ti II", 4533.97, 0.10, 0.002, 0, _SUN),
    ("Ti II", 4563.76, 0.10, 0.002, 0, _SUN),
    ("Ti II", 4571.97, 0.12, 0.002, 0, _SUN),
    ("Cr I", 4254.33, 0.40, 0.01, 0, _SUN),
    ("Cr I", 4274.80, 0.35, 0.01, 0, _SUN),
    ("Cr I", 4289.72, 0.30, 0.008, 0, _SUN),
    ("Cr I", 5204.51, 0.22, 0.005, 0, _SUN),
    ("Cr I", 5206.04, 0.30, 0.008, 0, _SUN),
    ("Cr I", 5208.42, 0.28, 0.007, 0, _SUN),
    ("Cr I", 5409.77, 0.14, 0.003, 0, _SUN),
    ("Mn I", 4030.75, 0.30, 0.008, 0, _SUN),
    ("Mn I", 4033.06, 0.25, 0.006, 0, _SUN),
    ("Mn I", 4034.48, 0.20, 0.005, 0, _SUN),
    ("Mn I", 4783.43, 0.14, 0.003, 0, _SUN),
    ("Mn I", 4823.52, 0.14, 0.003, 0, _SUN),
    ("Ni I", 5476.90, 0.18, 0.004, 0, _SUN),
    ("Fe I", 3820.43, 1.20, 0.06, 0.6, _SUN),
    ("Fe I", 3859.91, 1.10, 0.05, 0.6, _SUN),
    ("Fe I", 3886.28, 0.80, 0.03, 0, _SUN),
    ("Fe I", 4045.81, 1.17, 0.05, 0.6, _SUN),
    ("Fe I", 4063.59, 0.79, 0.03, 0, _SUN),
    ("Fe I", 4071.74, 0.72, 0.03, 0, _SUN),
    ("Fe I", 4132.06, 0.25, 0.006, 0, _SUN),
    ("Fe I", 4143.87, 0.26, 0.006, 0, _SUN),
    ("Fe I", 4191.43, 0.15, 0.003, 0, _SUN),
    ("Fe I", 4202.03, 0.33, 0.008, 0, _SUN),
    ("Fe I", 4250.12, 0.20, 0.005, 0, _SUN),
    ("Fe I", 4250.79, 0.35, 0.008, 0, _SUN),
    ("Fe I", 4260.47, 0.55, 0.015, 0, _SUN),
    ("Fe I", 4271.76, 0.75, 0.025, 0, _SUN),
    ("Fe I", 4307.90, 0.80, 0.025, 0, _SUN),
    ("Fe I", 4325.76, 0.80, 0.025, 0, _SUN),
    ("Fe I", 4383.55, 1.00, 0.04, 0.6, _SUN),
    ("Fe I", 4404.75, 0.90, 0.03, 0, _SUN),
    ("Fe I", 4415.12, 0.42, 0.012, 0, _SUN),
    ("Fe I", 4461.65, 0.18, 0.004, 0, _SUN),
    ("Fe I", 4528.61, 0.20, 0.005, 0, _SUN),
    ("Fe I", 4890.76, 0.30, 0.008, 0, _SUN),
    ("Fe I", 4891.49, 0.31, 0.008, 0, _SUN),
    ("Fe I", 4918.99, 0.20, 0.005, 0, _SUN),
    ("Fe I", 4920.50, 0.43, 0.012, 0, _SUN),
    ("Fe I", 4957.60, 0.38, 0.01, 0, _SUN),
    ("Fe I", 5012.07, 0.18, 0.004, 0, _SUN),
    ("Fe I", 5049.82, 0.15, 0.003, 0, _SUN),
    ("Fe I", 5110.41, 0.14, 0.003, 0, _SUN),
    ("Fe I", 5167.49, 0.25, 0.006, 0, _SUN),
    ("Fe I", 5227.19, 0.30, 0.008, 0, _SUN),
    ("Fe I", 5232.94, 0.35, 0.01, 0, _SUN),
    ("Fe I", 5269.54, 0.48, 0.015, 0, _SUN),
    ("Fe I", 5328.04, 0.38, 0.01, 0, _SUN),
    ("Fe I", 5332.90, 0.12, 0.003, 0, _SUN),
    ("Fe I", 5339.93, 0.17, 0.004, 0, _SUN),
    ("Fe I", 5371.49, 0.33, 0.008, 0, _SUN),
    ("Fe I", 5397.13, 0.24, 0.006, 0, _SUN),
    ("Fe I", 5405.77, 0.27, 0.007, 0, _SUN),
    ("Fe I", 5429.70, 0.29, 0.007, 0, _SUN),
    ("Fe I", 5446.92, 0.25, 0.006, 0, _SUN),
    ("Fe I", 5455.61, 0.22, 0.005, 0, _SUN),
    ("Fe I", 5497.52, 0.12, 0.003, 0, _SUN),
    ("Fe I", 5501.47, 0.11, 0.003, 0, _SUN),
    ("Fe I", 5506.78, 0.12, 0.003, 0, _SUN),
    ("Fe I", 5586.76, 0.20, 0.005, 0, _SUN),
    ("Fe I", 5615.64, 0.22, 0.005, 0, _SUN),
    ("Fe I", 6136.61, 0.15, 0.003, 0, _SUN),
    ("Fe I", 6191.56, 0.14, 0.003, 0, _SUN),
    ("Fe I", 6230.72, 0.15, 0.003, 0, _SUN),
    ("Fe I", 6252.56, 0.13, 0.003, 0, _SUN),
    ("Fe I", 6393.60, 0.13, 0.003, 0, _SUN),
    ("Fe I", 6400.00, 0.14, 0.003, 0, _SUN),
    ("Fe I", 6494.98, 0.16, 0.004, 0, _SUN),
    ("Fe I", 6546.24, 0.10, 0.002, 0, _SUN),
    ("Fe I", 8327.05, 0.25, 0.006, 0, _SUN),
    ("Fe I", 8387.77, 0.30, 0.008, 0, _SUN),
    ("Fe I", 8468.41, 0.20, 0.005, 0, _SUN),
    ("Fe I", 8514.07, 0.20, 0.005, 0, _SUN),
    ("Fe I", 8688.62, 0.30, 0.008, 0, _SUN),
    ("Fe I", 8824.22, 0.25, 0.006, 0, _SUN),
    ("Fe II", 4233.17, 0.13, 0.003, 0, _SUN),
    ("Fe II", 4351.77, 0.10, 0.002, 0, _SUN),
    ("Fe II", 4508.28, 0.08, 0.002, 0, _SUN),
    ("Fe II", 4515.34, 0.08, 0.002, 0, _SUN),
    ("Fe II", 4520.22, 0.08, 0.002, 0, _SUN),
    ("Fe II", 4583.84, 0.12, 0.003, 0, _SUN),
    ("Fe II", 4923.93, 0.17, 0.004, 0, _SUN),
    ("Fe II", 5018.44, 0.20, 0.005, 0, _SUN),
    ("Fe II", 5169.03, 0.23, 0.006, 0, _SUN),
    ("Fe II", 5197.58, 0.09, 0.002, 0, _SUN),
    ("Fe II", 5234.62, 0.09, 0.002, 0, _SUN),
    ("Fe II", 5316.62, 0.11, 0.003, 0, _SUN),
    ("Fe II", 6456.38, 0.07, 0.002, 0, _SUN),
    ("Sr II", 4077.71, 0.43, 0.01, 0, _SUN),  # luminosity indicator
    ("Sr II", 4215.52, 0.25, 0.006, 0, _SUN),
    ("Ba II", 4554.03, 0.16, 0.004, 0, _SUN),
    ("Ba II", 4934.08, 0.15, 0.003, 0, _SUN),
    ("Ba II", 5853.67, 0.06, 0.002, 0, _SUN),
    ("Ba II", 6141.71, 0.12, 0.003, 0, _SUN),
    ("Ba II", 6496.90, 0.10, 0.002, 0, _SUN),
    ("Sc II", 4246.82, 0.20, 0.005, 0, _SUN),
    ("Sc II", 5526.79, 0.08, 0.002, 0, _SUN),
    ("O I", 7771.94, 0.07, 0.002, 0, _SUN),
    ("O I", 7774.17, 0.06, 0.002, 0, _SUN),
    ("O I", 7775.39, 0.05, 0.002, 0, _SUN),
    ("He I", 4026.19, 1.0, 0.02, 0, 18000.0),
    ("He I", 4387.93, 0.5, 0.01, 0, 18000.0),
    ("He I", 4471.48, 1.2, 0.02, 0, 18000.0),
    ("He I", 4921.93, 0.6, 0.01, 0, 18000.0),
    ("He I", 5015.68, 0.4, 0.01, 0, 18000.0),
    ("He I", 5875.62, 0.9, 0.02, 0, 18000.0),
    ("He I", 6678.15, 0.6, 0.01, 0, 18000.0),
)

# hydrogen: name, air wavelength, EW multiplier relative to H-beta, Stark-width multiplier
BALMER_LINES: tuple[tuple[str, float, float, float], ...] = (
    ("Halpha", 6562.80, 0.85, 0.7),
    ("Hbeta", 4861.33, 1.00, 1.0),
    ("Hgamma", 4340.47, 1.05, 1.1),
    ("Hdelta", 4101.74, 1.05, 1.2),
    ("Hepsilon", 3970.07, 1.00, 1.25),
    ("H8", 3889.05, 0.90, 1.3),
    ("H9", 3835.38, 0.80, 1.3),
    ("H10", 3797.90, 0.70, 1.3),
    ("H11", 3770.63, 0.60, 1.3),
    ("H12", 3750.15, 0.50, 1.3),
)
PASCHEN_LINES: tuple[tuple[str, float, float, float], ...] = (
    ("P11", 8862.78, 0.22, 1.5),
    ("P12", 8750.47, 0.20, 1.5),
    ("P13", 8665.02, 0.18, 1.5),
    ("P14", 8598.39, 0.16, 1.5),
    ("P15", 8545.38, 0.14, 1.5),
    ("P16", 8502.48, 0.12, 1.5),
)
HYDROGEN_LINES = BALMER_LINES + PASCHEN_LINES
# H-beta of a dwarf (log g 4.3): equivalent width (A) and Stark HWHM (A) against Teff (K).
# An empirical-looking table, peaked near 9500 K as observed; not computed from model atmospheres.
_HBETA_TABLE = np.array(
    [  # Teff (K), EW (A), Stark HWHM (A)
        (3000, 0.25, 0.9),
        (3500, 0.5, 1),
        (4000, 0.9, 1.2),
        (4500, 1.4, 1.5),
        (5000, 2, 1.8),
        (5500, 2.9, 2.1),
        (6000, 4, 2.5),
        (6500, 5.8, 3.1),
        (7000, 7.8, 4),
        (7500, 10, 5.2),
        (8000, 12, 6.5),
        (8500, 13.5, 8),
        (9000, 14.5, 9),
        (9500, 15, 9.5),
        (10000, 14.8, 9.5),
        (11000, 13.5, 9),
        (12000, 12, 8.5),
        (14000, 9.5, 7.5),
        (16000, 8, 7),
        (20000, 5.5, 6),
    ]
)
_HBETA_TEFF, _HBETA_EW, _HBETA_GAMMA = _HBETA_TABLE.T
STARK_GRID_A = np.array([0.3, 0.7, 1.6, 3.6, 8.0, 18.0, 40.0])  # HWHM of the Stark-profile basis

# molecular bands: molecule, head (air A), direction the band fades to, e-folding length (A),
# relative strength within the molecule.
MOLECULAR_BANDS: tuple[tuple[str, float, str, float, float], ...] = (
    ("TiO", 4761.0, "red", 40.0, 0.35),
    ("TiO", 4954.6, "red", 60.0, 0.60),
    ("TiO", 5166.7, "red", 70.0, 0.75),
    ("TiO", 5448.0, "red", 70.0, 0.65),
    ("TiO", 5597.9, "red", 60.0, 0.50),
    ("TiO", 5847.0, "red", 60.0, 0.45),
    ("TiO", 6158.7, "red", 90.0, 0.85),
    ("TiO", 6651.3, "red", 60.0, 0.50),
    ("TiO", 7054.2, "red", 40.0, 1.00),
    ("TiO", 7087.7, "red", 40.0, 0.60),
    ("TiO", 7125.6, "red", 90.0, 0.80),
    ("TiO", 7589.3, "red", 80.0, 0.55),
    ("TiO", 8432.5, "red", 60.0, 0.40),
    ("TiO", 8859.6, "red", 60.0, 0.30),
    ("VO", 7400.0, "red", 80.0, 0.60),
    ("VO", 7865.0, "red", 100.0, 0.70),
    ("MgH", 4780.0, "violet", 60.0, 0.40),
    ("MgH", 5211.0, "violet", 110.0, 1.00),
    ("CaH", 6382.0, "red", 40.0, 0.50),
    ("CaH", 6750.0, "red", 140.0, 1.00),
    ("CN", 3883.4, "violet", 35.0, 1.00),
    ("CN", 4215.5, "violet", 45.0, 0.70),
    ("CN", 7875.0, "red", 100.0, 0.25),
    ("CN", 8090.0, "red", 100.0, 0.20),
    ("CH", 4314.0, "violet", 25.0, 1.00),  # G band
    ("C2", 4382.5, "violet", 60.0, 0.40),  # Swan bands
    ("C2", 4737.1, "violet", 120.0, 0.80),
    ("C2", 5165.2, "violet", 130.0, 1.00),
    ("C2", 5635.5, "violet", 130.0, 0.80),
    ("C2", 6191.2, "violet", 100.0, 0.50),
)
MOLECULES = ("TiO", "VO", "MgH", "CaH", "CN", "CH", "C2")

# interstellar: diffuse bands and Na D; name, air wavelength, EW per mag of E(B-V), Gaussian sigma (A)
INTERSTELLAR_LINES: tuple[tuple[str, float, float, float], ...] = (
    ("DIB4428", 4428.2, 1.9, 7.5),
    ("DIB5780", 5780.5, 0.46, 0.9),
    ("DIB5797", 5797.1, 0.17, 0.4),
    ("DIB6284", 6283.8, 0.90, 1.7),
    ("DIB6614", 6613.6, 0.19, 0.5),
    ("ISM NaD2", 5889.95, 0.30, 0.05),
    ("ISM NaD1", 5895.92, 0.25, 0.05),
)

# telluric absorption (air): name, head or centre, shape, length/sigma (A), depth tau at airmass 1
TELLURIC_BANDS: tuple[tuple[str, float, str, float, float], ...] = (
    ("O2 B", 6867.2, "red", 20.0, 0.30),
    ("O2 A", 7594.0, "red", 22.0, 0.80),
    ("H2O", 7250.0, "gauss", 45.0, 0.06),
    ("H2O", 8230.0, "gauss", 70.0, 0.07),
    ("H2O", 8990.0, "gauss", 60.0, 0.12),
)

# emission lines used for emission-line stars: name, air wavelength, EW relative to the key line
EMISSION_LINES: tuple[tuple[str, float, str, float], ...] = (
    ("Halpha", 6562.80, "balmer", 1.00),
    ("Hbeta", 4861.33, "balmer", 0.30),
    ("Hgamma", 4340.47, "balmer", 0.16),
    ("Hdelta", 4101.74, "balmer", 0.10),
    ("Hepsilon", 3970.07, "balmer", 0.07),
    ("H8", 3889.05, "balmer", 0.05),
    ("He I 5876", 5875.62, "balmer", 0.04),
    ("[O III] 4959", 4958.91, "oiii", 0.33),
    ("[O III] 5007", 5006.84, "oiii", 1.00),
    ("[N II] 6548", 6548.05, "oiii", 0.15),
    ("[N II] 6583", 6583.45, "oiii", 0.45),
)

# night-sky emission (air): wavelength, integrated strength in A of sky continuum.
# [O I], Na I, Hg I (street lights near Xinglong) and a few strong OH Meinel lines (approximate).
SKY_LINES: tuple[tuple[float, float], ...] = (
    (4046.56, 3.0),
    (4358.34, 8.0),
    (5460.74, 9.0),
    (5577.34, 40.0),
    (5769.60, 3.0),
    (5790.66, 3.0),
    (5889.95, 10.0),
    (5895.92, 7.0),
    (6300.30, 20.0),
    (6363.78, 7.0),
    (6498.73, 4.0),
    (6533.04, 4.0),
    (6863.96, 8.0),
    (6923.19, 5.0),
    (7276.40, 7.0),
    (7316.28, 12.0),
    (7340.89, 12.0),
    (7369.25, 7.0),
    (7750.64, 12.0),
    (7794.11, 12.0),
    (7821.50, 7.0),
    (7913.71, 12.0),
    (7993.33, 14.0),
    (8344.60, 20.0),
    (8399.17, 20.0),
    (8430.17, 15.0),
    (8465.36, 12.0),
    (8493.39, 10.0),
    (8791.19, 15.0),
    (8827.10, 22.0),
    (8885.85, 20.0),
    (8919.63, 12.0),
    (8943.40, 20.0),
    (8988.40, 18.0),
    (9001.20, 10.0),
)

# statistical weak-line forest (line blanketing): NOT real lines; positions drawn once, fixed seed
FOREST_SEED = 20250711
FOREST_GROUPS: tuple[tuple[str, int, float], ...] = (
    # species behaviour, number of lines over 3650-9150 A, mean solar EW (A)
    ("Fe I", 2600, 0.045),
    ("Fe II", 500, 0.03),
    ("Ti I", 900, 0.03),
    ("Cr I", 600, 0.03),
)


# --------------------------------------------------------------------------------------------
# label physics: how strengths follow the labels


def _softplus(x: np.ndarray, scale: float = 0.04) -> np.ndarray:
    return scale * np.logaddexp(0.0, x / scale)


def _log_temperature_law(species: Species, theta: np.ndarray) -> np.ndarray:
    """log10 of the temperature factor of a species' line strengths, theta = 5040 / Teff."""
    if species.ionised:
        d = theta - species.theta0
        width = np.where(d < 0, species.a, species.b)
        return -0.5 * (d / width) ** 2
    # neutral: rises to the cool side with slope a, falls with slope b above the knee, and
    # flattens below ~4000 K where molecules take over the opacity
    x = theta - species.theta0
    return (
        species.a * x
        - (species.b - species.a) * _softplus(-x)
        - species.a * _softplus(theta - 1.30)
    )


def _doppler_ew(wavelength: np.ndarray, teff: np.ndarray) -> np.ndarray:
    """EW (A) where the curve of growth leaves the linear part: ~2 x Doppler width, 2 km/s micro."""
    return 0.06 * (wavelength / 5000.0) * (teff / SUN_TEFF) ** 0.25


def curve_of_growth(
    strength: np.ndarray, w_doppler: np.ndarray, w_damping: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Equivalent width (A) from a line strength X (A, = EW in the weak-line limit).

    Linear (W = X) for weak lines, flat (W ~ W_D sqrt(2 ln X/W_D)) once the core saturates, and
    damping (W ~ sqrt(X W_L)) for the strongest. Returns (W, W_flat): W_flat is the part carried by
    the saturated Doppler core, the rest sits in the damping wings.
    """
    x = np.maximum(strength, 0.0)
    w_flat = w_doppler * np.sqrt(np.log1p((x / w_doppler) ** 2))
    w_damp2 = x * w_damping * x / (x + w_doppler)
    return np.sqrt(w_flat**2 + w_damp2), w_flat


def _invert_cog(target: np.ndarray, w_doppler: np.ndarray, w_damping: np.ndarray) -> np.ndarray:
    """Strength X that gives equivalent width ``target`` (bisection in log X, vectorised)."""
    lo = np.full_like(target, -8.0)
    hi = np.full_like(target, 8.0)
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        w, _ = curve_of_growth(10.0**mid, w_doppler, w_damping)
        too_big = w > target
        hi = np.where(too_big, mid, hi)
        lo = np.where(too_big, lo, mid)
    return 10.0 ** (0.5 * (lo + hi))


def default_alpha(fe_h: np.ndarray) -> np.ndarray:
    """Milky-Way-like [alpha/M] for a given [Fe/H] (plateau +0.3 below -1, 0 above 0)."""
    return np.clip(-0.3 * np.asarray(fe_h, dtype=float), 0.0, 0.3)


@dataclass
class StarLabels:
    """Labels of a batch of stars, filled with defaults; every field has shape (n,)."""

    teff: np.ndarray
    logg: np.ndarray
    fe_h: np.ndarray
    alpha_m: np.ndarray
    a_v: np.ndarray
    rv: np.ndarray
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.teff)

    @classmethod
    def from_dict(cls, labels: dict[str, np.ndarray]) -> StarLabels:
        teff = np.asarray(labels["teff"], dtype=np.float64)
        n = teff.shape[0]

        def get(name: str, default: float | np.ndarray) -> np.ndarray:
            value = labels.get(name)
            base = np.broadcast_to(np.asarray(default, dtype=np.float64), (n,))
            if value is None:
                return base.copy()
            value = np.broadcast_to(np.asarray(value, dtype=np.float64), (n,))
            return np.where(np.isfinite(value), value, base)

        teff = np.clip(np.where(np.isfinite(teff), teff, 5000.0), 2800.0, 25000.0)
        fe_h = np.clip(get("fe_h", 0.0), -5.0, 1.0)
        known = {"teff", "logg", "fe_h", "alpha_m", "a_v", "rv"}
        extra = {
            k: np.broadcast_to(np.asarray(v, dtype=np.float64), (n,))
            for k, v in labels.items()
            if k not in known
            and k not in ("companion", "flux_ratio", "snr", "plate_terms")
            and not isinstance(v, dict)
        }
        return cls(
            teff=teff,
            logg=np.clip(get("logg", 4.4), -1.0, 6.0),
            fe_h=fe_h,
            alpha_m=np.clip(get("alpha_m", default_alpha(fe_h)), -0.5, 1.0),
            a_v=np.clip(get("a_v", 0.0), 0.0, 20.0),
            rv=np.clip(get("rv", 0.0), -MAX_RV_KMS, MAX_RV_KMS),
            extra=extra,
        )

    def get(self, name: str, default: float) -> np.ndarray:
        value = self.extra.get(name)
        if value is None:
            return np.full(self.n, default)
        return np.where(np.isfinite(value), value, default)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def molecular_strengths(stars: StarLabels) -> dict[str, np.ndarray]:
    """Optical depth at the band head of each molecule's strongest band, shape (n,) each.

    Heuristic laws: TiO switches on below ~4000 K in dwarfs and giants alike and scales with
    [Ti/H]+[O/H]; VO only in late M; MgH and CaH need high gravity (dwarfs); CN is stronger in
    giants; CH (G band) peaks in G-K stars; C2 is absent unless the ``c2`` label says so
    (carbon stars). ``tio_scale``, ``cn_scale``, ``ch_scale`` multiply the bands.
    """
    t, dg = stars.teff, stars.logg - SUN_LOGG
    metal = stars.fe_h + stars.alpha_m
    cool = np.clip((4000.0 - t) / 900.0, 0.0, None)
    tio = 2.0 * cool**1.2 * 10.0 ** (0.8 * np.clip(metal, -3.0, 0.6)) / (1.0 + 0.3 * cool**1.2)
    vo = (
        0.6
        * np.clip((3300.0 - t) / 400.0, 0.0, None) ** 1.5
        * 10.0 ** (0.5 * np.clip(stars.fe_h, -3, 0.6))
    )
    mgh = (
        0.35
        * _sigmoid((4900.0 - t) / 250.0)
        * 10.0 ** (0.45 * np.clip(dg, -3.0, 0.8))
        * 10.0 ** (0.4 * np.clip(metal, -3, 0.6))
    )
    cah = (
        0.55
        * _sigmoid((3800.0 - t) / 180.0)
        * 10.0 ** (0.6 * np.clip(dg, -3.0, 0.8))
        * 10.0 ** (0.25 * np.clip(stars.fe_h, -3, 0.6))
    )
    theta = 5040.0 / t
    cn = (
        0.25
        * np.exp(-0.5 * ((theta - 1.15) / 0.18) ** 2)
        * 10.0 ** (-0.25 * np.clip(dg, -3.0, 1.0))
        * 10.0 ** (0.8 * np.clip(stars.fe_h, -3, 0.6))
    )
    ch = (
        0.55
        * np.exp(-0.5 * ((theta - 1.02) / 0.17) ** 2)
        * 10.0 ** (0.6 * np.clip(stars.fe_h, -3, 0.6))
    )
    return {
        "TiO": tio * stars.get("tio_scale", 1.0),
        "VO": vo * stars.get("tio_scale", 1.0),
        "MgH": mgh,
        "CaH": cah,
        "CN": cn * stars.get("cn_scale", 1.0),
        "CH": ch * stars.get("ch_scale", 1.0),
        "C2": stars.get("c2", 0.0),
    }


def hydrogen_lines(stars: StarLabels) -> tuple[np.ndarray, np.ndarray]:
    """H-beta equivalent width (A) and Stark HWHM (A) for each star, shape (n,) each.

    The EW peaks near 9500 K; above ~7000 K it grows with gravity (Stark wings), in cool stars
    hardly at all. The Stark width grows as g^0.35 at every temperature.
    """
    logt = np.log10(stars.teff)
    ew = np.interp(logt, np.log10(_HBETA_TEFF), _HBETA_EW)
    gamma = np.interp(logt, np.log10(_HBETA_TEFF), _HBETA_GAMMA)
    dg = np.clip(stars.logg - 4.3, -4.0, 1.5)
    g_slope = np.interp(stars.teff, [6000.0, 8500.0], [0.06, 0.30])
    return ew * 10.0 ** (g_slope * dg), gamma * 10.0 ** (0.35 * dg)


# --------------------------------------------------------------------------------------------
# the profile basis: every line, band and feature as a column on a pixel grid (cached)


@dataclass
class Basis:
    """Unit profiles of every feature on one pixel grid (with PAD_PIX extra pixels each side).

    ``stellar``: (RV_PHASES, K, m_pad) float32 optical-depth profiles that move with the star's
    velocity, each phase displaced by a further 1/RV_PHASES pixel;
    ``fixed``: (K2, m) profiles at rest in the observatory frame (interstellar, telluric);
    ``stellar_names``/``fixed_names``: the column names in order.
    """

    loglam: np.ndarray
    wavelength: np.ndarray
    stellar: np.ndarray
    stellar_keep: np.ndarray  # which of all stellar columns are kept on this grid
    stellar_names: list[str]
    fixed: np.ndarray
    fixed_names: list[str]
    atomic_x_sun: np.ndarray  # curve-of-growth strength X of each atomic line at its reference star
    forest_x_sun: np.ndarray
    response: np.ndarray  # (m,) instrumental throughput (peak 1)
    sky: np.ndarray  # (m,) sky spectrum in units of the sky continuum at 5000 A (continuum + lines)
    sky_lines: np.ndarray  # (m,) the line part of ``sky``
    extinction: np.ndarray  # (m,) A_lambda / A_V (CCM, R_V = 3.1)
    g_band: slice  # pixels of the g-band S/N window
    dichroic_noise: np.ndarray  # (m,) variance boost where the two arms are stitched
    dichroic_pixels: np.ndarray  # where that boost exceeds 0.1%
    sky_line_pixels: np.ndarray  # where the sky lines exceed 1e-4 of the continuum


def _fine_grid(loglam_pad: np.ndarray) -> np.ndarray:
    """Sub-pixel centres (OVERSAMPLE per pixel) in log10(lambda)."""
    step = grids.LRS_LOGLAM_STEP / OVERSAMPLE
    offsets = (np.arange(OVERSAMPLE) - (OVERSAMPLE - 1) / 2) * step
    return (loglam_pad[:, None] + offsets[None, :]).ravel()


def _to_pixels(fine_profiles: np.ndarray, m_pad: int) -> np.ndarray:
    """LSF-convolve sub-pixel profiles (K, m_pad * OVERSAMPLE) and average them into pixels."""
    conv = gaussian_filter1d(
        fine_profiles, LSF_SIGMA_PIX * OVERSAMPLE, axis=1, mode="constant", truncate=5.0
    )
    return conv.reshape(len(fine_profiles), m_pad, OVERSAMPLE).mean(axis=2)


def _gaussian_columns(
    centres_vac: np.ndarray, sigma_a: np.ndarray, loglam_pad: np.ndarray
) -> np.ndarray:
    """Area-normalised (per Angstrom) Gaussians convolved with the LSF, pixel-integrated.

    An intrinsic Gaussian of sigma_a (A) convolved with the Gaussian LSF stays a Gaussian, so this
    is analytic: the per-pixel area (erf differences at pixel edges) divided by the pixel width.
    """
    half = 0.5 * grids.LRS_LOGLAM_STEP
    lam = 10.0**loglam_pad
    lsf_a = lam[None, :] * np.log(10.0) * grids.LRS_LOGLAM_STEP * LSF_SIGMA_PIX
    sigma = np.sqrt(lsf_a**2 + np.asarray(sigma_a, dtype=float)[:, None] ** 2)
    lo = (10.0 ** (loglam_pad - half))[None, :] - centres_vac[:, None]
    hi = (10.0 ** (loglam_pad + half))[None, :] - centres_vac[:, None]
    area = 0.5 * (erf(hi / (np.sqrt(2) * sigma)) - erf(lo / (np.sqrt(2) * sigma)))
    return area / (hi - lo)


def _wing_columns(
    centres_vac: np.ndarray, hwhm: np.ndarray, loglam_pad: np.ndarray, kind: str
) -> np.ndarray:
    """Area-normalised Lorentzian ("lorentz") or Stark-like |x|^-2.5 ("stark") wings, LSF-convolved."""
    fine = 10.0 ** _fine_grid(loglam_pad)
    x = (fine[None, :] - centres_vac[:, None]) / hwhm[:, None]
    if kind == "lorentz":
        profile = 1.0 / (np.pi * hwhm[:, None] * (1.0 + x**2))
    else:  # Stark-like: integral of 1/(1+|x|^2.5) over the line is 2 (pi/2.5) / sin(pi/2.5)
        norm = 2.0 * (np.pi / 2.5) / np.sin(np.pi / 2.5)
        profile = 1.0 / (norm * hwhm[:, None] * (1.0 + np.abs(x) ** 2.5))
    return _to_pixels(profile, len(loglam_pad))


def _band_columns(
    heads_vac: np.ndarray, directions: list[str], lengths: np.ndarray, loglam_pad: np.ndarray
) -> np.ndarray:
    """Saw-tooth bands with unit optical depth at the head: a sharp edge at the head, then an
    exponential fade to the red ("red") or the blue ("violet"); Gaussians for "gauss"; LSF-convolved."""
    fine = 10.0 ** _fine_grid(loglam_pad)
    d = fine[None, :] - heads_vac[:, None]
    length = lengths[:, None]
    red = np.where(d >= 0, np.exp(-np.clip(d, 0, None) / length), 0.0)
    violet = np.where(d <= 0, np.exp(-np.clip(-d, 0, None) / length), 0.0)
    gauss = np.exp(-0.5 * (d / length) ** 2)
    kind = np.array(directions)[:, None]
    profile = np.where(kind == "red", red, np.where(kind == "violet", violet, gauss))
    return _to_pixels(profile, len(loglam_pad))


def _forest_lines() -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The statistical weak-line forest: per group, (species, vacuum wavelengths, solar EWs)."""
    rng = np.random.default_rng(FOREST_SEED)
    groups = []
    for species, count, mean_ew in FOREST_GROUPS:
        # line density ~ lambda^-3 (many more weak lines in the blue), log-normal strengths
        u = rng.random(count)
        lo, hi = 3650.0**-2, 9150.0**-2
        wave = (lo + u * (hi - lo)) ** -0.5
        ew = mean_ew * rng.lognormal(-0.5 * 0.7**2, 0.7, count)
        groups.append((species, air_to_vacuum(wave), ew))
    return groups


def ccm_extinction(wavelength_a: np.ndarray, r_v: float = 3.1) -> np.ndarray:
    """A_lambda / A_V of Cardelli, Clayton & Mathis (1989), optical and near-IR branches."""
    x = 1e4 / np.asarray(wavelength_a, dtype=float)  # inverse microns
    y = x - 1.82
    a_opt = (
        1
        + 0.17699 * y
        - 0.50447 * y**2
        - 0.02427 * y**3
        + 0.72085 * y**4
        + 0.01979 * y**5
        - 0.77530 * y**6
        + 0.32999 * y**7
    )
    b_opt = (
        1.41338 * y
        + 2.28305 * y**2
        + 1.07233 * y**3
        - 5.38434 * y**4
        - 0.62251 * y**5
        + 5.30260 * y**6
        - 2.09002 * y**7
    )
    a_ir, b_ir = 0.574 * x**1.61, -0.527 * x**1.61
    a = np.where(x >= 1.1, a_opt, a_ir)
    b = np.where(x >= 1.1, b_opt, b_ir)
    return a + b / r_v


def instrument_response(wavelength_a: np.ndarray) -> np.ndarray:
    """A smooth LAMOST-like total throughput (peak 1): blue and red arms joined by a dichroic at
    ~5800 A, with a loss where both arms are weak (the crossover). Heuristic, not measured."""
    lam = np.asarray(wavelength_a, dtype=float)
    blue = np.exp(-0.5 * (np.log(lam / 4900.0) / 0.16) ** 2)
    red = np.exp(-0.5 * (np.log(lam / 7200.0) / 0.17) ** 2)
    to_red = 1.0 / (1.0 + np.exp(-(lam - DICHROIC_A) / 35.0))
    crossover = 1.0 - 0.45 * np.exp(-0.5 * ((lam - DICHROIC_A) / 70.0) ** 2)
    response = (blue * (1.0 - to_red) + 0.95 * red * to_red) * crossover
    return response / response.max()


def _sky_spectrum(loglam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Night sky (continuum + lines) in units of the sky continuum at 5000 A, and its line part."""
    lam = 10.0**loglam
    continuum = (lam / 5000.0) ** 0.6 * (
        1.0 + 1.5 * _sigmoid((lam - 7200.0) / 400.0)
    )  # OH pseudo-continuum
    waves = air_to_vacuum(np.array([w for w, _ in SKY_LINES]))
    strength = np.array([s for _, s in SKY_LINES])
    lines = (strength[:, None] * _gaussian_columns(waves, np.zeros(len(waves)), loglam)).sum(axis=0)
    return continuum + lines, lines


def _stellar_columns(loglam_pad: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Every stellar feature as a column (K, m_pad) on a padded pixel grid, float32."""
    step = grids.LRS_LOGLAM_STEP
    columns, names = [], []
    # atomic lines: a Gaussian core column each, plus a Lorentz wing column for damped lines
    wave = air_to_vacuum(np.array([line[1] for line in ATOMIC_LINES]))
    columns.append(_gaussian_columns(wave, np.zeros(len(wave)), loglam_pad))
    names += [f"{s} {w:.0f}" for s, w, *_ in ATOMIC_LINES]
    damped = np.array([line[4] > 0 for line in ATOMIC_LINES])
    hwhm = np.array([line[4] for line in ATOMIC_LINES])
    columns.append(_wing_columns(wave[damped], hwhm[damped], loglam_pad, "lorentz"))
    names += [
        f"{ATOMIC_LINES[i][0]} {ATOMIC_LINES[i][1]:.0f} wings" for i in np.flatnonzero(damped)
    ]
    # hydrogen: an LSF core each and Stark wings on a grid of widths
    h_wave = air_to_vacuum(np.array([h[1] for h in HYDROGEN_LINES]))
    columns.append(_gaussian_columns(h_wave, np.zeros(len(h_wave)), loglam_pad))
    names += [f"{h[0]} core" for h in HYDROGEN_LINES]
    for width in STARK_GRID_A:  # each star's width is interpolated between these columns
        columns.append(_wing_columns(h_wave, np.full(len(h_wave), width), loglam_pad, "stark"))
        names += [f"{h[0]} stark {width:g}" for h in HYDROGEN_LINES]
    # molecular bands
    b_wave = air_to_vacuum(np.array([b[1] for b in MOLECULAR_BANDS]))
    columns.append(
        _band_columns(
            b_wave,
            [b[2] for b in MOLECULAR_BANDS],
            np.array([b[3] for b in MOLECULAR_BANDS]),
            loglam_pad,
        )
    )
    names += [f"{b[0]} {b[1]:.0f}" for b in MOLECULAR_BANDS]
    # weak-line forest, one column per group (sum of its lines, weighted by solar EW)
    fine = _fine_grid(loglam_pad)
    dlam = 10.0**fine * np.log(10.0) * step / OVERSAMPLE
    for species, f_wave, f_ew in _forest_lines():
        idx = np.searchsorted(fine, np.log10(f_wave))
        inside = (idx > 0) & (idx < len(fine))
        deltas = np.bincount(idx[inside], weights=f_ew[inside], minlength=len(fine)).astype(float)
        # a line of EW w inside one sub-pixel of width d_lambda is a density w / d_lambda
        columns.append(_to_pixels((deltas / dlam)[None, :], len(loglam_pad)))
        names.append(f"forest {species}")
    return np.concatenate(columns, axis=0).astype(np.float32), names


@functools.lru_cache(maxsize=4)
def _basis(which: str) -> Basis:
    """Build (once) the profile basis on the "canonical" or the "full" grid."""
    loglam = grids.LRS_LOGLAM if which == "canonical" else FULL_LOGLAM
    step = grids.LRS_LOGLAM_STEP
    loglam_pad = np.concatenate(
        [
            loglam[0] - step * np.arange(PAD_PIX, 0, -1),
            loglam,
            loglam[-1] + step * np.arange(1, PAD_PIX + 1),
        ]
    )
    # RV_PHASES copies of the stellar basis, features displaced by j / RV_PHASES pixel: evaluating
    # the profiles on a grid moved the other way displaces them exactly, with no interpolation
    phases = []
    for j in range(RV_PHASES):
        columns, names = _stellar_columns(loglam_pad - step * j / RV_PHASES)
        phases.append(columns)
    # columns that never reach this grid (e.g. H-alpha for the canonical one) are dropped
    keep = np.flatnonzero(np.max(np.abs(np.stack(phases)), axis=(0, 2)) > 1e-7)

    # rest-frame (unshifted) features: interstellar, then telluric (only where they fall)
    ism_wave = air_to_vacuum(np.array([d[1] for d in INTERSTELLAR_LINES]))
    fixed = [_gaussian_columns(ism_wave, np.array([d[3] for d in INTERSTELLAR_LINES]), loglam)]
    fixed_names = [d[0] for d in INTERSTELLAR_LINES]
    t_wave = air_to_vacuum(np.array([t[1] for t in TELLURIC_BANDS]))
    fixed.append(
        _band_columns(
            t_wave, [t[2] for t in TELLURIC_BANDS], np.array([t[3] for t in TELLURIC_BANDS]), loglam
        )
    )
    fixed_names += [t[0] for t in TELLURIC_BANDS]
    fixed_arr = np.concatenate(fixed, axis=0).astype(np.float32)

    # strengths of the atomic lines at their reference stars, by inverting the curve of growth
    wave = air_to_vacuum(np.array([line[1] for line in ATOMIC_LINES]))
    ref_teff = np.array([line[5] for line in ATOMIC_LINES])
    w_ref = np.array([line[2] for line in ATOMIC_LINES])
    w_l = np.array([line[3] for line in ATOMIC_LINES])
    x_ref = _invert_cog(w_ref, _doppler_ew(wave, ref_teff), w_l)
    forest_ew = np.array([g[2] for g in FOREST_GROUPS])
    forest_x = _invert_cog(
        forest_ew,
        _doppler_ew(np.full(len(forest_ew), 4500.0), SUN_TEFF),
        np.full(len(forest_ew), 0.002),
    )

    lam = 10.0**loglam
    sky, sky_lines = _sky_spectrum(loglam)
    g_idx = np.flatnonzero((lam >= G_BAND_A[0]) & (lam <= G_BAND_A[1]))
    dichroic_noise = 1.0 + 1.5 * np.exp(-0.5 * ((lam - DICHROIC_A) / 40.0) ** 2)
    return Basis(
        loglam=loglam,
        wavelength=lam,
        stellar=np.ascontiguousarray(np.stack(phases)[:, keep]),
        stellar_keep=keep,
        stellar_names=[names[k] for k in keep],
        fixed=fixed_arr,
        fixed_names=fixed_names,
        atomic_x_sun=x_ref,
        forest_x_sun=forest_x,
        response=instrument_response(lam).astype(np.float32),
        sky=sky.astype(np.float32),
        sky_lines=sky_lines.astype(np.float32),
        extinction=ccm_extinction(lam).astype(np.float32),
        g_band=slice(int(g_idx[0]), int(g_idx[-1]) + 1),
        dichroic_noise=dichroic_noise.astype(np.float32),
        dichroic_pixels=np.flatnonzero(dichroic_noise > 1.001),
        sky_line_pixels=np.flatnonzero(sky_lines > 1e-4),
    )


# --------------------------------------------------------------------------------------------
# from labels to coefficients of the basis


def _abundance(group: str, stars: StarLabels) -> np.ndarray:
    if group == "none":
        return np.zeros(stars.n)
    return stars.fe_h + (stars.alpha_m if group == "alpha" else 0.0)


def atomic_equivalent_widths(
    stars: StarLabels, basis: Basis | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Equivalent widths (A) of every line of ATOMIC_LINES, (n, n_lines), split into the part in
    the saturated Doppler core and the part in the damping wings: returns (core, wings)."""
    basis = basis or _basis("canonical")
    wave = np.array([line[1] for line in ATOMIC_LINES])
    ref_theta = 5040.0 / np.array([line[5] for line in ATOMIC_LINES])
    w_l = np.array([line[3] for line in ATOMIC_LINES])
    damped = np.array([line[4] > 0 for line in ATOMIC_LINES])
    theta = 5040.0 / stars.teff
    dg = np.clip(stars.logg - SUN_LOGG, -5.0, 1.5)
    log_x = np.empty((stars.n, len(ATOMIC_LINES)))
    for name, species in SPECIES.items():
        cols = np.array([line[0] == name for line in ATOMIC_LINES])
        if not cols.any():
            continue
        log_t = _log_temperature_law(species, theta[:, None]) - _log_temperature_law(
            species, ref_theta[None, cols]
        )
        log_x[:, cols] = log_t + (_abundance(species.group, stars) + species.lum * dg)[:, None]
    strength = basis.atomic_x_sun[None, :] * 10.0**log_x
    w_doppler = _doppler_ew(wave[None, :], stars.teff[:, None])
    w_damping = w_l[None, :] * 10.0 ** (0.35 * dg[:, None])
    ew, ew_flat = curve_of_growth(strength, w_doppler, w_damping)
    core = np.where(damped[None, :], np.minimum(ew, ew_flat), ew)
    return core, ew - core


def hydrogen_equivalent_widths(stars: StarLabels) -> tuple[np.ndarray, np.ndarray]:
    """EW (A) and Stark HWHM (A) of every line of HYDROGEN_LINES, each (n, n_lines)."""
    ew_hb, gamma_hb = hydrogen_lines(stars)
    ew_mult = np.array([h[2] for h in HYDROGEN_LINES])
    gamma_mult = np.array([h[3] for h in HYDROGEN_LINES])
    # Paschen lines only matter in hot stars (n = 3 is populated later than n = 2)
    hot = _sigmoid((stars.teff - 7000.0) / 500.0)
    paschen = np.array([h[0].startswith("P") for h in HYDROGEN_LINES])
    ew = ew_hb[:, None] * ew_mult[None, :] * np.where(paschen[None, :], hot[:, None], 1.0)
    return ew, gamma_hb[:, None] * gamma_mult[None, :]


def stellar_coefficients(stars: StarLabels, basis: Basis) -> np.ndarray:
    """(n, K) weights of the stellar basis columns: optical-depth area (A) for lines, optical
    depth at the head for bands, a multiplier for the weak-line forest."""
    n = stars.n
    damped = np.array([line[4] > 0 for line in ATOMIC_LINES])
    core, wings = atomic_equivalent_widths(stars, basis)
    parts = [core, wings[:, damped]]

    h_ew, h_gamma = hydrogen_equivalent_widths(stars)
    h_core = 0.9 * (1.0 - np.exp(-h_ew / 1.5))
    h_wing = h_ew - h_core
    parts.append(h_core)
    pos = np.interp(np.log(h_gamma), np.log(STARK_GRID_A), np.arange(len(STARK_GRID_A)))
    lo = np.minimum(np.floor(pos).astype(int), len(STARK_GRID_A) - 2)
    frac = pos - lo
    for j in range(len(STARK_GRID_A)):
        weight = np.where(lo == j, 1.0 - frac, 0.0) + np.where(lo + 1 == j, frac, 0.0)
        parts.append(h_wing * weight)

    mol = molecular_strengths(stars)
    parts.append(np.stack([mol[b[0]] * b[4] for b in MOLECULAR_BANDS], axis=1))

    theta = 5040.0 / stars.teff
    dg = np.clip(stars.logg - SUN_LOGG, -5.0, 1.5)
    forest = np.empty((n, len(FOREST_GROUPS)))
    for k, (name, _, mean_ew) in enumerate(FOREST_GROUPS):
        species = SPECIES[name]
        log_t = _log_temperature_law(species, theta) - _log_temperature_law(
            species, np.array(5040.0 / SUN_TEFF)
        )
        x = basis.forest_x_sun[k] * 10.0 ** (
            log_t + _abundance(species.group, stars) + species.lum * dg
        )
        ew, _ = curve_of_growth(
            x, _doppler_ew(np.array(4500.0), stars.teff), 0.002 * 10.0 ** (0.35 * dg)
        )
        forest[:, k] = ew / mean_ew
    parts.append(forest)
    return np.concatenate(parts, axis=1)


def fixed_coefficients(stars: StarLabels) -> np.ndarray:
    """(n, K2) weights of the interstellar (EW, A) and telluric (optical depth) columns."""
    ebv = stars.a_v / 3.1
    ism = []
    for name, _, per_mag, _ in INTERSTELLAR_LINES:
        ew = per_mag * ebv
        if name.startswith("ISM Na"):
            ew = per_mag * np.tanh(ebv / 0.5) * 0.5 + 0.1 * per_mag * ebv  # saturates early
        ism.append(ew)
    airmass = stars.get("airmass", 1.2)
    water = stars.get("pwv_scale", 1.0)
    tell = [
        depth * airmass * (water if name == "H2O" else 1.0)
        for name, _, _, _, depth in TELLURIC_BANDS
    ]
    return np.stack(ism + tell, axis=1)


def emission_coefficients(stars: StarLabels) -> np.ndarray | None:
    """(n, K3) emission EWs (A, positive = emission) or None when no star has emission."""
    balmer = stars.get("em_halpha", 0.0)
    oiii = stars.get("em_oiii", 0.0)
    if not (np.any(balmer != 0) or np.any(oiii != 0)):
        return None
    key = {"balmer": balmer, "oiii": oiii}
    return np.stack([key[group] * rel for _, _, group, rel in EMISSION_LINES], axis=1)


def rv_pixel_shift(rv_kms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Velocity -> (whole-pixel shift, phase in 1/RV_PHASES pixel); shifts are quantised to
    1/RV_PHASES pixel (8.6 km/s), below LAMOST's ~5-10 km/s velocity precision per half step."""
    shift = np.log10(1.0 + np.clip(rv_kms, -MAX_RV_KMS, MAX_RV_KMS) / C_KMS) / grids.LRS_LOGLAM_STEP
    steps = np.round(shift * RV_PHASES).astype(np.int64)
    whole = np.floor_divide(steps, RV_PHASES)
    return whole, steps - whole * RV_PHASES


def quantised_rv(rv_kms: np.ndarray) -> np.ndarray:
    """The velocity (km/s) the simulator actually applies for a requested ``rv_kms``."""
    whole, phase = rv_pixel_shift(np.asarray(rv_kms, dtype=float))
    return C_KMS * (10.0 ** ((whole + phase / RV_PHASES) * grids.LRS_LOGLAM_STEP) - 1.0)


def _shifted_product(
    coeff: np.ndarray, columns: np.ndarray, rv_kms: np.ndarray, m: int
) -> np.ndarray:
    """sum_k coeff[:, k] * column_k(lambda / (1 + v/c)) for every star: (n, K) x (P, K, m_pad) -> (n, m).

    Stars are sorted by (sub-pixel phase, whole-pixel shift): one matrix product per phase on the
    padded grid, then each run of equal whole shifts is a slice, and one gather restores the order.
    """
    whole, phase = rv_pixel_shift(rv_kms)
    if np.all(whole == whole[0]) and np.all(phase == phase[0]):
        start = PAD_PIX - int(whole[0])
        return coeff @ columns[int(phase[0])][:, start : start + m]
    order = np.lexsort((whole, phase))
    whole_s, phase_s = whole[order], phase[order]
    coeff_s = coeff[order]
    out = np.empty((len(order), m), dtype=np.float32)
    cuts = np.flatnonzero((np.diff(whole_s) != 0) | (np.diff(phase_s) != 0)) + 1
    runs = list(zip(np.r_[0, cuts], np.r_[cuts, len(order)], strict=True))
    phase_cuts = np.flatnonzero(np.diff(phase_s)) + 1
    for p_lo, p_hi in zip(np.r_[0, phase_cuts], np.r_[phase_cuts, len(order)], strict=True):
        tau_pad = coeff_s[p_lo:p_hi] @ columns[int(phase_s[p_lo])]
        for lo, hi in runs:
            if lo >= p_lo and hi <= p_hi:
                start = PAD_PIX - int(whole_s[lo])
                out[lo:hi] = tau_pad[lo - p_lo : hi - p_lo, start : start + m]
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return out[inverse]


def standard_normal_f32(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Standard normal float32 deviates by Box-Muller on float32 uniforms: ~3x faster than the
    ziggurat for big arrays; the tails stop at 5.8 sigma (float32 uniforms), harmless for noise."""
    size = int(np.prod(shape))
    half = (size + 1) // 2
    u = rng.random((2, half), dtype=np.float32)
    radius = np.sqrt(-2.0 * np.log1p(-u[0]))
    angle = (2.0 * np.pi) * u[1]
    out = np.empty(2 * half, dtype=np.float32)
    np.multiply(radius, np.cos(angle), out=out[:half])
    np.multiply(radius, np.sin(angle), out=out[half:])
    return out[:size].reshape(shape)


def line_transmission(stars: StarLabels, basis: Basis) -> np.ndarray:
    """Continuum-normalised noiseless spectrum exp(-tau) (+ emission), (n, m) float32."""
    m = len(basis.loglam)
    coeff = stellar_coefficients(stars, basis)[:, basis.stellar_keep].astype(np.float32)
    tau = _shifted_product(coeff, basis.stellar, stars.rv, m)
    tau += fixed_coefficients(stars).astype(np.float32) @ basis.fixed
    np.maximum(tau, 0.0, out=tau)
    transmission = np.exp(-tau, out=tau)
    emission = emission_coefficients(stars)
    if emission is not None:
        rows = np.flatnonzero(np.any(emission != 0, axis=1))
        transmission[rows] += _emission_profiles(emission[rows], stars.rv[rows], basis)
    return transmission


def _emission_profiles(ew: np.ndarray, rv_kms: np.ndarray, basis: Basis) -> np.ndarray:
    """Emission lines (EW in A, (n_rows, K3)) at each star's velocity, (n_rows, m)."""
    m = len(basis.loglam)
    out = np.empty((len(ew), m), dtype=np.float32)
    e_wave = air_to_vacuum(np.array([e[1] for e in EMISSION_LINES]))
    for i, v in enumerate(quantised_rv(rv_kms)):  # few rows (anomalies only): a loop is fine
        cols = _gaussian_columns(e_wave * (1.0 + v / C_KMS), np.zeros(len(e_wave)), basis.loglam)
        out[i] = ew[i] @ cols
    return out


def pseudo_continuum(stars: StarLabels, basis: Basis) -> np.ndarray:
    """Blackbody at Teff reddened by A_V (CCM), scaled to mean 1 over the g band, (n, m) float32.

    Line blanketing is not put into the continuum: it comes from the lines and the weak-line
    forest in the transmission, so it scales with [Fe/H] and Teff as the lines do.
    """
    lam = basis.wavelength
    hc_k = 1.438777e8  # h c / k in Angstrom K
    x = np.outer((1.0 / stars.teff).astype(np.float32), (hc_k / lam).astype(np.float32))
    log_lam = (-5.0 * np.log(lam / 5000.0)).astype(np.float32)
    # B_lambda * 10^(-0.4 A_V k) = lambda^-5 exp(-x - 0.4 ln10 A_V k) / (1 - exp(-x))
    expo = np.outer((-0.4 * np.log(10.0) * stars.a_v).astype(np.float32), basis.extinction)
    expo += log_lam
    expo -= x
    one_minus = -np.expm1(-x, out=x)
    cont = np.exp(expo, out=expo)
    cont /= one_minus
    g = basis.g_band
    cont /= cont[:, g].mean(axis=1, keepdims=True)
    return cont


def draw_snr(
    n: int, rng: np.random.Generator, median: float = 40.0, sigma_ln: float = 0.75
) -> np.ndarray:
    """LAMOST-like g-band S/N: log-normal around ``median``, clipped to [3, 400]."""
    return np.clip(median * np.exp(sigma_ln * rng.standard_normal(n)), 3.0, 400.0)


# --------------------------------------------------------------------------------------------
# observing: counts, sky, noise


@dataclass
class LRSObservation:
    """One batch of simulated LRS on one grid. Arrays are (n, m) float32 unless noted.

    ``flux``/``ivar``: flux divided by the star's TRUE pseudo-continuum (with the calibration
    factors that survive it, see `_observe`) and its inverse variance; ``noiseless``: the same
    without noise; ``raw_flux``/``raw_ivar``: the observation as a LAMOST file holds it
    (flux-calibrated F_lambda in counts-like units: SED x extinction x residual response x flux
    scale, with sky residuals and noise); ``continuum``: raw_flux / flux, the true
    pseudo-continuum in raw units; ``snr``: (n,) the target g-band S/N; ``rv``: (n,) the applied
    (quantised) radial velocity, km/s. Raw arrays are None unless asked for.
    """

    wavelength: np.ndarray
    flux: np.ndarray
    ivar: np.ndarray
    noiseless: np.ndarray
    snr: np.ndarray
    rv: np.ndarray
    raw_flux: np.ndarray | None = None
    raw_ivar: np.ndarray | None = None
    continuum: np.ndarray | None = None


# residual instrument response after flux calibration, smooth in log lambda (Legendre P1-P3
# over the full grid): 1-sigma coefficients shared by one plate (one spectrograph's 250 fibres
# on one pointing) and per fibre on top; and the residual of the dichroic crossover per plate
PLATE_RESPONSE_SIGMA = (0.08, 0.04, 0.02)
FIBRE_RESPONSE_SIGMA = (0.02, 0.01, 0.005)
DICHROIC_RESIDUAL_SIGMA = 0.03
SKY_SCALE_SIGMA = 0.01  # error of the subtracted sky's scale (a fraction of the whole sky)
G_MAG_UNIT = 13.0  # a star of this G magnitude has raw flux ~ 1 at its g-band continuum x 1000


def draw_plate_terms(n_plates: int, rng: np.random.Generator) -> np.ndarray:
    """Residual-response terms of ``n_plates`` plates, (n_plates, 4): Legendre P1-P3 coefficients
    of the log response and the dichroic-crossover residual (see `residual_response`)."""
    sigma = np.array([*PLATE_RESPONSE_SIGMA, DICHROIC_RESIDUAL_SIGMA])
    return rng.standard_normal((n_plates, 4)) * sigma


def residual_response(
    wavelength: np.ndarray, plate_terms: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Flux-calibration residual of each star, (n, m) float32 near 1: a smooth response shared by
    the stars of a plate (``plate_terms`` (n, 4), `draw_plate_terms`, the same row for stars of
    one plate) plus a smaller one drawn here per fibre (both exp of Legendre P1-P3 in log lambda
    over the grid), times the plate's residual of the dichroic crossover (~3% at 5800 A)."""
    plate_terms = np.asarray(plate_terms, dtype=np.float64)
    n = len(plate_terms)
    loglam = np.log10(wavelength)
    x = 2.0 * (loglam - loglam[0]) / (loglam[-1] - loglam[0]) - 1.0
    legendre = np.polynomial.legendre.legvander(x, 3)[:, 1:].T  # (3, m)
    fibre = rng.standard_normal((n, 3)) * np.array(FIBRE_RESPONSE_SIGMA)
    log_response = (plate_terms[:, :3] + fibre) @ legendre
    crossover = np.exp(-0.5 * ((wavelength - DICHROIC_A) / 70.0) ** 2)
    response = np.exp(log_response) * (1.0 + plate_terms[:, 3:4] * crossover[None, :])
    return response.astype(np.float32)


def _observe(
    transmission: np.ndarray,
    continuum: np.ndarray,
    snr: np.ndarray,
    basis: Basis,
    rng: np.random.Generator,
    full: bool,
    plate_terms: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Turn a noiseless spectrum into a LAMOST-like observation: returns (flux, ivar, calibration).

    Counts of the star per pixel are K x continuum x transmission x throughput; K is set so the
    mean S/N per pixel over the g band equals ``snr`` given the sky and read-noise background.
    Variance = star + sky + read noise + (sky-line residual)^2; the noise drawn has exactly this
    variance, and ivar = 1 / variance (in normalised units). The sky is subtracted imperfectly:
    a scale error of the whole sky (~1%) and 3-10% of each sky line are left in the flux. A tiny
    random fraction of pixels is flagged bad (ivar 0), as pipeline masks do.

    On the full grid, ``calibration`` is what flux calibration leaves: the residual response of
    the star's plate and fibre (`residual_response`), which the raw flux carries and a continuum
    fit removes, and a small step where the two arms are stitched (this one is in ``flux`` too:
    it survives normalisation, as stitching artefacts do in real LAMOST spectra).
    """
    n, m = transmission.shape
    sky_level = 40.0 * np.exp(
        0.6 * rng.standard_normal(n)
    )  # e- per pixel of sky continuum at 5000 A
    residual = 0.03 + 0.07 * rng.random(n)  # fraction of each sky line left after subtraction
    g = basis.g_band
    star_g = (continuum[:, g] * transmission[:, g]) @ basis.response[g] / (g.stop - g.start)
    background_g = sky_level * float(basis.sky[g].mean()) + READ_NOISE_VAR
    target = snr * snr
    star_counts_g = 0.5 * (target + np.sqrt(target * (target + 4.0 * background_g)))
    scale = (star_counts_g / star_g).astype(np.float32)
    continuum_counts = continuum * basis.response
    continuum_counts *= scale[:, None]
    # variance: star + sky photons + read noise (+ sky-line residuals, only where there are lines)
    variance = np.outer(sky_level.astype(np.float32), basis.sky)
    variance += READ_NOISE_VAR
    lines = basis.sky_line_pixels
    variance[:, lines] += np.outer(
        ((residual * sky_level) ** 2).astype(np.float32), basis.sky_lines[lines] ** 2
    )
    variance += continuum_counts * transmission
    if basis.dichroic_pixels.size:
        variance[:, basis.dichroic_pixels] *= basis.dichroic_noise[basis.dichroic_pixels]
    noise = standard_normal_f32(rng, (n, m))
    noise *= np.sqrt(variance)
    # what sky subtraction leaves: a scale error of the whole sky, and part of each line with
    # either sign (over- or under-subtracted)
    sky_scale = (SKY_SCALE_SIGMA * rng.standard_normal(n) * sky_level).astype(np.float32)
    line_left = (residual * sky_level * rng.choice([-1.0, 1.0], n)).astype(np.float32)
    noise += np.outer(sky_scale, basis.sky)
    noise[:, lines] += np.outer(line_left, basis.sky_lines[lines])
    noise /= continuum_counts
    flux = noise
    flux += transmission
    ivar = np.square(continuum_counts, out=continuum_counts)
    ivar /= variance
    n_bad = rng.poisson(2e-4 * n * m)
    bad = rng.integers(0, n * m, n_bad)
    ivar.ravel()[bad] = 0.0

    calibration = None
    if full:
        lam = basis.wavelength[None, :]
        step = 0.02 * rng.standard_normal((n, 1))
        glitch = (
            1.0
            + step
            * np.tanh((lam - DICHROIC_A) / 15.0)
            * np.exp(-0.5 * ((lam - DICHROIC_A) / 60.0) ** 2)
        ).astype(np.float32)
        if plate_terms is None:  # one plate for the whole batch
            plate_terms = np.repeat(draw_plate_terms(1, rng), n, axis=0)
        calibration = residual_response(basis.wavelength, plate_terms, rng)
        flux *= glitch
        ivar /= glitch**2
    return flux, ivar, calibration


def _render(labels: dict[str, np.ndarray], rng: np.random.Generator, which: str) -> LRSObservation:
    """Simulate a batch on the "canonical" or the "full" grid (the raw observation: full only)."""
    basis = _basis(which)
    stars = StarLabels.from_dict(labels)
    snr = labels.get("snr")
    snr = (
        draw_snr(stars.n, rng)
        if snr is None
        else np.clip(np.asarray(snr, dtype=float), 1.0, 2000.0)
    )
    transmission = line_transmission(stars, basis)
    continuum = pseudo_continuum(stars, basis)
    companion = labels.get("companion")
    if companion is not None:
        # unresolved binaries: add a second star; flux_ratio = its g-band continuum / the primary's
        ratio = np.nan_to_num(np.asarray(labels["flux_ratio"], dtype=float), nan=0.0)
        rows = np.flatnonzero(ratio > 0)
        if rows.size:
            second = StarLabels.from_dict({k: np.asarray(v)[rows] for k, v in companion.items()})
            if "rv" not in companion:
                second.rv = stars.rv[rows]
            if "a_v" not in companion:
                second.a_v = stars.a_v[rows]
            t2 = line_transmission(second, basis)
            c2 = pseudo_continuum(second, basis) * ratio[rows, None].astype(np.float32)
            total = continuum[rows] + c2
            transmission[rows] = (continuum[rows] * transmission[rows] + c2 * t2) / total
            continuum[rows] = total
    noiseless = transmission.copy()
    flux, ivar, calibration = _observe(
        transmission, continuum, snr, basis, rng, which == "full", labels.get("plate_terms")
    )
    obs = LRSObservation(basis.wavelength, flux, ivar, noiseless, snr, quantised_rv(stars.rv))
    if calibration is not None:
        # counts-like units: ~1000 at the g-band continuum of a G = 13 star, fainter ones less
        g_mag = np.nan_to_num(
            np.broadcast_to(np.asarray(labels.get("g_mag", G_MAG_UNIT), float), (stars.n,)),
            nan=G_MAG_UNIT,
        )
        flux_unit = (1000.0 * 10.0 ** (-0.4 * (g_mag - G_MAG_UNIT))).astype(np.float32)
        raw_scale = continuum * calibration * flux_unit[:, None]
        obs.raw_flux = flux * raw_scale
        obs.raw_ivar = ivar / raw_scale**2
        obs.continuum = raw_scale
    return obs


# --------------------------------------------------------------------------------------------
# public API


def simulate_lrs(
    labels: dict[str, np.ndarray], rng: np.random.Generator, grid: str = "canonical"
) -> LRSObservation:
    """Everything about one batch of simulated LRS on the "canonical" or the "full" grid: the
    flux normalised by the true continuum and its ivar, the noiseless spectrum, the applied
    (quantised) RV and, on the full grid, the raw observation. Labels as in :func:`synthesize_lrs`,
    plus ``plate_terms`` ((n, 4), `draw_plate_terms`: stars with the same row share their
    plate's residual response; default one plate for the batch) and ``g_mag`` (the raw flux
    scale)."""
    if grid not in ("canonical", "full"):
        raise ValueError(f"grid must be 'canonical' or 'full', not {grid!r}")
    return _render(labels, rng, grid)


def synthesize_lrs(
    labels: dict[str, np.ndarray],
    rng: np.random.Generator,
    *,
    normalisation: str = "fit",
    return_noiseless: bool = False,
) -> tuple[np.ndarray, ...]:
    """Simulated LAMOST LRS on the canonical grid, continuum-normalised.

    labels: dict of (n,) arrays. Required: ``teff`` (K). Used when present (defaults): ``logg``
    (4.4), ``fe_h`` (0), ``alpha_m`` (Milky-Way trend with [Fe/H]), ``a_v`` (0, mag), ``snr``
    (g-band S/N per pixel; drawn log-normal, median 40), ``rv`` (0 km/s). Optional effects:
    ``em_halpha``/``em_oiii`` (emission EW, A), ``c2``/``cn_scale``/``tio_scale``/``ch_scale``
    (molecular bands), ``companion`` (a labels dict) with ``flux_ratio`` (g band) for binaries.
    NaN labels take the defaults.
    normalisation: "fit" (default) simulates the raw observation on LAMOST's full grid and
    normalises it with `grids.canonical_lrs`, exactly as a shard row or an ingested LAMOST file
    is made; "true" divides the canonical grid by the known pseudo-continuum (the physics alone,
    ~5x faster). Returns (flux, ivar) float32 (n, 1462), plus the noiseless flux (normalised the
    same way) when ``return_noiseless``.
    """
    if normalisation == "true":
        obs = _render(labels, rng, "canonical")
        flux, ivar, noiseless = obs.flux, obs.ivar, obs.noiseless
    elif normalisation == "fit":
        obs = _render(labels, rng, "full")
        flux, ivar, continuum = grids.canonical_lrs(
            FULL_WAVELENGTH, obs.raw_flux, obs.raw_ivar, with_continuum=True
        )
        noiseless = (canonical_from_full(obs.noiseless * obs.continuum) / continuum).astype(
            np.float32
        )
    else:
        raise ValueError(f"normalisation must be 'true' or 'fit', not {normalisation!r}")
    return (flux, ivar, noiseless) if return_noiseless else (flux, ivar)


def synthesize_lrs_full(labels: dict[str, np.ndarray], rng: np.random.Generator) -> LRSObservation:
    """The same model on LAMOST's full 3700-9100 A grid (FULL_WAVELENGTH), with the raw
    observation (`LRSObservation.raw_flux`): for plots and raw-file fixtures."""
    return _render(labels, rng, "full")


def canonical_from_full(array: np.ndarray) -> np.ndarray:
    """Cut a full-grid array (..., 3909) to the canonical grid (..., 1462): an exact slice."""
    return np.asarray(array)[..., CANONICAL_SLICE]


def feature_wavelengths() -> dict[str, float]:
    """Vacuum wavelengths (A) of the named features, for labelling plots."""
    out = {h[0]: float(air_to_vacuum(h[1])) for h in BALMER_LINES}
    for name, wave in (
        ("Ca II K", 3933.66),
        ("Ca II H", 3968.47),
        ("Ca I 4227", 4226.73),
        ("Sr II 4077", 4077.71),
        ("G band", 4305.0),
        ("Mg b", 5175.0),
        ("Na D", 5892.9),
        ("Fe I 4383", 4383.55),
        ("Fe 5270", 5269.54),
        ("Fe 5335", 5332.9),
        ("MgH", 5150.0),
        ("TiO 4955", 4954.6),
        ("TiO 5167", 5166.7),
        ("TiO 5448", 5448.0),
        ("TiO 6159", 6158.7),
        ("TiO 7054", 7054.2),
        ("Ca II triplet", 8542.09),
        ("CN 3883", 3883.4),
        ("CN 4216", 4215.5),
        ("C2 4737", 4737.1),
        ("C2 5165", 5165.2),
        ("C2 5636", 5635.5),
        ("[O III] 5007", 5006.84),
        ("He I 4471", 4471.48),
        ("Mg II 4481", 4481.13),
        ("DIB 4428", 4428.2),
        ("O2 A", 7594.0),
        ("[O I] sky 5577", 5577.34),
    ):
        out[name] = float(air_to_vacuum(wave))
    return out
