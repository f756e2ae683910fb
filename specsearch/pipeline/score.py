"""The score stage: per-star anomaly components, calibrated against a frozen reference release,
combined into one score with an explanation, plus the kNN graph.

``score_store(store, release=None, reference=None)`` is the library twin of ``specsearch score``.

Components (each where its inputs exist; ``COMPONENTS``):

==============  =====  =========================================================================
recon_lrs       lrs    observed LRS vs its in-modal reconstruction: mean z^2 and window peak
cross_lrs       pair   observed LRS vs the LRS predicted from the star's XP: the same two
knn_lrs         lrs    mean cosine distance to the 10 nearest reference stars (LRS embeddings),
                       over the same for those neighbours (a local-density ratio, as LOF)
bad_lrs         lrs    fraction of LRS pixels flagged bad (ivar 0): what chi^2 cannot see
recon_xp        xp     observed XP vs its reconstruction: mean z^2 and window peak
cross_xp        pair   observed XP vs the XP predicted from the star's LRS: the same two
knn_xp          xp     the same on the XP embeddings
knn_pair        pair   the same for the two embeddings side by side: is the pair of spectra rare?
align           pair   1 - cos(z_lrs, z_xp): do the two spectra tell the same story?
labels          pair   mean over Teff, log g, [Fe/H], [alpha/M] of ((LRS - XP) / sigma)^2
==============  =====  =========================================================================

z is the residual in sigma with the observational noise and a model-error floor per pixel
learned on the reference (``residuals.fit_floor``), for each kind of star: the reference stars
are clustered (spherical k-means, about 400 stars a cluster, at most 32) on the embedding of the
spectrum the prediction comes from, and each cluster gets its own floors, because a model
reproduces an M dwarf less well than a G dwarf. XP residuals are taken as fractions of the
star's own flux (XP divided by its mean over 500-600 nm). The window peak is the largest standardised
chi^2 of a window of 8, 32 or 128 LRS pixels (5, 20 or 80 XP samples), so a narrow emission line
is not averaged away by a good fit elsewhere.

Calibration. The reference release (the first scored, or ``--reference``) is frozen on first
use in ``STORE/scores/reference/``: the floors, each statistic's tail model
(``calibration.TailModel``) and a FAISS index of its embeddings for the kNN components. Every
statistic of every star becomes ``-log10 p``, p = the fraction of reference stars at least as
strange (a generalised Pareto tail beyond them). A residual component's p combines its mean
and its peak (``calibration.combine_logp``). The combined statistic is the sum of the
components' -log10 p (Fisher's statistic; of the combinations the anomaly benchmark compared,
the one that ranked best), and it is itself calibrated against the reference stars with the
same spectra (both, LRS only, XP only): ``p_value`` is the fraction of reference stars whose
components add up to at least as much, ``score`` = -log10 p_value.
Nothing a star's score uses depends on the other stars of its release: adding stars to a
release changes no other star's score, and scores are comparable from night to night.

Explanation. ``driver``: the component with the smallest p. ``modality_tag``: which groups hold
a component with p < 1e-3: ``lrs_only``, ``xp_only`` (one spectrum: more often instrumental),
``both`` (more often astrophysical) or ``pair`` (each spectrum is fine alone, but they disagree:
a mismatched pair, or a companion). ``windows``: the strongest residual windows of the most
discrepant comparison, named by the nearest strong feature (``specsearch.lines``).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import SpecsearchError
from ..files import VERIFY, atomic_path, write_json_atomic, write_parquet_atomic
from ..grids import xp_norm
from ..lines import nearest_feature, pixel_wavelength
from ..progress import progress
from ..schema import LABELS, MODALITIES, SCORE_COMPONENTS, SCORES_SCHEMA, column_matrix
from ..store import Store, writes_store
from ..surveys.sources import median_snr_lrs, median_snr_xp
from .calibration import TailModel, combine_logp
from .embed import Chunk, chunk_outputs, plan_chunks, read_chunk
from .residuals import TOP_WINDOWS, ResidualStats, fit_floor, residual_stats, xp_ivar

COMPONENTS = SCORE_COMPONENTS
GROUP = {
    "recon_lrs": "lrs",
    "knn_lrs": "lrs",
    "bad_lrs": "lrs",
    "recon_xp": "xp",
    "knn_xp": "xp",
    "knn_pair": "pair",
    "cross_lrs": "pair",
    "cross_xp": "pair",
    "align": "pair",
    "labels": "pair",
}
COMPARISONS = {  # component -> (observed modality, the prediction it is compared with)
    "recon_lrs": ("lrs", "lrs_recon"),
    "cross_lrs": ("lrs", "lrs_from_xp"),
    "recon_xp": ("xp", "xp_recon"),
    "cross_xp": ("xp", "xp_from_lrs"),
}
STATISTICS = (
    *(name for c in COMPARISONS for name in (c, f"{c}_peak")),
    "knn_lrs",
    "knn_xp",
    "knn_pair",
    "bad_lrs",
    "align",
    "labels",
)
KNN_SPACES = ("lrs", "xp", "pair")
"""The reference kNN indexes: each modality's embeddings, and both side by side."""
PATTERNS = ("both", "lrs", "xp")
"""Which spectra a star has: the combined statistic is calibrated separately for each."""
WIDTHS = {"lrs": (8, 32, 128), "xp": (5, 20, 80)}
SIGNATURE_BINS = {"lrs": 16, "xp": 8}
"""Bins of the residual signature: the shape of how a star departs from the model, per
comparison (48 numbers in all), which triage compares to say "anomalous in the same way"."""
EXPLAIN_WIDTH = {"lrs": 32, "xp": 20}
KNN_K = 10
FLOOR_STARS = 10_000
"""Reference stars the model-error floors are fitted on (a regular subsample)."""
STARS_PER_CLUSTER = 400
MAX_CLUSTERS = 32
SOURCE = {"recon_lrs": "lrs", "cross_lrs": "xp", "recon_xp": "xp", "cross_xp": "lrs"}
"""The modality each prediction is made from: its embedding says which floors apply."""
SIGNIFICANT = 3.0
"""-log10 p from which a component counts in the modality tag (p < 1e-3)."""
HINTS = {
    "lrs_only": "only the LRS is unusual: more often instrumental",
    "xp_only": "only the XP is unusual: more often instrumental",
    "both": "both spectra are unusual: more often astrophysical",
    "pair": "each spectrum looks normal but they disagree: a mismatched pair or a companion",
}
CALIBRATION_FILE = "calibration.json"
ARRAYS_FILE = "calibration.safetensors"
CALIBRATION_FORMAT = 2


# ------------------------------------------------------------------ reading a release


@dataclass
class Batch:
    """The stars of one embed chunk: observed spectra, embedding rows and decoded spectra."""

    source_id: np.ndarray
    observed: dict[str, np.ndarray]  # lrs_flux, lrs_ivar, xp_flux, xp_ivar (n, m); NaN rows missing
    has: dict[str, np.ndarray]  # modality -> (n,) bool: embedded
    embedding: dict[str, np.ndarray]  # modality -> (n, d) float32 unit vectors, NaN rows missing
    labels: dict[str, dict[str, np.ndarray]]  # modality -> pred_<label>[_err] -> (n,)
    align_cos: np.ndarray
    predicted: dict[str, np.ndarray] = field(default_factory=dict)


def _aligned(rows: pa.Table, source_id: np.ndarray, column: str) -> np.ndarray:
    """A column of embedding rows placed at the positions of ``source_id`` (NaN elsewhere)."""
    position = np.searchsorted(source_id, rows.column("source_id").to_numpy())
    if column in ("embedding", "features"):
        values = column_matrix(rows, column)
        out = np.full((len(source_id), values.shape[1]), np.nan, np.float32)
    else:
        values = rows.column(column).to_numpy(zero_copy_only=False).astype(np.float32)
        out = np.full(len(source_id), np.nan, np.float32)
    out[position] = values
    return out


def _read_batch(store: Store, chunk: Chunk, runner: Any, keep: np.ndarray | None = None) -> Batch:
    """A chunk's observed spectra, stored outputs and decoded predictions; ``keep`` (a mask of
    the chunk's rows) keeps only those, before anything is decoded."""
    table = read_chunk(chunk)
    source_id = table.column("source_id").to_numpy()
    if len(source_id) > 1 and np.any(np.diff(source_id) <= 0):
        raise SpecsearchError(f"{chunk.shard_path}: rows are not sorted by source_id")
    if keep is not None:
        table = table.filter(pa.array(keep))
        source_id = source_id[keep]
    observed = {
        "lrs_flux": column_matrix(table, "lrs_flux"),
        "lrs_ivar": column_matrix(table, "lrs_ivar"),
        "xp_flux": column_matrix(table, "xp_flux"),
        "xp_ivar": xp_ivar(column_matrix(table, "xp_flux_error")),
    }
    observed["xp_ivar"][~np.isfinite(observed["xp_flux"])] = 0.0
    has, embedding, features, labels = {}, {}, {}, {}
    for modality, path in chunk_outputs(store, chunk).items():
        if not path.exists():
            raise SpecsearchError(
                f"{path}: missing; run 'specsearch embed --release {chunk.release}' first"
            )
        names = ["source_id", "embedding", "features", "align_cos"]
        names += [f"pred_{label}{s}" for label in LABELS for s in ("", "_err")]
        rows = pq.read_table(path, columns=names, **VERIFY)
        if keep is not None:  # only the kept stars' outputs
            stored = rows.column("source_id").to_numpy()
            rows = rows.filter(pa.array(np.isin(stored, source_id)))
        has[modality] = np.isin(source_id, rows.column("source_id").to_numpy())
        embedding[modality] = _aligned(rows, source_id, "embedding")
        norms = np.linalg.norm(embedding[modality], axis=1, keepdims=True)
        embedding[modality] = embedding[modality] / np.where(norms > 0, norms, 1.0)
        features[modality] = _aligned(rows, source_id, "features")
        labels[modality] = {
            name: _aligned(rows, source_id, f"pred_{name}")
            for label in LABELS
            for name in (label, f"{label}_err")
        }
        align = _aligned(rows, source_id, "align_cos")
        if modality == "lrs":
            align_cos = align
    batch = Batch(source_id, observed, has, embedding, labels, align_cos)
    batch.predicted = runner.decode_features(
        lrs_features=features["lrs"],
        xp_features=features["xp"],
        lrs_flux=observed["lrs_flux"],
        lrs_ivar=observed["lrs_ivar"],
        xp_flux=observed["xp_flux"],
        outputs=[prediction for _, prediction in COMPARISONS.values()],
    )
    normalise_xp(batch.observed, batch.predicted)
    return batch


def normalise_xp(observed: dict[str, np.ndarray], predicted: dict[str, np.ndarray]) -> None:
    """Put the observed and predicted XP in units of the star's own norm (mean flux over
    500-600 nm), in place: XP fluxes span orders of magnitude from star to star, so a per-pixel
    model-error floor is only meaningful as a fraction of the flux."""
    norm = xp_norm(observed["xp_flux"])
    scale = np.where(np.isfinite(norm) & (norm > 0), norm, np.nan)[:, None]
    observed["xp_flux"] = observed["xp_flux"] / scale
    observed["xp_ivar"] = np.where(np.isfinite(scale), observed["xp_ivar"] * scale**2, 0.0)
    for key in ("xp_recon", "xp_from_lrs"):
        if key in predicted:
            predicted[key] = predicted[key] / scale


def _batches(
    store: Store, release: str, runner: Any, show_progress: bool, what: str, every: int = 1
) -> Iterator[Batch]:
    """The release's batches; with ``every`` > 1 only every so many stars of the release (in
    shard order), so that a subsample costs only its own decoding."""
    chunks = plan_chunks(store, release)
    total = sum(c.stop - c.start for c in chunks)
    position = 0
    with progress(what, total, show_progress, unit="stars") as advance:
        for chunk in chunks:
            size = chunk.stop - chunk.start
            keep = None if every == 1 else (np.arange(position, position + size) % every) == 0
            position += size
            if keep is None or keep.any():
                yield _read_batch(store, chunk, runner, keep)
            advance(size)


# ------------------------------------------------------------------ statistics of a batch


def _comparison(batch: Batch, component: str, floor: np.ndarray | None) -> ResidualStats | None:
    """Residual statistics of one comparison; ``floor`` (m,) or per star (n, m)."""
    modality, prediction = COMPARISONS[component]
    other = "xp" if modality == "lrs" else "lrs"
    usable = batch.has[modality] & (batch.has[other] if component.startswith("cross") else True)
    if not usable.any():
        return None
    flux = batch.observed[f"{modality}_flux"]
    ivar = np.where(usable[:, None], batch.observed[f"{modality}_ivar"], 0.0)
    predicted = batch.predicted[prediction]
    width = flux.shape[1]
    return residual_stats(
        flux,
        ivar,
        predicted,
        np.zeros(width) if floor is None else floor,
        WIDTHS[modality],
        EXPLAIN_WIDTH[modality],
        SIGNATURE_BINS[modality],
    )


def knn_vectors(
    embedding: dict[str, np.ndarray], has: dict[str, np.ndarray], space: str
) -> tuple[np.ndarray, np.ndarray]:
    """(rows that have the space, their unit vectors): a modality's embedding, or for "pair"
    the two embeddings side by side (divided by sqrt 2)."""
    if space == "pair":
        rows = np.flatnonzero(has["lrs"] & has["xp"])
        joint = np.hstack([embedding["lrs"][rows], embedding["xp"][rows]]) / np.sqrt(2.0)
        return rows, joint.astype(np.float32)
    rows = np.flatnonzero(has[space])
    return rows, embedding[space][rows].astype(np.float32)


def _knn_distance(reference: Reference, batch: Batch, space: str) -> np.ndarray:
    """Mean cosine distance to the KNN_K nearest reference stars other than the star itself,
    divided by the median of the same distance of those neighbours (in the reference, leaving
    each star out): how much sparser the star's surroundings are than its neighbours'."""
    from ..indexes import drop_self

    out = np.full(len(batch.source_id), np.nan, np.float32)
    rows, vectors = knn_vectors(batch.embedding, batch.has, space)
    index = reference.knn_index(space)
    if not rows.size or index is None:
        return out
    k = min(KNN_K, index.ntotal - 1)
    if k < 1:
        return out
    queries = np.ascontiguousarray(vectors)
    sims, ids = index.search(queries, k + 1)
    ids, sims = drop_self(ids, batch.source_id[rows], k, similarities=sims)
    sims = np.where(ids >= 0, sims, np.nan)
    distance = 1.0 - np.nanmean(sims, axis=1)
    out[rows] = distance / reference.neighbour_scale(space, ids)
    return out


def _label_disagreement(batch: Batch) -> np.ndarray:
    """Mean over labels known from both modalities of ((LRS - XP) / combined sigma)^2."""
    terms = []
    for label in LABELS:
        lrs, xp = batch.labels["lrs"], batch.labels["xp"]
        var = lrs[f"{label}_err"] ** 2 + xp[f"{label}_err"] ** 2
        with np.errstate(invalid="ignore", divide="ignore"):
            terms.append((lrs[label] - xp[label]) ** 2 / var)
    terms = np.stack(terms, axis=1)
    terms = np.where(np.isfinite(terms), terms, np.nan)
    both = batch.has["lrs"] & batch.has["xp"] & np.isfinite(terms).any(axis=1)
    out = np.full(len(batch.source_id), np.nan, np.float32)
    if both.any():
        out[both] = np.nanmean(terms[both], axis=1)
    return out


def batch_statistics(batch: Batch, reference: Reference) -> dict[str, np.ndarray]:
    """Every raw statistic (STATISTICS) of a batch's stars, plus S/N and explanation windows."""
    n = len(batch.source_id)
    stats: dict[str, np.ndarray] = {}
    for component in COMPARISONS:
        result = _comparison(batch, component, reference.floor_rows(component, batch))
        if result is None:
            stats[component] = np.full(n, np.nan, np.float32)
            stats[f"{component}_peak"] = np.full(n, np.nan, np.float32)
            for name in ("windows", "window_low", "window_high"):
                stats[f"{component}_{name}"] = np.full((n, TOP_WINDOWS), -1, np.int32)
            stats[f"{component}_window_sigma"] = np.full((n, TOP_WINDOWS), np.nan, np.float32)
            stats[f"{component}_window_mean"] = np.full((n, TOP_WINDOWS), np.nan, np.float32)
            bins = SIGNATURE_BINS[COMPARISONS[component][0]]
            stats[f"{component}_binned"] = np.zeros((n, bins), np.float32)
            continue
        modality, _ = COMPARISONS[component]
        other = "xp" if modality == "lrs" else "lrs"
        usable = batch.has[modality] & (batch.has[other] if component.startswith("cross") else True)
        stats[component] = np.where(usable, result.chi2, np.nan).astype(np.float32)
        stats[f"{component}_peak"] = np.where(usable, result.peak, np.nan).astype(np.float32)
        stats[f"{component}_windows"] = result.windows
        stats[f"{component}_window_low"] = result.window_low
        stats[f"{component}_window_high"] = result.window_high
        stats[f"{component}_window_sigma"] = result.window_sigma
        stats[f"{component}_window_mean"] = result.window_mean
        stats[f"{component}_binned"] = np.where(usable[:, None], result.binned, 0.0).astype(
            np.float32
        )
    for space in KNN_SPACES:
        stats[f"knn_{space}"] = _knn_distance(reference, batch, space)
    lrs_ivar = batch.observed["lrs_ivar"]
    with np.errstate(invalid="ignore"):
        bad = (~(np.nan_to_num(lrs_ivar) > 0)).mean(axis=1)
    stats["bad_lrs"] = np.where(batch.has["lrs"], bad, np.nan).astype(np.float32)
    stats["align"] = np.where(
        batch.has["lrs"] & batch.has["xp"], 1.0 - batch.align_cos, np.nan
    ).astype(np.float32)
    stats["labels"] = _label_disagreement(batch)
    observed = batch.observed
    with np.errstate(all="ignore"):
        snr_lrs = median_snr_lrs(observed["lrs_flux"], np.nan_to_num(lrs_ivar))
        snr_xp = median_snr_xp(
            observed["xp_flux"],
            np.where(observed["xp_ivar"] > 0, 1.0 / np.sqrt(observed["xp_ivar"]), 0.0),
        )
    stats["snr_lrs"] = np.where(batch.has["lrs"], snr_lrs, np.nan).astype(np.float32)
    stats["snr_xp"] = np.where(batch.has["xp"], snr_xp, np.nan).astype(np.float32)
    return stats


