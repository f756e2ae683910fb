"""Exact neighbours, recall@k, speed, and tuning an index's search-time knobs to a target recall.

Recall is measured the way the index is used, on two kinds of query (``QuerySet``): stars of the
index searched for their neighbours, their own id left out of both the exact and the approximate
lists (search by star, the kNN graph), and vectors not in the index (a spectrum file, the other
modality, the next release's stars). A graph index finds the neighbours of its own nodes more
easily than those of a new vector, so the two can differ by a percent; tuning asks both to reach
the target.
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


# --- kinds of query


@dataclass
class QuerySet:
    """One kind of query that recall is measured on, with its exact neighbours.

    kind: "self excluded" for stars of the index searched for their neighbours other than
    themselves (search by star, the kNN graph), "held out" for vectors not in the index (a
    spectrum file, the other modality's vector, a new release's star before it is added),
    "self included" for stars of the index whose own id counts as found.
    queries: (nq, d) float32; true_ids: (nq, k) int64, the exact top-k ids (self excluded where
    ``query_ids`` is given); query_ids: (nq,) the queries' own ids when they are in the index.
    """

    kind: str
    queries: np.ndarray
    true_ids: np.ndarray
    query_ids: np.ndarray | None = None

    def recall(self, index: faiss.Index, k: int) -> tuple[np.ndarray, float]:
        """(recall@k of each query (nq,), seconds the batch search took)."""
        start = time.perf_counter()
        _, found = index.search(self.queries, k if self.query_ids is None else k + 1)
        seconds = time.perf_counter() - start
        if self.query_ids is not None:
            found = drop_self(found, self.query_ids, k)
        return recall_per_query(found, self.true_ids), seconds


def query_sets(
    embeddings: np.ndarray,
    ids: np.ndarray,
    self_rows: np.ndarray,
    held_out: np.ndarray | None,
    k: int,
    knn: Callable | None = None,
    exclude_self: bool = True,
) -> list[QuerySet]:
    """The kinds of query for an index over ``embeddings`` (n, d) with ``ids`` (n,).

    self_rows: rows of ``embeddings`` searched as stars of the index, their own id excluded
    (or, with ``exclude_self`` False, counted); held_out: (m, d) vectors not in ``embeddings``
    (None or empty: none). Exact neighbours by inner product (``knn``: see ``exact_knn``).
    """
    sets = []
    if len(self_rows) and len(embeddings) > 1:
        queries = np.ascontiguousarray(embeddings[self_rows])
        if exclude_self:
            kk = min(k, len(embeddings) - 1)
            _, rows = exact_knn(queries, embeddings, kk + 1, knn)
            query_ids = ids[self_rows]
            true_ids = drop_self(ids[rows], query_ids, kk)
            sets.append(QuerySet("self excluded", queries, true_ids, query_ids))
        else:
            _, rows = exact_knn(queries, embeddings, min(k, len(embeddings)), knn)
            sets.append(QuerySet("self included", queries, ids[rows]))
    if held_out is not None and len(held_out):
        queries = np.ascontiguousarray(held_out, dtype=np.float32)
        _, rows = exact_knn(queries, embeddings, min(k, len(embeddings)), knn)
        sets.append(QuerySet("held out", queries, ids[rows]))
    return sets


def query_sets_streaming(
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    self_queries: np.ndarray,
    self_ids: np.ndarray,
    held_out: np.ndarray | None,
    k: int,
    knn: Callable | None = None,
    exclude_self: bool = True,
) -> list[QuerySet]:
    """``query_sets`` for an index over a set given in ``batches``, in one pass over it.

    self_queries (q, d) with ``self_ids`` (q,): vectors of the set; held_out (m, d): vectors
    not in it.
    """
    held_out = np.empty((0, self_queries.shape[1]), np.float32) if held_out is None else held_out
    queries = np.concatenate([self_queries, held_out]).astype(np.float32)
    _, true_ids = exact_knn_streaming(queries, batches, k + 1 if exclude_self else k, knn)
    own, new = true_ids[: len(self_queries)], true_ids[len(self_queries) :, :k]
    sets = []
    if len(self_queries) and exclude_self:
        self_ids = np.asarray(self_ids, dtype=np.int64)
        sets.append(QuerySet("self excluded", self_queries, drop_self(own, self_ids, k), self_ids))
    elif len(self_queries):
        sets.append(QuerySet("self included", self_queries, own))
    if len(held_out):
        sets.append(QuerySet("held out", np.ascontiguousarray(held_out), new))
    return sets


# --- speed


SINGLE_QUERIES = 200
"""One-query searches timed for the single-query latency (its median)."""

FEW_QUERIES = 16
"""Fewer queries than this are searched on one thread (``search_few``)."""


def search_few(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``index.search`` of a few queries (a user's search), on one thread and with the least
    Python around FAISS: (similarities (nq, k) float32, labels (nq, k) int64).

    One thread: FAISS opens its thread pool even for one query (the IDMap wrapper translates
    its ids in parallel), and waking the pool costs more than the search, a scheduler slice
    (milliseconds) on a busy machine. The thread count is set back after. Least Python: a query
    of a 200k-vector graph takes about 20 us, and FAISS's Python wrapper with a context manager
    around the thread count added about 6 us to it, so the call goes to FAISS's ``search_c``.
    """
    x = np.ascontiguousarray(queries, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != index.d:
        raise ValueError(f"queries of shape {x.shape} for an index of d={index.d}")
    n = len(x)
    similarities = np.empty((n, k), dtype=np.float32)
    labels = np.empty((n, k), dtype=np.int64)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        index.search_c(
            n, faiss.swig_ptr(x), k, faiss.swig_ptr(similarities), faiss.swig_ptr(labels)
        )
    finally:
        faiss.omp_set_num_threads(threads)
    return similarities, labels


def time_search(
    index: faiss.Index, queries: np.ndarray, k: int, repeats: int = 3, single: int = SINGLE_QUERIES
) -> dict:
    """Speed of ``index`` as set now: {"batch_qps", "single_ms"}.

    batch_qps: all ``queries`` (nq, d) in one call, the median of ``repeats`` calls; single_ms:
    the median over the first ``single`` queries searched one at a time (a user's search).
    """
    index.search(queries[:1], k)  # warm up: thread pool, caches
    batch = []
    for _ in range(repeats):
        start = time.perf_counter()
        index.search(queries, k)
        batch.append(time.perf_counter() - start)
    return {
        "batch_qps": round(len(queries) / max(float(np.median(batch)), 1e-9), 1),
        "single_ms": round(single_query_ms(index, queries[:single], k), 4),
    }


SLICES = 10
"""An interleaved timing round is cut in this many slices; every searcher has a turn in each."""

SLOW_SINGLES = (5, 0.05)
"""A slice times a slow searcher's one-query searches only until this many took this many s."""


def time_interleaved(
    searchers: dict[str, tuple[Callable, Callable]],
    queries: np.ndarray,
    k: int,
    rounds: int = 5,
    singles: int = 1000,
    seed: int = 0,
) -> dict[str, dict]:
    """Batch and one-query speed of several searchers measured side by side: {name: speed}.

    ``searchers`` maps a name to (batch, one): ``batch(queries, k)`` searches many queries in one
    call, ``one(query, k)`` a (1, d) query as a user's search does. A shared machine's speed
    changes from one tenth of a second to the next (here one index's one-query time jumps
    between two levels 1.7x apart), so every round is cut in ``SLICES`` slices and every searcher,
    in a new order each slice, searches its part of ``queries`` in one batch call and its part of
    the first ``singles`` one at a time. A round's batch QPS is its queries over the sum of its
    slices' times, its single-query ms the median of its one-query times; the speed is the median
    over rounds: {"batch_qps", "single_ms", "batch_qps_rounds", "single_ms_rounds"}.
    """
    rng = np.random.default_rng(seed)
    names = list(searchers)
    batches = np.array_split(queries, SLICES)
    ones = np.array_split(queries[:singles], SLICES)
    for batch, one in searchers.values():  # warm up: thread pools, caches
        batch(queries[:100], k)
        one(queries[:1], k)
    qps: dict[str, list[float]] = {name: [] for name in names}
    single: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        batch_s = dict.fromkeys(names, 0.0)
        times: dict[str, list[float]] = {name: [] for name in names}
        for part in range(SLICES):
            for i in rng.permutation(len(names)):
                name = names[i]
                batch, one = searchers[name]
                start = time.perf_counter()
                batch(batches[part], k)
                batch_s[name] += time.perf_counter() - start
                slice_s = 0.0
                for row in range(len(ones[part])):
                    if row >= SLOW_SINGLES[0] and slice_s > SLOW_SINGLES[1]:
                        break
                    start = time.perf_counter()
                    one(ones[part][row : row + 1], k)
                    took = time.perf_counter() - start
                    times[name].append(took)
                    slice_s += took
        for name in names:
            qps[name].append(len(queries) / max(batch_s[name], 1e-9))
            single[name].append(1e3 * float(np.median(times[name])) if times[name] else 0.0)
    return {
        name: {
            "batch_qps": round(float(np.median(qps[name])), 1),
            "single_ms": round(float(np.median(single[name])), 4),
            "batch_qps_rounds": [round(v, 1) for v in qps[name]],
            "single_ms_rounds": [round(v, 4) for v in single[name]],
        }
        for name in names
    }


def time_side_by_side(
    indexes: dict[str, faiss.Index], queries: np.ndarray, k: int, rounds: int = 5
) -> dict[str, dict]:
    """Speed of several FAISS indexes as set now, measured side by side (``time_interleaved``):
    {name: {"batch_qps", "single_ms"}}, the batch on FAISS's threads, one query as
    ``search_store`` does."""

    def searcher(index: faiss.Index) -> tuple[Callable, Callable]:
        return (lambda q, k: index.search(q, k), lambda q, k: search_few(index, q, k))

    speeds = time_interleaved({n: searcher(i) for n, i in indexes.items()}, queries, k, rounds)
    return {
        name: {"batch_qps": speed["batch_qps"], "single_ms": speed["single_ms"]}
        for name, speed in speeds.items()
    }


def single_query_ms(index: faiss.Index, queries: np.ndarray, k: int) -> float:
    """Median milliseconds of searching each of ``queries`` alone, as ``search_store`` does
    (``search_few``)."""
    times = np.empty(len(queries))
    for row in range(len(queries)):
        query = queries[row : row + 1]
        start = time.perf_counter()
        search_few(index, query, k)
        times[row] = time.perf_counter() - start
    return 1e3 * float(np.median(times)) if len(times) else 0.0


# --- search-time knobs


@dataclass
class Knob:
    """A search-time parameter of an index and the values worth trying, cheapest first."""

    name: str
    values: list[int]
    to_string: Callable[[int], str]


CONFIDENCE_Z = 1.0
"""Tuning asks that mean recall minus this many standard errors reach the target on each kind of
query: a margin of one standard error (0.0025 to 0.004 on 1,000 queries near recall 0.95, half
that on 4,000; see ``tuning_queries``), so the setting chosen reaches the target on other queries
too, most of the time."""


def tuning_queries(n: int) -> int:
    """Queries of each kind that recall is tuned on, for a set of n vectors: one per 250 vectors,
    at least 1,000 and at most 4,000.

    The margin of one standard error is paid on every search the index then serves (on the XP
    embeddings of 1M stars it was two steps of efSearch, ~15% of the speed). A large set serves
    the most searches and its build dwarfs exact search over a few thousand queries, so it is
    tuned on more of them; a small one keeps its build quick.
    """
    return int(min(4000, max(1000, n // 250)))


PLATEAU = 0.001
"""A knob that doubled without raising recall by this much has stopped helping: tuning gives up."""


@dataclass
class Tuning:
    """Result of tuning: the chosen search parameters, their recall and the curve measured.

    recall: the lowest mean recall over the kinds of query (the one that binds); recalls: the
    mean recall of each kind; reached: whether every kind reached the target; speed: batch QPS
    and single-query ms at the chosen parameters (empty unless timed); stopped: why tuning
    stopped short of the target, if it did.
    """

    search_params: str
    recall: float
    curve: list[dict] = field(default_factory=list)
    recalls: dict[str, float] = field(default_factory=dict)
    reached: bool = True
    speed: dict = field(default_factory=dict)
    stopped: str = ""


def ivf_of(index: faiss.Index):
    """The inverted-file part of ``index`` (a CPU IndexIVF, possibly wrapped, or a GPU IVF index).

    None if it has none. A GPU IVF index has the same ``nlist``/``nprobe``/``cp`` members.
    """
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return ivf
    gpu_ivf = getattr(faiss, "GpuIndexIVF", None)
    return index if gpu_ivf is not None and isinstance(index, gpu_ivf) else None


def graph_of(index: faiss.Index):
    """The HNSW index inside ``index`` (under IDMap or pre-transform wrappers), or None."""
    inner = faiss.downcast_index(index)
    while isinstance(inner, (faiss.IndexIDMap, faiss.IndexIDMap2, faiss.IndexPreTransform)):
        inner = faiss.downcast_index(inner.index)
    return inner if isinstance(inner, faiss.IndexHNSW) else None


def search_knob(index: faiss.Index, k: int = 10) -> Knob | None:
    """The knob that trades speed for recall in ``index`` (nprobe, or efSearch), if it has one.

    efSearch starts at k: FAISS searches a graph at least k wide whatever it is set to.
    """
    ivf = ivf_of(index)
    if ivf is not None:
        values = _doubling(1, ivf.nlist)
        if isinstance(getattr(ivf, "quantizer", None), faiss.Index) and isinstance(
            faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW
        ):
            # the HNSW quantiser looks at least nprobe wide anyway; twice that finds the lists
            # (a wider one costs as much as the lists it saves at small nprobe)
            return Knob(
                "nprobe", values, lambda v: f"nprobe={v},quantizer_efSearch={max(2 * v, 8)}"
            )
        return Knob("nprobe", values, lambda v: f"nprobe={v}")
    if graph_of(index) is not None:
        return Knob("efSearch", _doubling(max(k, 1), 4096), lambda v: f"efSearch={v}")
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


def tune(
    index: faiss.Index,
    sets: list[QuerySet],
    target_recall: float,
    k: int,
    set_params: Callable[[faiss.Index, str], None] = set_search_params,
    *,
    timed: bool = False,
    give_up: Callable[[dict], str] | None = None,
) -> Tuning:
    """Raise the index's knob until recall@k reaches ``target_recall`` on every kind of query.

    A value "reaches" the target when, for each query set, the mean recall less CONFIDENCE_Z
    standard errors does. Doubles the knob, then bisects between the last value that missed and
    the first that hit, so the chosen value is within ~12% of the smallest that reaches the
    target (exact below 16). An index without a knob is measured once. If no value reaches the
    target (or recall stops rising, or ``give_up`` names a reason on a curve point), the best
    value measured is kept and ``reached`` is False.

    timed: also time one-query searches at each value and the chosen value's batch and
    single-query speed (``Tuning.speed``); each curve point has "batch_qps" either way (from
    the recall searches of the first query set).
    """
    if not sets:
        raise ValueError("tuning needs at least one set of queries")
    knob = search_knob(index, k)
    curve: list[dict] = []

    def measure(params: str) -> dict:
        set_params(index, params)
        point: dict = {"search_params": params, "recall": {}, "recall_se": {}, "reached": True}
        for number, query_set in enumerate(sets):
            per_query, seconds = query_set.recall(index, k)
            mean = float(per_query.mean())
            error = (
                float(per_query.std(ddof=1) / np.sqrt(len(per_query)))
                if len(per_query) > 1
                else 0.0
            )
            point["recall"][query_set.kind] = round(mean, 5)
            point["recall_se"][query_set.kind] = round(error, 5)
            point["reached"] &= mean - CONFIDENCE_Z * error >= target_recall - 1e-12
            if number == 0:
                point["batch_qps"] = round(len(per_query) / max(seconds, 1e-9), 1)
        if timed:
            point["single_ms"] = round(single_query_ms(index, sets[0].queries[:100], k), 4)
        curve.append(point)
        return point

    def result(point: dict, stopped: str = "") -> Tuning:
        set_params(index, point["search_params"])
        return Tuning(
            point["search_params"],
            min(point["recall"].values()),
            curve,
            dict(point["recall"]),
            point["reached"],
            time_search(index, sets[-1].queries, k) if timed else {},
            stopped,
        )

    if knob is None:
        return result(measure(""))

    points: dict[int, dict] = {}
    hit, stopped = None, ""
    for value in knob.values:
        point = points[value] = measure(knob.to_string(value))
        if point["reached"]:
            hit = value
            break
        stopped = give_up(point) if give_up is not None else ""
        if stopped:
            break
        if len(points) > 1 and _lowest(point) - _lowest(curve[-2]) < PLATEAU:
            stopped = f"recall stopped rising at {knob.name}={value} ({_lowest(point):.4f})"
            break
    if hit is None:
        return result(max(curve, key=_lowest), stopped or f"{knob.name} reached its largest value")

    low = max((v for v in points if v < hit), default=None)
    while low is not None and hit - low > max(1, hit // 8):
        middle = (low + hit) // 2
        points[middle] = measure(knob.to_string(middle))
        if points[middle]["reached"]:
            hit = middle
        else:
            low = middle
    return result(points[hit])


def _lowest(point: dict) -> float:
    """The lowest mean recall of a curve point over the kinds of query."""
    return min(point["recall"].values())


def tune_search_params(
    index: faiss.Index,
    queries: np.ndarray,
    true_ids: np.ndarray,
    target_recall: float,
    k: int,
    set_params: Callable[[faiss.Index, str], None] = set_search_params,
    query_ids: np.ndarray | None = None,
) -> Tuning:
    """``tune`` on one set of queries: leave-one-out with ``query_ids`` (the ids of the queries,
    which are in the index; ``true_ids`` must exclude them too), else queries counted as given.
    """
    kind = "self excluded" if query_ids is not None else "self included"
    return tune(index, [QuerySet(kind, queries, true_ids, query_ids)], target_recall, k, set_params)
