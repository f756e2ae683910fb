"""Everything the store knows about a few stars of one release, gathered for a look: observed
spectra, what the model predicts for them (decoded from the stored features), residuals in sigma
with the frozen model-error floors, the strongest residual windows, the score row, labels and
the nearest neighbours' spectra. The report and the plots read stars through ``star_views``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import SpecsearchError
from ..grids import LRS_WAVELENGTH, XP_WAVELENGTH, xp_norm
from ..lines import nearest_feature, pixel_wavelength
from ..schema import LABELS, MODALITIES, column_matrix
from ..store import Store

PREDICTIONS = {"lrs": ("lrs_recon", "lrs_from_xp"), "xp": ("xp_recon", "xp_from_lrs")}
COMPARISON = {
    "lrs_recon": "recon_lrs",
    "lrs_from_xp": "cross_lrs",
    "xp_recon": "recon_xp",
    "xp_from_lrs": "cross_xp",
}


@dataclass
class Spectrum:
    """One modality of one star: observed and predicted flux on the canonical grid.

    wavelength in A (LRS) or nm (XP); flux continuum-normalised (LRS) or divided by the star's
    XP norm (mean over 500-600 nm); sigma the 1-sigma error in the same units (NaN: bad pixel);
    predicted: {"recon" | "cross": flux}; z: the same residuals in sigma (model floor included).
    """

    wavelength: np.ndarray
    unit: str
    flux: np.ndarray
    sigma: np.ndarray
    predicted: dict[str, np.ndarray] = field(default_factory=dict)
    z: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Window:
    """A flagged residual window: where, how strong, and the nearest strong feature."""

    modality: str
    comparison: str  # recon or cross
    low: float
    high: float
    centre: float
    sigma: float  # rms residual in the window, in sigma
    sign: str  # "+" more flux than predicted, "-" less
    name: str


@dataclass
class StarView:
    source_id: int
    release: str
    catalog: dict[str, Any]
    labels: dict[str, dict[str, float]]  # modality -> pred_<label>[_err]
    score: dict[str, Any] | None
    spectra: dict[str, Spectrum]
    windows: list[Window]
    neighbours: dict[str, list[tuple[int, float, np.ndarray]]]  # modality -> (id, sim, flux)


def star_views(
    store: str | os.PathLike | Store,
    release: str,
    source_ids: np.ndarray,
    neighbours: int = 3,
    model: str | None = None,
) -> list[StarView]:
    """A StarView per star of ``release`` in ``source_ids`` (in that order)."""
    from ..models.runner import SpecCLIPRunner
    from ..pipeline.residuals import residual_sigma, residual_stats, xp_ivar
    from ..pipeline.score import EXPLAIN_WIDTH, SOURCE, WIDTHS, load_reference, normalise_xp

    st = Store.open(store)
    wanted = np.asarray(source_ids, dtype=np.int64)
    rows = st.read_shards(source_ids=wanted, release=release)
    found = rows.column("source_id").to_numpy()
    missing = np.setdiff1d(wanted, found)
    if missing.size:
        raise SpecsearchError(f"source_id {int(missing[0])} is not in release {release}")
    at = {int(i): j for j, i in enumerate(found)}
    rows = rows.take([at[int(i)] for i in wanted])  # in the order asked
    order = {int(i): j for j, i in enumerate(wanted)}
    n = len(wanted)
    observed = {name: column_matrix(rows, name) for name in ("lrs_flux", "lrs_ivar", "xp_flux")}
    observed["xp_ivar"] = xp_ivar(column_matrix(rows, "xp_flux_error"))
    features, labels = {}, [dict() for _ in range(n)]
    for modality in MODALITIES:
        features[modality] = None
        try:
            emb = st.embeddings(modality, release=release, source_ids=wanted)
        except SpecsearchError:
            continue
        ids = emb.column("source_id").to_numpy()
        position = np.array([order.get(int(i), -1) for i in ids])
        matrix = column_matrix(emb, "features")
        features[modality] = np.full((n, matrix.shape[1]), np.nan, np.float32)
        features[modality][position] = matrix
        for j, pos in enumerate(position):
            labels[pos][modality] = {
                f"{label}{s}": _value(emb.column(f"pred_{label}{s}")[j].as_py())
                for label in LABELS
                for s in ("", "_err")
            }
    model_id = model or st.embeddings_model()
    if model_id is None:
        raise SpecsearchError(f"{st.root}: no embeddings; run 'specsearch embed' first")
    runner = SpecCLIPRunner(model_id)
    predicted = runner.decode_features(
        lrs_features=features["lrs"],
        xp_features=features["xp"],
        lrs_flux=observed["lrs_flux"],
        lrs_ivar=observed["lrs_ivar"],
        xp_flux=observed["xp_flux"],
    )
    normalise_xp(observed, predicted)  # the XP in units of its norm, as the scores see it
    reference = load_reference(st)
    embedding = {m: _unit_embeddings(st, release, m, wanted, order, n) for m in MODALITIES}
    scores = _score_rows(st, release, wanted)
    graph = _neighbour_rows(st, release, wanted, neighbours)
    neighbour_flux = _neighbour_spectra(st, graph)
    views = []
    for i, source_id in enumerate(wanted):
        spectra, windows = {}, []
        for modality in MODALITIES:
            flux = observed[f"{modality}_flux"][i]
            if not np.isfinite(flux).any():
                continue
            ivar = observed[f"{modality}_ivar"][i]
            with np.errstate(divide="ignore", invalid="ignore"):
                sigma = np.where(ivar > 0, 1.0 / np.sqrt(ivar), np.nan)
            spectrum = Spectrum(
                LRS_WAVELENGTH if modality == "lrs" else XP_WAVELENGTH,
                "A" if modality == "lrs" else "nm",
                flux,
                sigma,
            )
            for key in PREDICTIONS[modality]:
                model_flux = predicted[key][i]
                if not np.isfinite(model_flux).any():
                    continue
                kind = "recon" if key.endswith("recon") else "cross"
                floor = np.zeros(len(flux))
                if reference is not None and COMPARISON[key] in reference.floors:
                    source = SOURCE[COMPARISON[key]]
                    cluster = reference.clusters(source, embedding[source][i : i + 1])[0]
                    floor = reference.floors[COMPARISON[key]][cluster]
                z, good = residual_sigma(flux[None], ivar[None], model_flux[None], floor)
                spectrum.predicted[kind] = model_flux
                spectrum.z[kind] = np.where(good[0], z[0], np.nan)
                stats = residual_stats(
                    flux[None],
                    ivar[None],
                    model_flux[None],
                    floor,
                    WIDTHS[modality],
                    EXPLAIN_WIDTH[modality],
                )
                windows += _windows(modality, kind, stats)
            spectra[modality] = spectrum
        views.append(
            StarView(
                source_id=int(source_id),
                release=release,
                catalog=_catalog(rows, i),
                labels=labels[i],
                score=scores.get(int(source_id)),
                spectra=spectra,
                windows=windows,
                neighbours={
                    m: [
                        (nid, sim, neighbour_flux[m][nid])
                        for nid, sim in graph.get((int(source_id), m), [])
                        if nid in neighbour_flux[m]
                    ]
                    for m in MODALITIES
                },
            )
        )
    return views


def _unit_embeddings(st, release, modality, wanted, order, n) -> np.ndarray:
    """The stars' unit embeddings in one modality (NaN rows where missing)."""
    try:
        rows = st.embeddings(
            modality, release=release, columns=["source_id", "embedding"], source_ids=wanted
        )
    except SpecsearchError:
        return np.full((n, 1), np.nan, np.float32)
    vectors = column_matrix(rows, "embedding")
    out = np.full((n, vectors.shape[1]), np.nan, np.float32)
    position = [order[int(i)] for i in rows.column("source_id").to_numpy()]
    out[position] = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return out


def _value(value):
    return float("nan") if value is None else float(value)


def _catalog(rows, i: int) -> dict[str, Any]:
    skip = {"lrs_flux", "lrs_ivar", "xp_flux", "xp_flux_error"}
    return {name: rows.column(name)[i].as_py() for name in rows.column_names if name not in skip}


def _windows(modality: str, kind: str, stats) -> list[Window]:
    out = []
    scale = 1.0 if modality == "lrs" else 0.1  # A -> the spectrum's own unit
    for j in range(stats.windows.shape[1]):
        centre, sigma = stats.windows[0, j], stats.window_sigma[0, j]
        if centre < 0 or not np.isfinite(sigma):
            continue
        low, high, wave = pixel_wavelength(
            modality, [stats.window_low[0, j], stats.window_high[0, j], centre]
        )
        out.append(
            Window(
                modality,
                kind,
                float(low) * scale,
                float(high) * scale,
                float(wave) * scale,
                float(sigma),
                "+" if stats.window_mean[0, j] > 0 else "-",
                nearest_feature(modality, [wave])[0],
            )
        )
    return out


def _score_rows(st: Store, release: str, ids: np.ndarray) -> dict[int, dict]:
    entry = st.score_entry(release)
    if not entry:
        return {}
    table = st.read_scores(release)
    keep = np.isin(table.column("source_id").to_numpy(), ids)
    return {row["source_id"]: row for row in table.filter(keep).to_pylist()}


def _neighbour_rows(
    st: Store, release: str, ids: np.ndarray, k: int
) -> dict[tuple[int, str], list[tuple[int, float]]]:
    entry = st.score_entry(release)
    if not entry or "neighbors" not in entry["files"] or k < 1:
        return {}
    table = st.read_scores(release, "neighbors")
    keep = np.isin(table.column("source_id").to_numpy(), ids) & (
        table.column("rank").to_numpy() <= k
    )
    out: dict[tuple[int, str], list[tuple[int, float]]] = {}
    for row in table.filter(keep).to_pylist():
        out.setdefault((row["source_id"], row["modality"]), []).append(
            (row["neighbor_id"], row["similarity"])
        )
    return out


def _neighbour_spectra(st: Store, graph: dict) -> dict[str, dict[int, np.ndarray]]:
    """The current spectra of the neighbours, normalised as the stars' own."""
    out: dict[str, dict[int, np.ndarray]] = {m: {} for m in MODALITIES}
    ids = np.unique([nid for pairs in graph.values() for nid, _ in pairs]).astype(np.int64)
    if not ids.size:
        return out
    rows = st.read_shards(columns=["source_id", "lrs_flux", "xp_flux"], source_ids=ids)
    lrs, xp = column_matrix(rows, "lrs_flux"), column_matrix(rows, "xp_flux")
    xp = xp / xp_norm(xp)[:, None]
    for j, nid in enumerate(rows.column("source_id").to_numpy()):
        if np.isfinite(lrs[j]).any():
            out["lrs"][int(nid)] = lrs[j]
        if np.isfinite(xp[j]).any():
            out["xp"][int(nid)] = xp[j]
    return out


def search_plot_data(
    store: str | os.PathLike | Store, result: pa.Table, query_rows: pa.Table | None = None
) -> tuple[dict, list[dict], str]:
    """What ``plots.search_figure`` draws for a search result (its first query): the query's
    spectra (``query_rows`` for a file query, else its current row in the store) and each
    neighbour's, normalised as the store's plots are, with labels and similarities."""
    st = Store.open(store)
    query_id = int(result.column("query_id")[0].as_py())
    rows = result.filter(pc.equal(result.column("query_id"), query_id)).sort_by("rank")
    ids = rows.column("neighbor_id").to_numpy()
    if query_rows is None:
        query_rows = st.read_shards(
            columns=["source_id", "lrs_flux", "xp_flux"], source_ids=np.array([query_id])
        )
    query = _normalised_spectra(query_rows)[0] if query_rows.num_rows else {}
    found = st.read_shards(
        columns=["source_id", "lrs_flux", "xp_flux", "teff", "logg", "fe_h"], source_ids=ids
    )
    spectra = dict(
        zip(found.column("source_id").to_pylist(), _normalised_spectra(found), strict=True)
    )
    labels = {
        row["source_id"]: row
        for row in found.select(["source_id", "teff", "logg", "fe_h"]).to_pylist()
    }
    neighbours = [
        {
            "source_id": int(nid),
            "similarity": float(sim),
            "labels": labels.get(int(nid), {}),
            "spectra": spectra.get(int(nid), {}),
        }
        for nid, sim in zip(ids, rows.column("similarity").to_numpy(), strict=True)
    ]
    modality = rows.column("query_modality")[0].as_py()
    target = rows.column("target_modality")[0].as_py()
    title = (
        f"{len(ids)} nearest {target.upper()} neighbours of {query_id} "
        f"(query: its {modality.upper()} spectrum)"
    )
    return query, neighbours, title


def _normalised_spectra(rows: pa.Table) -> list[dict[str, np.ndarray]]:
    """Per row {modality: flux}: LRS as stored (continuum-normalised), XP over its norm."""
    lrs = column_matrix(rows, "lrs_flux")
    xp = column_matrix(rows, "xp_flux")
    with np.errstate(all="ignore"):
        xp = xp / xp_norm(xp)[:, None]
    out = []
    for i in range(rows.num_rows):
        spectra = {}
        if np.isfinite(lrs[i]).any():
            spectra["lrs"] = lrs[i]
        if np.isfinite(xp[i]).any():
            spectra["xp"] = xp[i]
        out.append(spectra)
    return out
