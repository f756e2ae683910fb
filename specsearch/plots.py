"""Figures of stars and scores (matplotlib): what the report, ``show`` and ``search --plot``
draw. Functions take what ``specsearch.query.stars`` gathers and return a matplotlib Figure
(made without pyplot, so they leave the user's backend alone: a notebook shows them inline);
``png`` turns one into bytes."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

COLOURS = {"observed": "black", "recon": "tab:blue", "cross": "tab:orange"}
NEIGHBOUR_COLOURS = ("tab:green", "tab:purple", "tab:brown")
TITLES = {"lrs": "LAMOST LRS", "xp": "Gaia XP"}
FLUX_LABEL = {"lrs": "flux / continuum", "xp": "flux / mean 500-600 nm"}
AXIS_LABEL = {"lrs": "wavelength [A]", "xp": "wavelength [nm]"}


STYLE = {"text.usetex": False, "font.family": "sans-serif", "mathtext.default": "regular"}
"""Our own settings for every figure, whatever another library (gaiaxpy sets usetex) changed."""


def _figure(figsize: tuple[float, float]):
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def styled(function):
    """Run a figure function (drawing and saving) under STYLE."""
    import functools

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context(STYLE):
            return function(*args, **kwargs)

    return wrapper


@styled
def png(figure, dpi: int = 80) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    return buffer.getvalue()


@styled
def star_figure(view, components: Sequence[str] = (), title: str | None = None):
    """One star: per modality, observed vs reconstructed and cross-predicted flux (flagged
    windows shaded and named, up to 3 nearest neighbours thin behind), residuals in sigma
    below; and the score components as bars of -log10 p."""
    modalities = [m for m in ("lrs", "xp") if m in view.spectra]
    bars = bool(components) and view.score is not None
    columns = len(modalities) + (1 if bars else 0)
    ratios = [3.0] * len(modalities) + ([1.2] if bars else [])
    figure = _figure((4.6 * len(modalities) + (2.4 if bars else 0), 4.6))
    grid = figure.add_gridspec(2, max(columns, 1), height_ratios=[2.6, 1.0], width_ratios=ratios)
    for j, modality in enumerate(modalities):
        top = figure.add_subplot(grid[0, j])
        bottom = figure.add_subplot(grid[1, j], sharex=top)
        _spectrum_panels(top, bottom, view, modality)
    if bars:
        _component_bars(figure.add_subplot(grid[:, -1]), view, components)
    score = view.score or {}
    heading = title or (
        f"source_id {view.source_id} ({view.release})"
        + (
            f": score {score['score']:.1f}, rank {score['rank']}, {score['modality_tag']}"
            if score.get("score") is not None
            else ""
        )
    )
    figure.suptitle(heading, fontsize=10)
    figure.tight_layout()
    return figure


def _spectrum_panels(top, bottom, view, modality: str) -> None:
    spectrum = view.spectra[modality]
    wave = spectrum.wavelength
    for nid, similarity, flux in view.neighbours.get(modality, [])[:3]:
        colour = NEIGHBOUR_COLOURS[len(top.lines) % len(NEIGHBOUR_COLOURS)]
        top.plot(wave, flux, lw=0.5, alpha=0.4, color=colour, label=f"{nid} (cos {similarity:.3f})")
    top.plot(wave, spectrum.flux, lw=0.8, color=COLOURS["observed"], label="observed")
    for kind in ("recon", "cross"):
        if kind in spectrum.predicted:
            label = (
                "reconstructed"
                if kind == "recon"
                else f"from {'XP' if modality == 'lrs' else 'LRS'}"
            )
            top.plot(wave, spectrum.predicted[kind], lw=0.8, color=COLOURS[kind], label=label)
            bottom.plot(wave, spectrum.z[kind], lw=0.6, color=COLOURS[kind])
    # the three strongest flagged ranges, named, their labels staggered so they do not collide
    shown = sorted((w for w in view.windows if w.modality == modality), key=lambda w: -w.sigma)[:3]
    for j, window in enumerate(shown):
        for axis in (top, bottom):
            axis.axvspan(window.low, window.high, color="gold", alpha=0.25, lw=0)
        top.annotate(
            f"{window.name} {window.sign}{window.sigma:.0f}σ",
            (window.centre, 0.97 - 0.07 * j),
            xycoords=("data", "axes fraction"),
            ha="center",
            va="top",
            fontsize=7,
            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.7},
        )
    finite = spectrum.flux[np.isfinite(spectrum.flux)]
    if finite.size:
        low, high = np.percentile(finite, [0.5, 99.5])
        pad = 0.15 * (high - low + 1e-6)
        top.set_ylim(low - pad, high + pad)
    top.set_title(TITLES[modality], fontsize=9)
    top.set_ylabel(FLUX_LABEL[modality], fontsize=8)
    top.legend(fontsize=6, loc="best", framealpha=0.7)
    top.tick_params(labelsize=7, labelbottom=False)
    bottom.axhspan(-3, 3, color="0.9", lw=0)
    bottom.axhline(0, color="0.5", lw=0.5)
    bottom.set_ylabel("residual [sigma]", fontsize=8)
    bottom.set_xlabel(AXIS_LABEL[modality], fontsize=8)
    bottom.tick_params(labelsize=7)
    z = np.concatenate([v[np.isfinite(v)] for v in spectrum.z.values()] or [np.zeros(1)])
    limit = max(5.0, float(np.percentile(np.abs(z), 99.5)) * 1.1) if z.size else 5.0
    bottom.set_ylim(-limit, limit)


def _component_bars(axis, view, components: Sequence[str]) -> None:
    values = [view.score.get(f"{c}_logp") for c in components]
    values = [np.nan if v is None else v for v in values]
    y = np.arange(len(components))
    colours = ["tab:red" if (v or 0) >= 3 else "0.6" for v in values]
    axis.barh(y, np.nan_to_num(values), color=colours)
    axis.set_yticks(y, components, fontsize=7)
    axis.invert_yaxis()
    axis.axvline(3, color="tab:red", lw=0.6, ls="--")
    axis.set_xlabel("-log10 p (vs reference)", fontsize=8)
    axis.tick_params(labelsize=7)
    axis.set_title("components", fontsize=9)


@styled
def score_histogram(scores: np.ndarray, threshold: float, title: str = ""):
    """Histogram of the scores of a release (log counts), the threshold marked."""
    figure = _figure((6.0, 2.8))
    axis = figure.subplots()
    finite = np.asarray(scores, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    top = max(float(finite.max()) if finite.size else 1.0, threshold + 1.0)
    bins = np.linspace(0.0, min(top, 50.0), 60)
    axis.hist(np.clip(finite, 0, bins[-1]), bins=bins, color="tab:blue", log=True)
    axis.axvline(threshold, color="tab:red", ls="--", lw=1, label=f"threshold {threshold:g}")
    axis.set_xlabel("score = -log10 p (vs the reference release; last bin holds the rest)")
    axis.set_ylabel("stars")
    axis.legend(fontsize=8)
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    return figure


@styled
def count_bars(counts: dict[str, int], title: str, xlabel: str = "stars"):
    """Horizontal bars of counts per category."""
    names = list(counts)
    figure = _figure((4.0, 0.3 * max(len(names), 2) + 0.9))
    axis = figure.subplots()
    axis.barh(np.arange(len(names)), [counts[n] for n in names], color="tab:blue")
    axis.set_yticks(np.arange(len(names)), names, fontsize=8)
    axis.invert_yaxis()
    axis.set_xlabel(xlabel, fontsize=8)
    axis.set_title(title, fontsize=9)
    axis.tick_params(labelsize=7)
    figure.tight_layout()
    return figure


@styled
def search_figure(query: dict, neighbours: list[dict], title: str = ""):
    """A query's spectra with its nearest neighbours overlaid, one panel per modality.

    ``query``: {modality: flux (canonical grid; XP divided by its norm)}, None where absent;
    ``neighbours``: [{"source_id", "similarity", "labels": {teff, logg, fe_h}, "spectra":
    {modality: flux}}], nearest first. The legend gives each neighbour's similarity and labels.
    """
    import matplotlib

    from .grids import LRS_WAVELENGTH, XP_WAVELENGTH

    grid = {"lrs": LRS_WAVELENGTH, "xp": XP_WAVELENGTH}
    modalities = [
        m
        for m in ("lrs", "xp")
        if query.get(m) is not None or any(m in n["spectra"] for n in neighbours)
    ]
    figure = _figure((6.0 * len(modalities), 4.2))
    axes = np.atleast_1d(figure.subplots(1, max(len(modalities), 1)))
    colours = matplotlib.colormaps["viridis"](np.linspace(0.0, 0.85, max(len(neighbours), 1)))
    for axis, modality in zip(axes, modalities, strict=False):
        wave = grid[modality]
        for colour, n in zip(colours, neighbours, strict=False):
            flux = n["spectra"].get(modality)
            if flux is None:
                continue
            labels = n.get("labels", {})
            text = ", ".join(
                f"{name} {labels[key]:{fmt}}"
                for key, name, fmt in (
                    ("teff", "Teff", ".0f"),
                    ("logg", "logg", ".2f"),
                    ("fe_h", "[Fe/H]", "+.2f"),
                )
                if labels.get(key) is not None and np.isfinite(labels[key])
            )
            axis.plot(
                wave,
                flux,
                lw=0.6,
                alpha=0.8,
                color=colour,
                label=f"{n['source_id']} cos {n['similarity']:.3f}" + (f": {text}" if text else ""),
            )
        if query.get(modality) is not None:
            axis.plot(wave, query[modality], lw=1.1, color="black", label="query")
        finite = np.concatenate(
            [
                f[np.isfinite(f)]
                for f in [query.get(modality), *(n["spectra"].get(modality) for n in neighbours)]
                if f is not None
            ]
            or [np.zeros(1)]
        )
        low, high = np.percentile(finite, [0.5, 99.5])
        pad = 0.15 * (high - low + 1e-6)
        axis.set_ylim(low - pad, high + pad)
        axis.set_title(TITLES[modality], fontsize=9)
        axis.set_xlabel(AXIS_LABEL[modality], fontsize=8)
        axis.set_ylabel(FLUX_LABEL[modality], fontsize=8)
        axis.tick_params(labelsize=7)
        axis.legend(fontsize=6, loc="lower right", framealpha=0.8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure
