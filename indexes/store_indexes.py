"""Indexes over a store's embeddings: read the Parquet, build or grow, save, search.

The store (``specsearch.store``) says which embedding files exist and which of their rows are
current; each file has columns ``source_id`` int64, ``modality``, ``model_id`` and ``embedding``
(fixed_size_list<float16>[d], unit vectors). A star embedded in several releases is indexed
once, with its current vector (from the latest release that embedded it): a rebuilt index and
one grown release by release (``extend_store_indexes`` replaces the vectors a newer release
supersedes) hold the same vectors.

Reading streams record batches; a set whose float32 vectors and index exceed the memory budget
is built in shards with on-disk inverted lists (``build.build_index_streaming``).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from specsearch.errors import EnvironmentFault, InputError, SpecsearchError
from specsearch.progress import progress
from specsearch.schema import MODALITIES, check_modality
from specsearch.store import Store

from .build import build_index, build_index_streaming
from .choose import (
    DEFAULT_TARGET_RECALL,
    EXACT_THRESHOLD,
    choose_factory,
    default_memory_budget,
    index_bytes,
)
from .io import extend_index, load_index, read_params, rebuild_reason, save_index
from .measure import FEW_QUERIES, search_few

READ_BATCH = 65_536


@dataclass
class EmbeddingSet:
    """The de-duplicated embeddings of one modality in a store, located but not yet read."""

    modality: str
    files: list[Path]
    file_releases: list[str]
    keep: list[np.ndarray]
    """Per file, which rows are indexed (False: a later release holds the star's current row)."""
    d: int
    model_id: str

    @property
    def n(self) -> int:
        return int(sum(int(mask.sum()) for mask in self.keep))

    @property
    def releases(self) -> list[str]:
        return sorted(set(self.file_releases))


def scan_embeddings(store: Store, modality: str) -> EmbeddingSet:
    """Locate a modality's embedding files and their current rows (``Store.current_embedding_files``).

    Reads only the ``source_id`` and ``model_id`` columns. Raises InputError for a file without the
    contract columns or with mixed models, SpecsearchError if there are no embeddings.
    """
    located = store.current_embedding_files(modality)
    dims, models = set(), set()
    for found in located:
        d, file_models = _scan_file(found.path)
        dims.add(d)
        models |= file_models
    if len(dims) != 1:
        raise InputError(f"{modality} embeddings have several dimensions {sorted(dims)}")
    if len(models) != 1:
        raise InputError(
            f"{modality} embeddings come from several models {sorted(models)}: re-embed with one"
        )
    return EmbeddingSet(
        modality,
        [f.path for f in located],
        [f.release for f in located],
        [f.current for f in located],
        dims.pop(),
        models.pop(),
    )


def _scan_file(path: Path) -> tuple[int, set[str]]:
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise InputError(f"{path}: unreadable Parquet ({err})") from None
    schema = parquet.schema_arrow
    missing = {"source_id", "embedding", "model_id"} - set(schema.names)
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
    kind = schema.field("embedding").type
    if not (pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind)) or not (
        pa.types.is_floating(kind.value_type)
    ):
        raise InputError(f"{path}: column embedding must be a list of floats, not {kind}")
    table = parquet.read(columns=["source_id", "model_id"])
    if table.column("source_id").null_count:
        raise InputError(f"{path}: null source_id")
    models = {m for m in pc.unique(table.column("model_id")).to_pylist() if m is not None}
    if pa.types.is_fixed_size_list(kind):
        d = kind.list_size
    else:
        first = parquet.read_row_group(0, columns=["embedding"]).column("embedding")
        d = len(first[0]) if len(first) else 0
    return d, models


def iter_embeddings(
    embedding_set: EmbeddingSet,
    batch_size: int = READ_BATCH,
    releases: list[str] | None = None,
    show_progress: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream the indexed rows as (float32 (b, d) unit vectors, int64 source_ids) batches."""
    chosen = [
        (path, keep)
        for path, release, keep in zip(
            embedding_set.files, embedding_set.file_releases, embedding_set.keep, strict=True
        )
        if releases is None or release in releases
    ]
    total = sum(int(keep.sum()) for _, keep in chosen)
    with progress(f"reading {embedding_set.modality} embeddings", total, show_progress) as advance:
        for path, keep in chosen:
            start = 0
            for batch in pq.ParquetFile(path, pre_buffer=False).iter_batches(
                batch_size, columns=["source_id", "embedding"]
            ):
                rows = keep[start : start + batch.num_rows]
                start += batch.num_rows
                if not rows.any():
                    continue
                ids = batch.column("source_id").to_numpy().astype(np.int64)[rows]
                vectors = _embedding_matrix(batch.column("embedding"), embedding_set.d, path)[rows]
                _check_rows(vectors, ids, path)
                advance(len(ids))
                yield vectors, ids


def _embedding_matrix(column: pa.Array, d: int, path: Path) -> np.ndarray:
    if column.null_count:
        raise InputError(f"{path}: {column.null_count} null embedding(s)")
    if pa.types.is_list(column.type):
        lengths = pc.list_value_length(column).to_numpy()
        if (lengths != d).any():
            raise InputError(
                f"{path}: embedding of length {lengths[lengths != d][0]}, expected {d}"
            )
    values = column.flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(values.reshape(-1, d), dtype=np.float32)


def _check_rows(vectors: np.ndarray, ids: np.ndarray, path: Path) -> None:
    norms = np.linalg.norm(vectors, axis=1)
    bad = ~np.isfinite(norms) | (norms == 0)
    if bad.any():
        raise InputError(
            f"{path}: source_id {ids[np.argmax(bad)]}: embedding is NaN, infinite or zero"
        )
    vectors /= norms[:, None]  # float16 storage leaves norms ~1e-3 off 1


def read_vectors(
    embedding_set: EmbeddingSet, releases: list[str] | None = None, show_progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """All indexed rows in memory: (float32 (n, d), int64 (n,))."""
    parts = list(iter_embeddings(embedding_set, releases=releases, show_progress=show_progress))
    if not parts:
        return np.empty((0, embedding_set.d), np.float32), np.empty(0, np.int64)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


# --- the store-level entry points


def _modalities(store: Store, modality: str) -> list[str]:
    if modality not in (*MODALITIES, "all"):
        raise SpecsearchError(f"modality {modality!r} must be lrs, xp or all")
    present = store.embedding_modalities()
    if modality != "all":
        return [modality]
    if not present:
        raise SpecsearchError(
            f"{store.root / 'embeddings'}: no embeddings (run 'specsearch embed')"
        )
    return present


@dataclass
class IndexResult:
    """What an index build or extension did, per modality (the saved parameters)."""

    modalities: dict[str, dict] = field(default_factory=dict)
    release: str | None = None
    seconds: float = 0.0

    def __str__(self) -> str:
        if not self.modalities:
            return f"no embeddings of release {self.release} to index"
        return "indexed " + "; ".join(_summary(m, p) for m, p in self.modalities.items())


def build_store_indexes(
    store: Store | str | os.PathLike,
    modality: str = "all",
    factory: str = "auto",
    target_recall: float = DEFAULT_TARGET_RECALL,
    *,
    memory_budget_bytes: int | None = None,
    exact_threshold: int = EXACT_THRESHOLD,
    exclude_self: bool = True,
    speed_for: str = "single",
    seed: int = 0,
    device: str = "auto",
    sharded: bool = False,
    workers: int = 1,
    show_progress: bool = True,
) -> IndexResult:
    """Build and save the store's index of each modality (``Store.index_dir``).

    The vectors are read in memory when they and the index fit ``memory_budget_bytes`` (default:
    half of RAM); otherwise, or with ``sharded``, the index is an inverted file trained on a
    sample, filled shard by shard (``workers`` processes at once) and merged into on-disk lists. The other arguments
    are those of ``build.build_index``: ``speed_for`` "single" (default) picks the fastest index
    for a user's search, one star at a time; "batch" the fastest for a kNN graph of the store.
    """
    start = time.perf_counter()
    store = Store.open(store)
    store.require_embeddings("building indexes")
    budget = memory_budget_bytes or default_memory_budget()
    result = IndexResult()
    for name in _modalities(store, modality):
        embedding_set = scan_embeddings(store, name)
        result.modalities[name] = _build_one(
            store,
            embedding_set,
            factory,
            target_recall,
            budget,
            exact_threshold,
            seed,
            device,
            show_progress,
            exclude_self,
            speed_for,
            sharded,
            workers,
        )
    result.seconds = time.perf_counter() - start
    return result


def _build_one(
    store,
    embedding_set,
    factory,
    target_recall,
    budget,
    exact_threshold,
    seed,
    device,
    show_progress,
    exclude_self=True,
    speed_for="single",
    sharded=False,
    workers=1,
) -> dict:
    n, d = embedding_set.n, embedding_set.d
    in_memory_bytes = n * d * 4 + (
        index_bytes(choose_factory(n, d, budget, exact_threshold), n, d) if factory == "auto" else 0
    )
    if workers < 1:
        raise SpecsearchError(f"--workers must be at least 1, not {workers}")
    if sharded or (factory == "auto" and in_memory_bytes > budget):
        version = uuid.uuid4().hex
        ivfdata = f"{embedding_set.modality}.{version}.ivfdata"
        index, params = build_index_streaming(
            lambda: iter_embeddings(embedding_set),
            n,
            d,
            store.index_dir(),
            ivfdata,
            factory,
            target_recall,
            budget,
            seed=seed,
            exclude_self=exclude_self,
            workers=workers,
            device=device,
            show_progress=show_progress,
        )
        params["version"] = version
    else:
        embeddings, ids = read_vectors(embedding_set, show_progress=show_progress)
        index, params = build_index(
            embeddings,
            ids,
            factory,
            target_recall,
            budget,
            seed=seed,
            exact_threshold=exact_threshold,
            exclude_self=exclude_self,
            speed_for=speed_for,
            device=device,
            show_progress=show_progress,
        )
        del embeddings
    params.update(model_id=embedding_set.model_id, releases=embedding_set.releases)
    saved = save_index(index, params, store.index_dir(), embedding_set.modality)
    store.record_index(saved)
    return saved


def extend_store_indexes(
    store: Store | str | os.PathLike,
    release: str,
    modality: str = "all",
    target_recall: float | None = None,
    *,
    device: str = "cpu",
    show_progress: bool = True,
) -> IndexResult:
    """Add one release's current embeddings to the store's indexes.

    Stars already indexed from this release are skipped, so running it twice for a release
    changes nothing; the vectors of stars the release supersedes (indexed from an earlier
    release) are replaced. A modality without an index yet is built from scratch; one whose
    index must be rebuilt (see ``io.rebuild_reason``) is rebuilt from all the store's
    embeddings.
    """
    start = time.perf_counter()
    store = Store.open(store)
    result = IndexResult(release=release)
    for name in _modalities(store, modality):
        embedding_set = scan_embeddings(store, name)
        if release not in embedding_set.releases:
            continue
        index_path = store.index_dir() / f"{name}.faiss"
        if not index_path.exists():
            result.modalities[name] = _build_one(
                store,
                embedding_set,
                "auto",
                target_recall or DEFAULT_TARGET_RECALL,
                default_memory_budget(),
                EXACT_THRESHOLD,
                0,
                device,
                show_progress,
            )
            continue
        old = read_params(store.index_dir(), name)
        if old.get("model_id") != embedding_set.model_id:
            raise SpecsearchError(
                f"{name} index was built on model {old.get('model_id')}, release {release} embeddings "
                f"on {embedding_set.model_id}: run 'specsearch index build'"
            )
        # a release not indexed before supersedes the vectors its stars had from earlier ones
        replace = release not in old.get("releases", [])
        new_vectors, new_ids = read_vectors(
            embedding_set, releases=[release], show_progress=show_progress
        )
        if old.get("ondisk") and rebuild_reason(old, embedding_set.n):
            result.modalities[name] = _build_one(
                store,
                embedding_set,
                "auto",
                target_recall or old["target_recall"],
                old["memory_budget_bytes"],
                0,
                0,
                device,
                show_progress,
            )
            continue
        params = extend_index(
            store.index_dir(),
            name,
            new_vectors,
            new_ids,
            database=lambda s=embedding_set: iter_embeddings(s),
            releases=[release],
            target_recall=target_recall,
            replace_existing=replace,
            device=device,
        )
        if params["added"] or params.get("replaced"):
            store.record_index(params)
        result.modalities[name] = params
    result.seconds = time.perf_counter() - start
    return result


def _summary(modality: str, params: dict) -> str:
    if params.get("added") == 0 and not params.get("replaced"):
        return f"{modality}: nothing new ({params['n']:,} vectors already indexed)"
    how = f" ({params['search_params']})" if params.get("search_params") else ""
    grown = f", +{params['added']:,}" if params.get("added") else ""
    replaced = f" ({params['replaced']:,} replaced)" if params.get("replaced") else ""
    return (
        f"{modality}: {params['n']:,} vectors{grown}{replaced}, {params['factory']}, "
        f"recall@{params['k']} {params['recall']:.3f}{how}"
    )


# --- search

_LOADED: dict[Path, tuple[str, faiss.Index, dict]] = {}


def load_store_index(store: Store | str | os.PathLike, modality: str) -> tuple[faiss.Index, dict]:
    """The saved index of a modality and its params, cached until a new version is saved."""
    store = Store.open(store)
    entry = store.check_index(modality)  # its files as recorded, covering the current embeddings
    index_dir = store.index_dir()
    key = (index_dir / f"{modality}.faiss").resolve()
    version = read_params(index_dir, modality).get("version")
    cached = _LOADED.get(key)
    if cached is None or cached[0] != version:
        # memory-mapped: a one-off CLI query touches a few lists, not the whole file (7 ms vs
        # 0.2 s at 1M). Indexes with on-disk lists (.ivfdata) are mapped by load_index already.
        on_disk = bool(read_params(index_dir, modality).get("ivfdata"))
        index, params = load_index(index_dir, modality, mmap=None if on_disk else True)
        if (index.ntotal, index.d) != (entry.get("n", index.ntotal), entry.get("d", index.d)):
            raise EnvironmentFault(
                f"{key}: holds {index.ntotal} vectors of {index.d} dimensions, the manifest "
                f"recorded {entry.get('n')} of {entry.get('d')}; run 'specsearch index build "
                f"--store {store.root}'"
            )
        _LOADED[key] = (params["version"], index, params)
        cached = _LOADED[key]
    return cached[1], cached[2]


def search_store(
    store: Store | str | os.PathLike, query_vectors: np.ndarray, modality: str, k: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest stars of ``modality`` to each query vector, by cosine similarity.

    ``query_vectors`` is (nq, d) or (d,), any scale (normalised here); for a cross-modal search
    pass the other modality's (aligned) vectors. Returns (similarities (nq, k) float32,
    source_ids (nq, k) int64), best first; where fewer than k stars exist the id is -1 and the
    similarity NaN.
    """
    check_modality(modality)
    if k < 1:
        raise SpecsearchError(f"k must be at least 1, got {k}")
    index, params = load_store_index(store, modality)
    queries = np.array(query_vectors, dtype=np.float32, ndmin=2)
    if queries.ndim != 2 or queries.shape[1] != params["d"]:
        raise SpecsearchError(
            f"query vectors of shape {queries.shape} do not match the {modality} index (d={params['d']})"
        )
    norms = np.linalg.norm(queries, axis=1, keepdims=True)
    if not np.all(np.isfinite(norms)) or (norms == 0).any():
        raise SpecsearchError("a query vector is zero, NaN or infinite")
    unit = np.ascontiguousarray(queries / norms)
    if len(queries) < FEW_QUERIES:
        similarities, ids = search_few(index, unit, k)
    else:
        similarities, ids = index.search(unit, k)
    similarities[ids < 0] = np.nan
    if np.nanmax(np.abs(similarities), initial=0.0) > 1.01:  # unit vectors: |cos| <= 1
        raise EnvironmentFault(
            f"{Store.open(store).index_dir() / (modality + '.faiss')}: damaged (a similarity of "
            f"{np.nanmax(np.abs(similarities)):.3g}); run 'specsearch index build --store "
            f"{Store.open(store).root}'"
        )
    return similarities, ids
