"""Exact neighbours, recall@k, and tuning an index's search-time knobs to a target recall.

Recall is measured the way the index is used: query vectors sampled from the indexed set are
searched against the whole set, and the approximate top-k ids are compared with the exact
inner-product top-k, by default leave-one-out (the query's own id left out of both lists, as a
search for a star's neighbours does).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import faiss
import numpy as np

Batches = Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]
"""A function returning a fresh iterator of (embeddings float32 (b, d), ids int64 (b,)) batches."""


def exact_knn(
    queries: np.ndarray, embeddings: np.ndarray, k: int, knn: Callable | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k: (similarities (nq, k) float32, row positions (nq, k) int64)."""
    knn = knn or _cpu_knn
    return knn(np.ascontiguousarray(queries, dtype=np.float32), embeddings, min(k, len(embeddings)))


def _cpu_knn(queries: np.ndarray, embeddings: np.ndarray, k: int):
    return faiss.knn(
        queries,
        np.ascontiguousarray(embeddings, dtype=np.float32),
        k,
        metric=faiss.METRIC_INNER_PRODUCT,
    )


def exact_knn_streaming(
    queries: np.ndarray,
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    k: int,
    knn: Callable | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k over a set given in batches: (similarities (nq, k), ids (nq, k)).

    Memory is one batch plus the (nq, k) heap; ids missing for want of vectors are -1.
    """
    knn = knn or _cpu_knn
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for embeddings, ids in batches:
        if len(embeddings) == 0:
            continue
        kb = min(k, len(embeddings))
        sims, rows = knn(queries, embeddings, kb)
        heap.add_result(sims, np.asarray(ids, dtype=np.int64)[rows])
    heap.finalize()
    ids = heap.I.copy()
    ids[~np.isfinite(heap.D) | (heap.D < -1e30)] = -1
    return heap.D.copy(), ids


def sample_queries_streaming(
    batches: Iterable[tuple[np.ndarray, np.ndarray]], n_queries: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A uniform sample of n_queries (vectors, ids) from a set given in batches, in random order.

    Bottom-k sampling: every vector draws a random key and the n_queries smallest keys win.
    One pass, memory for n_queries vectors plus one batch.
    """
    rng = np.random.default_rng(seed)
    kept_vectors, kept_ids, kept_keys = None, np.empty(0, np.int64), np.empty(0)
    for embeddings, ids in batches:
        keys = np.concatenate([kept_keys, rng.random(len(embeddings))])
        vectors = embeddings if kept_vectors is None else np.concatenate([kept_vectors, embeddings])
        all_ids = np.concatenate([kept_ids, np.asarray(ids, dtype=np.int64)])
        if len(keys) > n_queries:
            keep = np.argpartition(keys, n_queries - 1)[:n_queries]
            vectors, all_ids, keys = vectors[keep], all_ids[keep], keys[keep]
        kept_vectors, kept_ids, kept_keys = np.array(vectors, dtype=np.float32), all_ids, keys
    if kept_vectors is None:
        raise ValueError("no vectors to sample queries from")
    order = np.argsort(kept_keys)
    return kept_vectors[order], kept_ids[order]


def recall_per_query(found_ids: np.ndarray, true_ids: np.ndarray) -> np.ndarray:
    """Fraction of each query's true top-k ids that were found: (nq,) from two (nq, k) arrays.

    -1 (no result) never counts as found. A query with fewer than k true neighbours is scored
    over the neighbours it has.
    """
    found = np.where(found_ids < 0, -2, found_ids)  # -2 never equals a valid or missing true id
    hits = (found[:, :, None] == true_ids[:, None, :]).any(axis=1) & (true_ids >= 0)
    return hits.sum(axis=1) / np.maximum((true_ids >= 0).sum(axis=1), 1)


def recall_at_k(found_ids: np.ndarray, true_ids: np.ndarray) -> float:
    """Mean recall@k over queries (see ``recall_per_query``)."""
    return float(np.mean(recall_per_query(found_ids, true_ids)))


def drop_self(
    found_ids: np.ndarray, query_ids: np.ndarray, k: int, similarities: np.ndarray | None = None
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """From (nq, k+1) results, each query's k results other than the query's own id.

    Where the query's id is absent, the last result is dropped instead. With ``similarities``
    (nq, k+1) returns (ids, similarities), both (nq, k).
    """
    is_self = found_ids == np.asarray(query_ids)[:, None]
    order = np.argsort(is_self, axis=1, kind="stable")  # the query's own id moves last
    ids = np.take_along_axis(found_ids, order, axis=1)[:, :k]
    if similarities is None:
        return ids
    return ids, np.take_along_axis(similarities, order, axis=1)[:, :k]


# --- search-time knobs


@dataclass
class Knob:
    """A search-time parameter of an index and the values worth trying, cheapest first."""

    name: str
    values: list[int]
    to_string: Callable[[int], str]


CONFIDENCE_Z = 2.0
"""Tuning asks that mean recall minus this many standard errors reach the target, so the chosen
setting is not one that reaches it on the sampled queries by luck (about 97.5% one-sided)."""


@dataclass
class Tuning:
    """Result of tuning: the chosen search parameters, their recall and the curve measured."""

    search_params: str
    recall: float
    curve: list[dict] = field(default_factory=list)


def ivf_of(index: faiss.Index):
    """The inverted-file part of ``index`` (a CPU IndexIVF, possibly wrapped, or a GPU IVF index).

    None if it has none. A GPU IVF index has the same ``nlist``/``nprobe``/``cp`` members.
    """
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return ivf
    gpu_ivf = getattr(faiss, "GpuIndexIVF", None)
    return index if gpu_ivf is not None and isinstance(index, gpu_ivf) else None


def search_knob(index: faiss.Index) -> Knob | None:
    """The knob that trades speed for recall in ``index`` (nprobe, or efSearch), if it has one."""
    ivf = ivf_of(index)
    if ivf is not None:
        values = _doubling(1, ivf.nlist)
        if isinstance(getattr(ivf, "quantizer", None), faiss.Index) and isinstance(
            faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW
        ):
            # the HNSW quantiser must look at least as wide as the lists it returns
            return Knob(
                "nprobe", values, lambda v: f"nprobe={v},quantizer_efSearch={max(2 * v, 64)}"
            )
        return Knob("nprobe", values, lambda v: f"nprobe={v}")
    inner = index
    while isinstance(inner, (faiss.IndexIDMap, faiss.IndexIDMap2, faiss.IndexPreTransform)):
        inner = faiss.downcast_index(inner.index)
    if isinstance(inner, faiss.IndexHNSW):
        return Knob("efSearch", _doubling(16, 4096), lambda v: f"efSearch={v}")
    return None


def _doubling(start: int, stop: int) -> list[int]:
    values = []
    v = start
    while v < stop:
        values.append(v)
        v *= 2
    return [*values, stop]


def set_search_params(index: faiss.Index, search_params: str) -> None:
    """Apply a FAISS ParameterSpace string such as 'nprobe=16,quantizer_efSearch=64'."""
    if search_params:
        faiss.ParameterSpace().set_index_parameters(index, search_params)


def tune_search_params(
    index: faiss.Index,
    queries: np.ndarray,
    true_ids: np.ndarray,
    target_recall: float,
    k: int,
    set_params: Callable[[faiss.Index, str], None] = set_search_params,
    query_ids: np.ndarray | None = None,
) -> Tuning:
    """Raise the index's knob until recall@k of ``queries`` reaches ``target_recall``.

    A value "reaches" the target when the mean recall less CONFIDENCE_Z standard errors (over
    the queries) does. Doubles the knob, then bisects between the last value that missed and the
    first that hit, so the chosen value is within ~12% of the smallest that reaches the target.
    An index without a knob is measured once. If no value reaches the target, the best is kept.

    With ``query_ids`` (the ids of the queries, which are in the index) recall is leave-one-out:
    each query's own id is removed from its results, and ``true_ids`` must exclude it too.
    """
    knob = search_knob(index)
    curve: list[dict] = []
    lower_bounds: dict[str, float] = {}

    def measure(params: str) -> float:
        set_params(index, params)
        start = time.perf_counter()
        _, found = index.search(queries, k if query_ids is None else k + 1)
        seconds = time.perf_counter() - start
        if query_ids is not None:
            found = drop_self(found, query_ids, k)
        per_query = recall_per_query(found, true_ids)
        recall = float(per_query.mean())
        error = (
            float(per_query.std(ddof=1) / np.sqrt(len(per_query))) if len(per_query) > 1 else 0.0
        )
        lower_bounds[params] = recall - CONFIDENCE_Z * error
        curve.append(
            {
                "search_params": params,
                "recall": round(recall, 5),
                "recall_se": round(error, 5),
                "ms_per_query": round(1e3 * seconds / max(len(queries), 1), 4),
            }
        )
        return recall

    def reaches(params: str) -> bool:
        return lower_bounds[params] >= target_recall - 1e-12

    if knob is None:
        return Tuning("", measure(""), curve)

    results: dict[int, float] = {}
    hit = None
    for value in knob.values:
        results[value] = measure(knob.to_string(value))
        if reaches(knob.to_string(value)):
            hit = value
            break
    if hit is None:
        best = max(results, key=lambda v: (results[v], -v))
        set_params(index, knob.to_string(best))
        return Tuning(knob.to_string(best), results[best], curve)

    low = max((v for v in results if v < hit), default=None)
    while low is not None and hit - low > max(1, hit // 8):
        middle = (low + hit) // 2
        results[middle] = measure(knob.to_string(middle))
        if reaches(knob.to_string(middle)):
            hit = middle
        else:
            low = middle
    set_params(index, knob.to_string(hit))
    return Tuning(knob.to_string(hit), results[hit], curve)