def combined_statistic(logp: dict[str, np.ndarray]) -> np.ndarray:
    """Fisher's statistic in log10 units: the sum of the components' -log10 p (NaN: none)."""
    matrix = np.stack([logp[c] for c in COMPONENTS], axis=1)
    present = np.isfinite(matrix).any(axis=1)
    return np.where(present, np.nansum(matrix, axis=1), np.nan)


def fisher_logp(combined: np.ndarray, k: np.ndarray) -> np.ndarray:
    """-log10 p of Fisher's statistic for k independent components (chi^2 with 2k dof)."""
    from scipy.stats import chi2

    with np.errstate(divide="ignore"):
        return -chi2.logsf(2.0 * np.log(10.0) * combined, 2 * np.maximum(k, 1)) / np.log(10.0)


def spectra_pattern(stats: dict[str, np.ndarray]) -> np.ndarray:
    """ "both", "lrs" or "xp" per star: which spectra it has (from its S/N columns)."""
    lrs, xp = np.isfinite(stats["snr_lrs"]), np.isfinite(stats["snr_xp"])
    return np.where(lrs & xp, "both", np.where(lrs, "lrs", "xp"))


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


# ------------------------------------------------------------------ the frozen reference


@dataclass
class Reference:
    """The frozen calibration: floors, tail models and the reference kNN indexes."""

    release: str
    model_id: str
    floors: dict[str, np.ndarray]  # comparison -> (clusters, pixels)
    tails: dict[str, TailModel | None]
    n_stars: int
    centroids: dict[str, np.ndarray] = field(default_factory=dict)  # modality -> (clusters, d)
    knn_scale: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    """space -> (sorted reference source_ids, their own mean kNN distance)."""
    calibration_id: str = ""
    created: str = ""
    directory: Path | None = None
    _indexes: dict[str, Any] = field(default_factory=dict)

    def clusters(self, modality: str, vectors: np.ndarray) -> np.ndarray:
        """The nearest cluster of each unit vector (cosine); 0 without clusters or a vector."""
        centroids = self.centroids.get(modality)
        if centroids is None or len(centroids) < 2:
            return np.zeros(len(vectors), np.int64)
        similarity = np.nan_to_num(np.asarray(vectors, np.float32), nan=0.0) @ centroids.T
        return similarity.argmax(axis=1)

    def floor_rows(self, component: str, batch: Batch) -> np.ndarray | None:
        """Each star's floors for a comparison, (n, pixels); None before floors are fitted."""
        floors = self.floors.get(component)
        if floors is None:
            return None
        source = SOURCE[component]
        return floors[self.clusters(source, batch.embedding[source])]

    def neighbour_scale(self, space: str, ids: np.ndarray) -> np.ndarray:
        """Median own kNN distance of each row's reference neighbours ``ids`` (n, k)."""
        found = self.knn_scale.get(space)
        if found is None:
            return np.ones(len(ids))
        sorted_ids, scale = found
        at = np.clip(np.searchsorted(sorted_ids, ids), 0, len(sorted_ids) - 1)
        values = np.where((ids >= 0) & (sorted_ids[at] == ids), scale[at], np.nan)
        with np.errstate(all="ignore"):
            median = np.nanmedian(values, axis=1)
        return np.where(np.isfinite(median) & (median > 0), median, np.nan)

    def knn_index(self, modality: str):
        found = self._indexes.get(modality)
        return None if found is None else found[0]

    def score(self, stats: dict[str, np.ndarray], logp: dict[str, np.ndarray]) -> np.ndarray:
        """-log10 p of the combined statistic, against reference stars of the same pattern."""
        combined = combined_statistic(logp)
        pattern = spectra_pattern(stats)
        out = np.full(len(combined), np.nan)
        for name in PATTERNS:
            rows = (pattern == name) & np.isfinite(combined)
            tail = self.tails.get(f"combined_{name}")
            if not rows.any():
                continue
            if tail is None:  # too few such reference stars: Fisher's chi^2 law, as if independent
                k = np.isfinite(np.stack([logp[c] for c in COMPONENTS], axis=1)[rows]).sum(axis=1)
                out[rows] = fisher_logp(combined[rows], k)
            else:
                out[rows] = tail.logp(combined[rows])
        return out

    def logp(self, stats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """-log10 p of every statistic and component (see the module doc)."""
        sub = {}
        for name in STATISTICS:
            tail = self.tails.get(name)
            values = stats[name].astype(np.float64)
            sub[name] = np.full(len(values), np.nan) if tail is None else tail.logp(values)
        out = {}
        for component in COMPONENTS:
            if component in COMPARISONS:
                pair = np.stack([sub[component], sub[f"{component}_peak"]], axis=1)
                out[component] = combine_logp(pair)
            else:
                out[component] = sub[component]
        return out

    def to_dict(self) -> dict:
        return {
            "format": CALIBRATION_FORMAT,
            "calibration_id": self.calibration_id,
            "release": self.release,
            "model_id": self.model_id,
            "created": self.created,
            "n_stars": self.n_stars,
            "knn_k": KNN_K,
            "widths": {m: list(w) for m, w in WIDTHS.items()},
            "floor_clusters": {c: len(f) for c, f in self.floors.items()},
            "arrays": ARRAYS_FILE,
            "tails": {name: (t.to_dict() if t else None) for name, t in self.tails.items()},
            "knn_indexes": sorted(self._indexes),
            "combination": "sum of component -log10 p, calibrated per spectra pattern",
        }

    def save(self, directory: Path) -> None:
        from safetensors.numpy import save_file

        from ..indexes.io import save_index

        for modality, (index, params) in self._indexes.items():
            save_index(index, {**params, "role": "reference kNN"}, directory, modality)
        arrays = {
            f"floors.{c}": np.ascontiguousarray(f, np.float32) for c, f in self.floors.items()
        }
        arrays |= {
            f"centroids.{m}": np.ascontiguousarray(c, np.float32) for m, c in self.centroids.items()
        }
        for space, (ids, scale) in self.knn_scale.items():
            arrays[f"knn_ids.{space}"] = np.ascontiguousarray(ids, np.int64)
            arrays[f"knn_scale.{space}"] = np.ascontiguousarray(scale, np.float32)
        with atomic_path(directory / ARRAYS_FILE) as tmp:
            save_file(arrays, str(tmp))
        write_json_atomic(self.to_dict(), directory / CALIBRATION_FILE)
        self.directory = directory

    @classmethod
    def load(cls, directory: Path) -> Reference:
        from ..indexes.io import load_index

        path = directory / CALIBRATION_FILE
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise SpecsearchError(f"{path}: unreadable calibration ({err})") from None
        if data.get("format") != CALIBRATION_FORMAT:
            raise SpecsearchError(f"{path}: calibration format {data.get('format')} unknown")
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            arrays = load_file(str(directory / data["arrays"]))
        except (OSError, SafetensorError) as err:
            raise SpecsearchError(f"{directory / data['arrays']}: unreadable ({err})") from None
        reference = cls(
            release=data["release"],
            model_id=data["model_id"],
            floors={k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith("floors.")},
            centroids={
                k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith("centroids.")
            },
            knn_scale={
                k.split(".", 1)[1]: (v, arrays[f"knn_scale.{k.split('.', 1)[1]}"])
                for k, v in arrays.items()
                if k.startswith("knn_ids.")
            },
            tails={name: TailModel.from_dict(t) for name, t in data["tails"].items()},
            n_stars=data["n_stars"],
            calibration_id=data["calibration_id"],
            created=data["created"],
            directory=directory,
        )
        for modality in data.get("knn_indexes", []):
            reference._indexes[modality] = load_index(directory, modality)
        return reference


def _release_embeddings(
    store: Store, release: str
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A release's rows of both modalities on one list of source_ids: (ids, unit vectors per
    modality with NaN rows where missing, which stars have each modality)."""
    tables = {
        m: store.embeddings(m, release=release, columns=["source_id", "embedding"])
        for m in store.embedding_modalities()
    }
    ids = np.unique(np.concatenate([t.column("source_id").to_numpy() for t in tables.values()]))
    embedding, has = {}, {}
    for modality in MODALITIES:
        has[modality] = np.zeros(len(ids), bool)
        embedding[modality] = np.full((len(ids), 1), np.nan, np.float32)
        table = tables.get(modality)
        if table is None or table.num_rows == 0:
            continue
        vectors = column_matrix(table, "embedding")
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        position = np.searchsorted(ids, table.column("source_id").to_numpy())
        embedding[modality] = np.full((len(ids), vectors.shape[1]), np.nan, np.float32)
        embedding[modality][position] = vectors
        has[modality][position] = True
    return ids, embedding, has


def _own_knn_distance(
    index: Any, vectors: np.ndarray, ids: np.ndarray, batch: int = 65_536
) -> tuple[np.ndarray, np.ndarray]:
    """(sorted ids, each reference star's mean cosine distance to its KNN_K nearest others)."""
    from ..indexes import drop_self

    k = min(KNN_K, len(ids) - 1)
    distance = np.empty(len(ids), np.float32)
    for start in range(0, len(ids), batch):
        part = slice(start, start + batch)
        sims, found = index.search(np.ascontiguousarray(vectors[part]), k + 1)
        found, sims = drop_self(found, ids[part], k, similarities=sims)
        distance[part] = 1.0 - np.nanmean(np.where(found >= 0, sims, np.nan), axis=1)
    order = np.argsort(ids)
    return ids[order], distance[order]


def _cluster(vectors: np.ndarray, seed: int = 0) -> np.ndarray:
    """Spherical k-means centroids (k, d) of unit vectors: about STARS_PER_CLUSTER each."""
    import faiss

    vectors = np.ascontiguousarray(vectors[np.isfinite(vectors).all(axis=1)], np.float32)
    k = int(np.clip(len(vectors) // STARS_PER_CLUSTER, 1, MAX_CLUSTERS))
    if k < 2:
        return np.zeros((1, vectors.shape[1] if vectors.ndim == 2 else 1), np.float32)
    kmeans = faiss.Kmeans(vectors.shape[1], k, niter=25, seed=seed, spherical=True, verbose=False)
    kmeans.train(vectors)
    return kmeans.centroids.copy()


def _floor_sample(n_rows: int) -> int:
    """Every how many stars one goes into the floor fit."""
    return max(1, -(-n_rows // FLOOR_STARS))


def fit_reference(
    store: Store, release: str, runner: Any, show_progress: bool = True
) -> tuple[Reference, dict[str, np.ndarray], np.ndarray]:
    """Fit the calibration on ``release`` (not yet saved). Returns (reference, the reference
    stars' statistics, their source_ids): scoring the reference itself reuses them."""
    from ..indexes import build_index

    reference = Reference(release, runner.model_id, {}, {}, 0)
    every = _floor_sample(store.read_manifest()["releases"][release]["rows"])
    ids, embedding, has = _release_embeddings(store, release)
    # 1. kinds of star: clusters of each modality's embeddings, in the floor subsample's size
    for modality in MODALITIES:
        vectors = embedding[modality][has[modality]][::every]
        reference.centroids[modality] = _cluster(vectors)
    # 2. the model-error floors of each cluster, on a regular subsample of the reference
    sample: dict[str, list[tuple[np.ndarray, ...]]] = {c: [] for c in COMPARISONS}
    floors_of = f"fitting floors on {release}"
    for batch in _batches(store, release, runner, show_progress, floors_of, every=every):
        for component, (modality, prediction) in COMPARISONS.items():
            other = "xp" if modality == "lrs" else "lrs"
            keep = batch.has[modality].copy()
            if component.startswith("cross"):
                keep &= batch.has[other]
            source = SOURCE[component]
            sample[component].append(
                (
                    batch.observed[f"{modality}_flux"][keep],
                    batch.observed[f"{modality}_ivar"][keep],
                    batch.predicted[prediction][keep],
                    reference.clusters(source, batch.embedding[source][keep]),
                )
            )
    for component, parts in sample.items():
        observed, ivar, predicted, cluster = (np.concatenate(p) for p in zip(*parts, strict=True))
        if len(observed) < 10:
            continue
        overall = fit_floor(observed, ivar, predicted)
        k = len(reference.centroids.get(SOURCE[component], [None]))
        floors = np.tile(overall, (k, 1))
        for j in range(k):  # a cluster too small for its own floors keeps the overall ones
            members = cluster == j
            if members.sum() >= STARS_PER_CLUSTER // 4:
                floors[j] = fit_floor(observed[members], ivar[members], predicted[members])
        reference.floors[component] = floors
    del sample
    # 3. the reference kNN indexes: the release's own rows
    for space in KNN_SPACES:
        rows, vectors = knn_vectors(embedding, has, space)
        if len(rows) < 2:
            continue
        # searched only in batches (every star of a release): the fastest index for a batch
        reference._indexes[space] = build_index(
            vectors, ids[rows], speed_for="batch", show_progress=False, device="cpu"
        )
        reference.knn_scale[space] = _own_knn_distance(
            reference._indexes[space][0], vectors, ids[rows]
        )
    del embedding
    # 4. every statistic of every reference star, and its tail model
    parts, ids = [], []
    for batch in _batches(store, release, runner, show_progress, f"calibrating on {release}"):
        parts.append(batch_statistics(batch, reference))
        ids.append(batch.source_id)
    stats = _concat(parts)
    reference.tails = {name: TailModel.fit(stats[name]) for name in STATISTICS}
    combined = combined_statistic(reference.logp(stats))
    pattern = spectra_pattern(stats)
    for name in PATTERNS:
        reference.tails[f"combined_{name}"] = TailModel.fit(combined[pattern == name], max_shape=0)
    reference.n_stars = int(sum(len(i) for i in ids))
    reference.created = _now()
    reference.calibration_id = uuid.uuid4().hex
    return reference, stats, np.concatenate(ids)


# ------------------------------------------------------------------ scores and explanations


def _tag(logp: dict[str, np.ndarray], driver: np.ndarray) -> np.ndarray:
    significant = {
        group: np.any(
            [np.nan_to_num(logp[c]) >= SIGNIFICANT for c in COMPONENTS if GROUP[c] == group],
            axis=0,
        )
        for group in ("lrs", "xp", "pair")
    }
    by_driver = np.array([GROUP[c] for c in COMPONENTS])[driver]
    fallback = np.where(
        by_driver == "lrs", "lrs_only", np.where(by_driver == "xp", "xp_only", "pair")
    )
    return np.where(
        significant["lrs"] & significant["xp"],
        "both",
        np.where(
            significant["lrs"],
            "lrs_only",
            np.where(significant["xp"], "xp_only", np.where(significant["pair"], "pair", fallback)),
        ),
    )


def _windows_text(stats: dict[str, np.ndarray], logp: dict[str, np.ndarray]) -> list[str]:
    """Per star, the strongest residual windows of its most discrepant comparison."""
    comparisons = list(COMPARISONS)
    matrix = np.stack([np.nan_to_num(logp[c], nan=-1.0) for c in comparisons], axis=1)
    worst = matrix.argmax(axis=1)
    n = len(worst)
    texts = [""] * n
    for j, component in enumerate(comparisons):
        rows = np.flatnonzero((worst == j) & (matrix[:, j] >= 0))
        if not rows.size:
            continue
        modality, _ = COMPARISONS[component]
        centres = stats[f"{component}_windows"][rows]
        lows = pixel_wavelength(modality, stats[f"{component}_window_low"][rows])
        highs = pixel_wavelength(modality, stats[f"{component}_window_high"][rows])
        sigma = stats[f"{component}_window_sigma"][rows]
        mean = stats[f"{component}_window_mean"][rows]
        waves = pixel_wavelength(modality, centres)
        names = np.array(nearest_feature(modality, waves.ravel())).reshape(waves.shape)
        unit, scale = ("A", 1.0) if modality == "lrs" else ("nm", 0.1)
        narrow = 2.5 * EXPLAIN_WIDTH[modality]  # pixels: wider ranges are given as ranges
        span = stats[f"{component}_window_high"][rows] - stats[f"{component}_window_low"][rows]
        for i, row in enumerate(rows):
            items = []
            for w in range(TOP_WINDOWS):
                if centres[i, w] < 0 or not np.isfinite(sigma[i, w]):
                    continue
                strength = f"{'+' if mean[i, w] > 0 else '-'}{sigma[i, w]:.1f}σ"
                if span[i, w] <= narrow:
                    where = f"{names[i, w]} at {waves[i, w] * scale:.0f} {unit}"
                else:
                    where = (
                        f"{lows[i, w] * scale:.0f}-{highs[i, w] * scale:.0f} {unit} "
                        f"(peak near {names[i, w]})"
                    )
                items.append(f"{where} ({strength})")
            if items:
                texts[row] = f"{component}: " + "; ".join(items)
    return texts


def explain(
    stats: dict[str, np.ndarray], logp: dict[str, np.ndarray], score: np.ndarray
) -> dict[str, Any]:
    """driver, modality_tag, windows and a one-sentence explanation per star."""
    matrix = np.stack([np.nan_to_num(logp[c], nan=-1.0) for c in COMPONENTS], axis=1)
    driver = matrix.argmax(axis=1)
    tag = _tag(logp, driver)
    windows = _windows_text(stats, logp)
    names = np.array(COMPONENTS)
    order = np.argsort(-matrix, axis=1)
    sentences = []
    for i in range(len(driver)):
        if not np.isfinite(score[i]):
            sentences.append("no component could be computed")
            continue
        strong = [names[j] for j in order[i, :3] if matrix[i, j] >= SIGNIFICANT]
        lead = ", ".join(f"{c} (p={10.0 ** -matrix[i, COMPONENTS.index(c)]:.0e})" for c in strong)
        if not lead:
            sentences.append(f"nothing unusual (strongest: {names[driver[i]]})")
            continue
        text = f"{lead}; {tag[i]}: {HINTS[tag[i]]}"
        if windows[i]:
            text += f"; strongest residuals {windows[i]}"
        sentences.append(text)
    return {
        "driver": names[driver].tolist(),
        "modality_tag": tag.tolist(),
        "windows": windows,
        "explanation": sentences,
    }


def scores_table(
    source_id: np.ndarray,
    stats: dict[str, np.ndarray],
    reference: Reference,
    release: str,
) -> pa.Table:
    """The score rows of a release (SCORES_SCHEMA), sorted by source_id."""
    logp = reference.logp(stats)
    score = reference.score(stats, logp)
    explained = explain(stats, logp, score)
    order = np.lexsort((source_id, -np.nan_to_num(score, nan=-1.0)))
    rank = np.empty(len(order), np.int32)
    rank[order] = np.arange(1, len(order) + 1)
    n = len(source_id)
    columns: dict[str, Any] = {
        "source_id": source_id,
        "release": [release] * n,
        "score": score.astype(np.float32),
        "p_value": 10.0**-score,
        "rank": rank,
        "n_components": np.isfinite(np.stack([logp[c] for c in COMPONENTS], axis=1)).sum(axis=1),
        **explained,
    }
    for component in COMPONENTS:
        columns[component] = stats[component]
        columns[f"{component}_logp"] = logp[component].astype(np.float32)
    for component in COMPARISONS:
        columns[f"{component}_peak"] = stats[f"{component}_peak"]
    columns["signature"] = residual_signature(stats)
    columns["snr_lrs"] = stats["snr_lrs"]
    columns["snr_xp"] = stats["snr_xp"]
    columns["reference"] = [reference.release] * n
    columns["model_id"] = [reference.model_id] * n
    arrays = {
        f.name: pa.array(
            columns[f.name],
            f.type,
            mask=_nan_mask(columns[f.name]) if pa.types.is_floating(f.type) else None,
        )
        for f in SCORES_SCHEMA
        if f.name != "signature"
    }
    signature = columns["signature"]
    arrays["signature"] = pa.FixedSizeListArray.from_arrays(
        pa.array(signature.astype(np.float16).ravel(), pa.float16()), signature.shape[1]
    )
    return pa.table(arrays, schema=SCORES_SCHEMA).sort_by("source_id")


def residual_signature(stats: dict[str, np.ndarray]) -> np.ndarray:
    """Each star's residual signature: the binned mean z of its four comparisons side by side,
    each squashed by arcsinh (so one huge residual does not drown the rest), as a unit vector
    (zeros where a star has no residual at all). (n, 48) float32."""
    parts = [np.arcsinh(stats[f"{c}_binned"].astype(np.float64)) for c in COMPARISONS]
    signature = np.hstack(parts)
    norm = np.linalg.norm(signature, axis=1, keepdims=True)
    return (signature / np.where(norm > 0, norm, 1.0)).astype(np.float32)


def _nan_mask(values) -> np.ndarray | None:
    values = np.asarray(values, dtype=np.float64)
    mask = np.isnan(values)
    return mask if mask.any() else None


# ------------------------------------------------------------------ the kNN graph


def neighbor_table(store: Store, release: str, k: int = KNN_K) -> pa.Table:
    """Each star of ``release``: its k nearest other stars in the store's index of each
    modality (the current rows of every release), as NEIGHBORS_SCHEMA rows."""
    from ..indexes import drop_self, load_store_index
    from ..schema import NEIGHBORS_SCHEMA

    parts = []
    for modality in store.embedding_modalities():
        rows = store.embeddings(modality, release=release, columns=["source_id", "embedding"])
        if rows.num_rows == 0:
            continue
        index, params = load_store_index(store, modality)
        if release not in params.get("releases", []):
            raise SpecsearchError(
                f"the {modality} index does not hold release {release}: run "
                "'specsearch index build' (or 'specsearch nightly', which extends it)"
            )
        ids = rows.column("source_id").to_numpy()
        vectors = column_matrix(rows, "embedding")
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        kk = min(k, index.ntotal - 1)
        if kk < 1:
            continue
        sims, found = index.search(np.ascontiguousarray(vectors), kk + 1)
        found, sims = drop_self(found, ids, kk, similarities=sims)
        keep = found >= 0
        q = np.repeat(ids, kk).reshape(-1, kk)
        rank = np.tile(np.arange(1, kk + 1, dtype=np.int32), (len(ids), 1))
        parts.append(
            pa.table(
                {
                    "source_id": pa.array(q[keep], pa.int64()),
                    "modality": pa.array([modality] * int(keep.sum()), pa.string()),
                    "rank": pa.array(rank[keep], pa.int32()),
                    "neighbor_id": pa.array(found[keep], pa.int64()),
                    "similarity": pa.array(sims[keep], pa.float32()),
                    "release": pa.array([release] * int(keep.sum()), pa.string()),
                },
                schema=NEIGHBORS_SCHEMA,
            )
        )
    if not parts:
        return NEIGHBORS_SCHEMA.empty_table()
    return pa.concat_tables(parts).sort_by(
        [("source_id", "ascending"), ("modality", "ascending"), ("rank", "ascending")]
    )


# ------------------------------------------------------------------ the stage


@dataclass
class ScoreResult:
    """What one score run did, per release: stars scored and how many are above threshold."""

    reference: str
    calibrated: bool
    releases: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def __str__(self) -> str:
        if not self.releases:
            return (
                f"score: nothing to do ({', '.join(self.skipped) or 'no release'} already scored)"
            )
        parts = [
            f"{r}: {e['stars']:,} stars, {e['above_threshold']} with score >= {e['threshold']:g}"
            f" (top {e['top_score']:.1f})"
            for r, e in self.releases.items()
        ]
        frozen = "calibrated on" if self.calibrated else "against reference"
        return f"scored {'; '.join(parts)} ({frozen} {self.reference}, {self.seconds:.1f} s)"


def default_threshold(n_stars: int) -> float:
    """The score from which a star counts as an anomaly unless told otherwise: log10 of the
    release's size (at least 2), where about one normal star per release passes by chance."""
    return round(max(2.0, float(np.log10(max(n_stars, 1)))), 1)


def load_reference(store: Store) -> Reference | None:
    """The store's frozen calibration, or None before the first score run."""
    if store.calibration() is None:
        return None
    return Reference.load(store.reference_dir())


def _fingerprint(store: Store, release: str, reference: Reference) -> str:
    """What a release's scores are made from: the calibration, its shards and embeddings. (Its
    kNN graph is that of the store's indexes when it was scored; later releases do not make
    an old night score again.)"""
    parts = {
        "calibration": reference.calibration_id,
        "shards": {str(p.name): sha for p, sha in store.shard_checksums(release).items()},
        "embeddings": {m: [p.name for p in store.embedding_files(m, release)] for m in MODALITIES},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


@writes_store("score")
def score_store(
    store: str | os.PathLike | Store,
    release: str | None = None,
    reference: str | None = None,
    *,
    model: str | None = None,
    threshold: float | None = None,
    show_progress: bool = True,
) -> ScoreResult:
    """Score ``release`` (default: every release not yet scored against the frozen reference).

    The first run freezes the calibration on ``reference`` (default: the first release); a
    later ``reference`` that differs from the frozen one is an error (the scores of different
    releases would not be comparable). A release already scored from the same inputs is skipped.
    ``threshold``: the score that counts as an anomaly in the summary (default:
    ``default_threshold`` of the release's size).
    """
    from ..models.runner import SpecCLIPRunner

    start = time.perf_counter()
    st = store
    releases = st.releases()
    if not releases:
        raise SpecsearchError(f"{st.root}: the store has no ingested release")
    for name in [release, reference]:
        if name is not None and name not in releases:
            raise SpecsearchError(f"{st.root}: release {name} is not in the store")
    model_id = st.embeddings_model()
    if model_id is None:
        raise SpecsearchError(f"{st.root}: no embeddings; run 'specsearch embed' first")
    st.require_embeddings("scoring")
    frozen = load_reference(st)
    if frozen is not None and reference is not None and reference != frozen.release:
        raise SpecsearchError(
            f"{st.root}: scores are calibrated on release {frozen.release} (frozen "
            f"{frozen.created}); a reference of {reference} would make them incomparable"
        )
    if frozen is not None and frozen.model_id != model_id:
        raise SpecsearchError(
            f"{st.root}: the calibration is of model {frozen.model_id}, the embeddings of "
            f"{model_id}: re-embed with {frozen.model_id}"
        )
    runner = SpecCLIPRunner(model_id if model in (None, "default") else model, device="auto")
    result = ScoreResult(
        reference=(frozen.release if frozen else reference or releases[0]), calibrated=False
    )
    reference_stats = None
    if frozen is None:
        ref_release = reference or releases[0]
        frozen, stats, ids = fit_reference(st, ref_release, runner, show_progress)
        shutil.rmtree(st.reference_dir(), ignore_errors=True)  # a killed run's, uncommitted
        frozen.save(st.reference_dir())
        st.record_calibration(ref_release, frozen.calibration_id)
        reference_stats = (ref_release, stats, ids)
        result.calibrated = True
    wanted = [release] if release else releases
    for name in wanted:
        fingerprint = _fingerprint(st, name, frozen)
        entry = st.score_entry(name)
        if entry and entry.get("fingerprint") == fingerprint and _intact(st, name):
            result.skipped.append(name)
            continue
        if reference_stats is not None and reference_stats[0] == name:
            stats, ids = reference_stats[1], reference_stats[2]
        else:
            parts, id_parts = [], []
            for batch in _batches(st, name, runner, show_progress, f"scoring {name}"):
                parts.append(batch_statistics(batch, frozen))
                id_parts.append(batch.source_id)
            stats, ids = _concat(parts), np.concatenate(id_parts)
        table = scores_table(ids, stats, frozen, name)
        graph = neighbor_table(st, name)
        write_parquet_atomic(table, st.score_path(name, "scores.parquet"), row_group_size=65_536)
        write_parquet_atomic(graph, st.score_path(name, "neighbors.parquet"), row_group_size=65_536)
        scores = table.column("score").to_numpy(zero_copy_only=False)
        cut = default_threshold(table.num_rows) if threshold is None else threshold
        entry = {
            "files": {"scores": "scores.parquet", "neighbors": "neighbors.parquet"},
            "reference": frozen.release,
            "calibration_id": frozen.calibration_id,
            "model_id": frozen.model_id,
            "stars": table.num_rows,
            "threshold": cut,
            "above_threshold": int(np.nansum(scores >= cut)),
            "top_score": float(np.nanmax(scores)) if len(scores) else 0.0,
            "fingerprint": fingerprint,
            "scored": _now(),
        }
        st.record_scores(name, entry)
        result.releases[name] = entry
    result.seconds = time.perf_counter() - start
    return result


def _intact(st: Store, release: str) -> bool:
    """Whether a release's committed score files are still as they were written."""
    try:
        st.read_scores(release, columns=["source_id"])
        st.read_scores(release, "neighbors", columns=["source_id"])
    except (SpecsearchError, OSError):
        return False
    return True


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
