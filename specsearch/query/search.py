"""Similarity search: the k nearest stars to a query, in the same modality or across modalities.

A query is a star already in the store (its embedding is read back from the embedding Parquet),
a spectrum file (read by the same readers as ``ingest`` and encoded by the model), or a file of
source_ids (batch mode). The query's modality and the results' modality (``target``) may differ:
the two encoders share one aligned space, so an LRS query finds XP neighbours and the reverse.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import SpecsearchError
from ..schema import LABELS, check_modality, column_matrix
from ..store import Store

NEIGHBOUR_COLUMNS = ["obsid", "release", *LABELS]


def embeddings_for_ids(
    st: Store, modality: str, source_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Current embeddings of ``source_ids`` in ``modality``: (found ids (m,) sorted, vectors
    (m, d)); a star embedded in several releases gives its latest release's vector."""
    table = st.embeddings(modality, columns=["source_id", "embedding"], source_ids=source_ids)
    if table.num_rows == 0:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
    table = table.sort_by("source_id")
    return table.column("source_id").to_numpy(), column_matrix(table, "embedding")


def encode_spectrum_file(
    path: Path, modality: str, model: str = "default"
) -> tuple[np.ndarray, np.ndarray]:
    """Read a spectrum file with the ingest readers and encode it: (source_ids (n,), vectors (n, d))."""
    from ..models.runner import SpecCLIPRunner
    from ..surveys.sources import read_source

    table = read_source(path)[0]
    present = ~table.column(f"{modality}_flux").is_null().to_numpy(zero_copy_only=False)
    if not present.any():
        raise SpecsearchError(
            f"{path}: holds no {modality} spectrum (try --modality {'xp' if modality == 'lrs' else 'lrs'})"
        )
    table = table.filter(pa.array(present))
    runner = SpecCLIPRunner(model)
    if modality == "lrs":
        vectors = runner.encode_lrs(
            column_matrix(table, "lrs_flux"), column_matrix(table, "lrs_ivar")
        )
    else:
        vectors = runner.encode_xp(
            column_matrix(table, "xp_flux"), column_matrix(table, "xp_flux_error")
        )
    return table.column("source_id").to_numpy(), np.asarray(vectors, dtype=np.float32)


def search_vectors(
    st: Store, vectors: np.ndarray, target: str, k: int, exclude_ids: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """k nearest stored stars of ``target`` modality for each query vector: (similarity, ids), (q, k).

    ``exclude_ids`` (q,): a star is not its own neighbour (queries from the store).
    """
    from ..indexes import drop_self, search_store

    if exclude_ids is None:
        return search_store(st, vectors, target, k)
    sims, ids = search_store(st, vectors, target, k + 1)
    ids, sims = drop_self(ids, exclude_ids, k, similarities=sims)
    return sims, ids


def neighbour_catalog(st: Store, ids: np.ndarray) -> pa.Table:
    """Catalog columns (obsid, release, reference labels) of the given stars: their current
    shard rows."""
    wanted = np.unique(ids[ids >= 0])
    return st.read_shards(columns=["source_id", *NEIGHBOUR_COLUMNS], source_ids=wanted)


def search(
    store: str | os.PathLike,
    source_ids: np.ndarray | None = None,
    spectrum: Path | None = None,
    modality: str = "xp",
    target: str | None = None,
    k: int = 10,
    model: str = "default",
) -> pa.Table:
    """Nearest neighbours as a table: query_id, rank, neighbor_id, similarity + catalog columns."""
    check_modality(modality)
    target = check_modality(target or modality, "target")
    if k < 1:
        raise SpecsearchError(f"-k must be at least 1, not {k}")
    st = Store.open(store)
    if (source_ids is None) == (spectrum is None):
        raise SpecsearchError("give exactly one of --source-id, --ids or --spectrum")
    if spectrum is not None:
        query_ids, vectors = encode_spectrum_file(Path(spectrum), modality, model)
        exclude = None
    else:
        wanted = np.asarray(source_ids, dtype=np.int64)
        query_ids, vectors = embeddings_for_ids(st, modality, wanted)
        missing = np.setdiff1d(wanted, query_ids)
        if missing.size:
            raise SpecsearchError(
                f"source_id {int(missing[0])} has no {modality} embedding in {st.root}"
            )
        order = np.searchsorted(query_ids, wanted)  # query_ids is sorted (np.unique)
        query_ids, vectors = query_ids[order], vectors[order]
        exclude = query_ids if target == modality else None
    sims, ids = search_vectors(st, vectors, target, k, exclude)
    q = len(query_ids)
    result = pa.table(
        {
            "query_id": np.repeat(query_ids, k),
            "query_modality": [modality] * (q * k),
            "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), q),
            "neighbor_id": ids.ravel(),
            "target_modality": [target] * (q * k),
            "similarity": sims.ravel().astype(np.float32),
        }
    )
    result = result.filter(pa.array(ids.ravel() >= 0))
    joined = with_catalog(result, neighbour_catalog(st, ids.ravel()))
    return joined.sort_by([("query_id", "ascending"), ("rank", "ascending")])


def with_catalog(result: pa.Table, catalog: pa.Table) -> pa.Table:
    """``result`` with each neighbour's catalog columns (NEIGHBOUR_COLUMNS) appended, null where
    the catalog lacks the star: a left join on neighbor_id = source_id, done with a sorted
    lookup (Arrow's join would load its query engine, ~0.3 s of a one-off search)."""
    catalog = catalog.sort_by("source_id")
    catalog_ids = catalog.column("source_id").to_numpy()
    wanted = result.column("neighbor_id").to_numpy()
    at = np.minimum(np.searchsorted(catalog_ids, wanted), max(len(catalog_ids) - 1, 0))
    found = catalog_ids[at] == wanted if len(catalog_ids) else np.zeros(len(wanted), bool)
    rows = catalog.take(pa.array(at, mask=~found))  # a null index gives a null row
    for name in NEIGHBOUR_COLUMNS:
        result = result.append_column(catalog.schema.field(name), rows.column(name))
    return result


def read_id_file(path: Path) -> np.ndarray:
    """source_ids from a text file (one per line, '#' comments) or a Parquet/CSV with source_id."""
    path = Path(path)
    if not path.exists():
        raise SpecsearchError(f"{path}: no such file")
    try:
        if path.suffix == ".parquet":
            return pq.ParquetFile(path).read(columns=["source_id"]).column("source_id").to_numpy()
        lines = [ln.split(",")[0].strip() for ln in path.read_text().splitlines()]
        lines = [ln for ln in lines if ln and not ln.startswith("#") and ln != "source_id"]
        return np.array([int(ln) for ln in lines], dtype=np.int64)
    except (ValueError, KeyError, pa.ArrowInvalid) as err:
        raise SpecsearchError(
            f"{path}: not a list of source_ids ({str(err).splitlines()[0]})"
        ) from None
