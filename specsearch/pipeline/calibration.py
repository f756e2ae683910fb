"""Tail probabilities against a frozen reference, and their combination into one score.

A statistic (larger = stranger) is calibrated by its distribution over the stars of a reference
release: ``TailModel`` holds that distribution as 1,001 quantiles (the body) and a generalised
Pareto tail extrapolated from the 80th-95th percentiles, so a star beyond every reference star
still gets a finite, ordered tail probability, and the reference's own anomalies do not hide
the next release's. Values are kept as
``-log10 p`` throughout (``logp``): p of a far outlier underflows float64, its logarithm does not.

``combine_logp`` merges several tail probabilities of one star into one: their harmonic mean,
made valid under any dependence between them (see its docstring). It behaves like a Bonferroni
minimum when one component is extreme (an instrumental glitch in one spectrum) and still adds up
several moderate ones (an astrophysical oddity seen a little everywhere).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

TAIL_LEVELS = (0.80, 0.90, 0.95)
"""The quantiles the tail is extrapolated from: above the 95th percentile a generalised Pareto
law through them takes over, so the few per cent of anomalies any real reference release holds
(they sit above its 95th percentile) do not set how rare a value beyond them is."""

N_QUANTILES = 1001
MIN_REFERENCE = 20
"""A statistic needs this many reference values to be calibrated."""


@dataclass
class TailModel:
    """A statistic's reference distribution: quantiles (the body) plus a generalised Pareto tail
    P(X > x) = 0.2 (1 + shape (x - u) / scale)^(-1 / shape) above the 95th percentile, with u the
    80th percentile and shape and scale fixed by the 90th and 95th (a quantile estimator in the
    manner of Pickands 1975; shape clipped to [0, 0.5], 0 meaning the exponential)."""

    quantiles: list[float]  # at levels 0, 1/(N-1), ..., 1
    threshold: float  # u: the 80th percentile (moved to fit the exponential where shape is 0)
    scale: float
    shape: float
    start: float  # where the tail takes over from the quantiles: the 95th percentile
    n: int

    @classmethod
    def fit(cls, values: np.ndarray, max_shape: float = 0.5) -> TailModel | None:
        """Fit to the finite reference values; None when there are fewer than MIN_REFERENCE.

        ``max_shape`` 0 asks for an exponential tail: right for a sum of -log p (Fisher's
        statistic has a gamma law, exponential in its tail, even when its terms are correlated).
        """
        values = np.asarray(values, dtype=np.float64)
        values = values[np.isfinite(values)]
        if len(values) < MIN_REFERENCE:
            return None
        quantiles = np.quantile(values, np.linspace(0.0, 1.0, N_QUANTILES))
        u, q90, q95 = (float(q) for q in np.quantile(values, TAIL_LEVELS))
        u, scale, shape = _pareto_from_quantiles(u, q90, q95, values, max_shape)
        return cls([float(q) for q in quantiles], u, scale, shape, q95, len(values))

    def tail_logp(self, x: np.ndarray) -> np.ndarray:
        """-log10 P(X > x) of the Pareto tail (for x above ``threshold``)."""
        top = 1.0 - TAIL_LEVELS[0]
        over = np.maximum(np.asarray(x, dtype=np.float64) - self.threshold, 0.0) / self.scale
        if self.shape > 1e-6:
            return -np.log10(top) + np.log10(1.0 + self.shape * over) / self.shape
        return -np.log10(top) + over / np.log(10.0)

    def logp(self, x: np.ndarray) -> np.ndarray:
        """-log10 of the tail probability P(reference >= x); NaN stays NaN."""
        x = np.asarray(x, dtype=np.float64)
        quantiles = np.asarray(self.quantiles)
        levels = np.linspace(0.0, 1.0, len(quantiles))
        # the body: the fraction of the reference above x, from the quantiles; ties at the
        # bottom (e.g. no bad pixel at all) give p = 1
        below = np.interp(x, quantiles, levels, left=0.0, right=1.0)
        p_body = np.where(x <= quantiles[0], 1.0, 1.0 - below)
        with np.errstate(invalid="ignore", divide="ignore"):
            logp = -np.log10(np.maximum(p_body, 1.0 - TAIL_LEVELS[-1]))
            tail = self.tail_logp(x)
        logp = np.where(x > self.start, np.maximum(tail, logp), logp)
        return np.where(np.isnan(x), np.nan, np.maximum(logp, 0.0))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> TailModel | None:
        return None if data is None else cls(**data)


def _pareto_from_quantiles(
    u: float, q90: float, q95: float, values: np.ndarray, max_shape: float = 0.5
) -> tuple[float, float, float]:
    """(threshold, scale, shape) of P(X > x) = 0.2 (1 + shape (x - threshold) / scale)^(-1/shape)
    through (q80, 0.2), (q90, 0.1) and (q95, 0.05).

    With t = 2^shape, (q95 - u) / (q90 - u) = t + 1. Where the shape is clipped to 0, the
    exponential follows the slope between q90 and q95 and passes through (q95, 0.05). A
    statistic without spread there (mostly one value, such as a bad-pixel fraction of 0) gets
    an exponential as wide as its spread, from its 95th percentile."""
    d90, d95 = q90 - u, q95 - u
    if d90 <= 0 or d95 <= d90:
        scale = max(d95 - d90, d95, float(np.std(values))) or 1e-3
        return q95 - scale * np.log(4.0), scale, 0.0
    shape = float(np.clip(np.log2(max(d95 / d90 - 1.0, 1.0)), 0.0, max_shape))
    if shape < 1e-6:
        scale = (d95 - d90) / np.log(2.0)
        return q95 - scale * np.log(4.0), scale, 0.0
    return u, shape * d90 / (2.0**shape - 1.0), shape


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
