"""Tail probabilities against a frozen reference, and their combination into one score.

A statistic (larger = stranger) is calibrated by its distribution over the stars of a reference
release: ``TailModel`` holds that distribution as 1,001 quantiles (the body) and a generalised
Pareto fit to the top ``TAIL_FRACTION`` (the tail, peaks over a threshold), so a star beyond
every reference star still gets a finite, ordered tail probability. Values are kept as
``-log10 p`` throughout (``logp``): p of a far outlier underflows float64, its logarithm does not.

``combine_logp`` merges several tail probabilities of one star into one: their harmonic mean,
made valid under any dependence between them (see its docstring). It behaves like a Bonferroni
minimum when one component is extreme (an instrumental glitch in one spectrum) and still adds up
several moderate ones (an astrophysical oddity seen a little everywhere).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import numpy as np

TAIL_FRACTION = 0.025
"""The fraction of the reference above the tail threshold (the generalised Pareto part)."""

N_QUANTILES = 1001
MIN_REFERENCE = 20
"""A statistic needs this many reference values to be calibrated."""


@dataclass
class TailModel:
    """A statistic's reference distribution: quantiles plus a generalised Pareto tail."""

    quantiles: list[float]  # at levels 0, 1/(N-1), ..., 1
    threshold: float  # the 1 - TAIL_FRACTION quantile
    scale: float  # generalised Pareto sigma of the exceedances
    shape: float  # generalised Pareto xi (clipped to [0, 0.5])
    n: int

    @classmethod
    def fit(cls, values: np.ndarray) -> TailModel | None:
        """Fit to the finite reference values; None when there are fewer than MIN_REFERENCE."""
        values = np.asarray(values, dtype=np.float64)
        values = values[np.isfinite(values)]
        if len(values) < MIN_REFERENCE:
            return None
        levels = np.linspace(0.0, 1.0, N_QUANTILES)
        quantiles = np.quantile(values, levels)
        threshold = float(np.quantile(values, 1.0 - TAIL_FRACTION))
        excess = values[values > threshold] - threshold
        scale, shape = _fit_pareto(excess, values)
        return cls([float(q) for q in quantiles], threshold, scale, shape, len(values))

    def logp(self, x: np.ndarray) -> np.ndarray:
        """-log10 of the tail probability P(reference >= x); NaN stays NaN."""
        x = np.asarray(x, dtype=np.float64)
        quantiles = np.asarray(self.quantiles)
        levels = np.linspace(0.0, 1.0, len(quantiles))
        # the body: the fraction of the reference above x, from the quantiles; ties at the
        # bottom (e.g. no bad pixel at all) give p = 1
        below = np.interp(x, quantiles, levels, left=0.0, right=1.0)
        lowest = x <= quantiles[0]
        p_body = np.where(lowest, 1.0, 1.0 - below)
        p_floor = 1.0 / (self.n + 1.0)  # the finest the reference itself resolves
        with np.errstate(invalid="ignore", divide="ignore"):
            logp = -np.log10(np.maximum(p_body, p_floor))
            over = (x - self.threshold) / self.scale
            if self.shape > 1e-6:
                tail = -np.log10(TAIL_FRACTION) + np.log10(1.0 + self.shape * over) / self.shape
            else:
                tail = -np.log10(TAIL_FRACTION) + over / np.log(10.0)
        in_tail = x > self.threshold
        logp = np.where(in_tail, np.maximum(tail, -np.log10(TAIL_FRACTION)), logp)
        return np.where(np.isnan(x), np.nan, np.maximum(logp, 0.0))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> TailModel | None:
        return None if data is None else cls(**data)


def _fit_pareto(excess: np.ndarray, values: np.ndarray) -> tuple[float, float]:
    """(scale, shape) of a generalised Pareto fit to the exceedances; an exponential (shape 0)
    where the fit fails or says the tail is bounded, so scores keep growing past the reference."""
    excess = excess[excess > 0]
    if len(excess) < 5:
        # (almost) nothing above the threshold: an exponential tail as wide as the reference's
        # spread (a reference of one repeated value leaves no scale: 1e-3 of the unit)
        spread = float(np.std(values)) or 1e-3
        return max(float(excess.mean()) if len(excess) else 0.0, spread), 0.0
    from scipy.stats import genpareto

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            shape, _, scale = genpareto.fit(excess, floc=0.0)
        except (ValueError, RuntimeError, FloatingPointError):
            shape, scale = 0.0, float(excess.mean())
    if not (np.isfinite(shape) and np.isfinite(scale)) or scale <= 0:
        shape, scale = 0.0, float(excess.mean())
    if shape < 0:  # bounded tail: use the exponential, whose mean excess is the scale
        shape, scale = 0.0, float(excess.mean())
    shape = min(float(shape), 0.5)  # heavier tails would make every outlier look ordinary
    return max(float(scale), 1e-12), shape


def combine_logp(logp: np.ndarray) -> np.ndarray:
    """Merge per-component -log10 p, (n, k) with NaN for missing -> (n,) -log10 p.

    The harmonic mean of the p-values a star has (Wilson 2019, PNAS 116, 1195), times
    max(2, e ln k) for k >= 2, which keeps it a valid p-value under any dependence between the
    components (Vovk & Wang 2020, Biometrika 107, 791). Dominated by the smallest p, it still
    adds up several moderate ones; a component at p ~ 1 adds nothing (unlike the Cauchy or
    Fisher combinations, it cannot cancel a strong one). NaN where a star has no component.
    """
    logp = np.asarray(logp, dtype=np.float64)
    present = np.isfinite(logp)
    count = present.sum(axis=1)
    s = np.where(present, logp, -np.inf)
    top = s.max(axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        # log10 of the mean of 1/p, without overflow for extreme components
        log_mean = top[:, 0] + np.log10(np.sum(10.0 ** (s - top), axis=1) / np.maximum(count, 1))
        factor = np.where(count >= 2, np.maximum(2.0, np.e * np.log(np.maximum(count, 2))), 1.0)
        combined = log_mean - np.log10(factor)
    return np.where(count > 0, np.maximum(combined, 0.0), np.nan)
