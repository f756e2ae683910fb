"""Build a FAISS index over L2-normalised embeddings: choose, train, add, tune, report.

``build_index`` is the one entry point for a set that fits in memory; ``build_index_streaming``
does the same for a set given in batches (trained on a sample, added shard by shard into
per-shard indexes on disk, whose inverted lists are then merged into one on-disk file).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterable
from pathlib import Path

import faiss
import numpy as np

from specsearch.errors import SpecsearchError
from specsearch.progress import progress

from .choose import (
    DEFAULT_TARGET_RECALL,
    EXACT_THRESHOLD,
    choose_factory,
    code_ladder,
    default_memory_budget,
    index_bytes,
)
from .device import CpuDevice, resolve_device
from .measure import (
    Batches,
    Tuning,
    drop_self,
    exact_knn_streaming,
    ivf_of,
    sample_queries_streaming,
    set_search_params,
    tune_search_params,
)

METRIC = "inner_product"
ADD_BATCH = 65_536
TRAIN_POINTS_PER_LIST = 64
"""k-means training sample per inverted list (FAISS needs at least 39)."""
KMEANS_ITERATIONS = 10
MAX_TRAIN_OTHER = 100_000
"""Training sample for trainable indexes that are not inverted files (e.g. a flat PQ)."""


# --- inputs


def check_vectors(embeddings: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate (n, d) embeddings and (n,) int64 ids; return float32 C-contiguous unit vectors.

    Vectors whose norm is off 1 by more than float16 rounding are normalised on a copy (the
    caller's array is never modified). Zero, NaN or infinite vectors and duplicate ids are errors.
    """
    embeddings = np.asarray(embeddings)
    ids = np.asarray(ids)
    if embeddings.ndim != 2:
        raise SpecsearchError(
            f"embeddings must be a 2-d array (n, d), got shape {embeddings.shape}"
        )
    if ids.shape != (len(embeddings),):
        raise SpecsearchError(f"ids must have shape ({len(embeddings)},), got {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise SpecsearchError(f"ids must be integers, got {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    if len(embeddings) == 0:
        return embeddings, ids
    norms = np.linalg.norm(embeddings, axis=1)
    bad = ~np.isfinite(norms) | (norms == 0)
    if bad.any():
        raise SpecsearchError(f"embedding of id {ids[np.argmax(bad)]} is zero, NaN or infinite")
    if np.abs(norms - 1).max() > 1e-3:
        embeddings = embeddings / norms[:, None]
    if len(np.unique(ids)) != len(ids):
        values, counts = np.unique(ids, return_counts=True)
        raise SpecsearchError(f"duplicate id {values[np.argmax(counts > 1)]} in the embeddings")
    return embeddings, ids


# --- making, copying and merging indexes


def make_index(factory: str, d: int) -> faiss.Index:
    """An empty inner-product index from a FAISS factory string, able to take explicit ids.

    Types without native ids (Flat, HNSW, PQ, ...) are wrapped in ``IndexIDMap2``.
    """
    try:
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        message = str(err).strip().splitlines()[-1] if str(err).strip() else "invalid"
        raise SpecsearchError(f"FAISS factory {factory!r} for d={d}: {message}") from None
    if is_ivf(index) or isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return index
    return faiss.IndexIDMap2(index)  # the wrapper keeps a Python reference to the inner index


def is_ivf(index: faiss.Index) -> bool:
    """Whether ``index`` is, or wraps, an inverted file (on the CPU or a GPU)."""
    return ivf_of(index) is not None


def empty_copy(index: faiss.Index) -> faiss.Index:
    """A trained copy of an inverted-file index holding no vectors (its lists left behind)."""
    if index.ntotal == 0:
        return faiss.deserialize_index(faiss.serialize_index(index))
    ivf = faiss.extract_index_ivf(index)
    lists, owned, ntotal = ivf.invlists, ivf.own_invlists, index.ntotal
    empty = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.own_invlists = False  # so swapping the lists out does not free them
    ivf.replace_invlists(empty, False)
    ivf.ntotal = index.ntotal = 0
    try:
        return faiss.deserialize_index(faiss.serialize_index(index))
    finally:
        ivf.replace_invlists(lists, owned)
        ivf.ntotal = index.ntotal = ntotal


def merge_ondisk(
    trained_index: faiss.Index, sources: list[faiss.InvertedLists], ivfdata_path: Path
) -> faiss.Index:
    """A copy of ``trained_index`` whose inverted lists are the concatenation of ``sources``.

    The merged lists are written to ``ivfdata_path`` (``faiss.OnDiskInvertedLists``) and are
    memory-mapped when searched, so the result may exceed RAM. Lists are concatenated in the order
    of ``sources``, so the merge holds exactly what adding the sources' vectors in that order to
    one index would hold.
    """
    index = empty_copy(trained_index)
    ivf = faiss.extract_index_ivf(index)
    ondisk = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(ivfdata_path))
    pointers = faiss.InvertedListsPtrVector()
    for lists in sources:
        pointers.push_back(lists)
    ntotal = ondisk.merge_from_multiple(pointers.data(), pointers.size(), False)
    if ondisk.totsize:
        # the merge leaves the space it wrote on the free list, so a list that grows later
        # would be moved over other lists' data: claim that space (a reloaded index rebuilds
        # its free list from the lists and is right already)
        ondisk.allocate_slot(ondisk.totsize)
    ivf.replace_invlists(ondisk, True)
    ondisk.this.disown()  # the index owns its lists now
    ivf.ntotal = index.ntotal = ntotal
    return index


# --- training and adding


def train_index(
    index: faiss.Index, embeddings: np.ndarray, seed: int = 0, device: CpuDevice | None = None
) -> int:
    """Train ``index`` on a random sample of ``embeddings``; return the sample size (0: no training).

    Inverted files use TRAIN_POINTS_PER_LIST vectors a list and KMEANS_ITERATIONS iterations of
    spherical k-means; on a GPU device the k-means assignment runs there even when the index
    itself stays on the CPU.
    """
    if index.is_trained:
        return 0
    device = device or CpuDevice()
    n = len(embeddings)
    ivf = ivf_of(index)
    size = min(n, TRAIN_POINTS_PER_LIST * ivf.nlist if ivf is not None else MAX_TRAIN_OTHER)
    rows = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
    sample = np.ascontiguousarray(embeddings[rows])
    clustering = None
    if ivf is not None:
        ivf.cp.niter = KMEANS_ITERATIONS
        ivf.cp.seed = seed
    cpu_ivf = faiss.try_extract_index_ivf(index)
    if cpu_ivf is not None:  # a GPU IVF index runs its own k-means on the GPU
        clustering = device.clustering_index(cpu_ivf.d)
        if clustering is not None:
            cpu_ivf.clustering_index = clustering
    try:
        index.train(sample)
    finally:
        if clustering is not None:
            cpu_ivf.clustering_index = None
    return size


def add_vectors(
    index: faiss.Index, embeddings: np.ndarray, ids: np.ndarray, show_progress: bool = True
) -> None:
    """Add vectors with their ids in batches of ADD_BATCH, with a progress bar."""
    with progress("adding vectors", len(embeddings), show_progress) as advance:
        for start in range(0, len(embeddings), ADD_BATCH):
            stop = min(start + ADD_BATCH, len(embeddings))
            index.add_with_ids(embeddings[start:stop], ids[start:stop])
            advance(stop - start)


# --- the entry points


def build_index(
    embeddings: np.ndarray,
    ids: np.ndarray,
    factory: str = "auto",
    target_recall: float = DEFAULT_TARGET_RECALL,
    memory_budget_bytes: int | None = None,
    k: int = 10,
    seed: int = 0,
    *,
    exact_threshold: int = EXACT_THRESHOLD,
    n_queries: int = 1000,
    exclude_self: bool = True,
    device: str | CpuDevice = "auto",
    show_progress: bool = True,
) -> tuple[faiss.Index, dict]:
    """Build, train and tune an inner-product index over L2-normalised embeddings.

    Args:
        embeddings: (n, d) float array of unit vectors (float16 input is fine; it is cast).
        ids: (n,) int64 ids, e.g. Gaia ``source_id``; the index returns these.
        factory: "auto" (see ``choose.choose_factory``) or any FAISS factory string, honoured as
            given (types without native ids are wrapped in IDMap2).
        target_recall: recall@k against exact search that the search-time knob (nprobe,
            efSearch) is tuned to reach; "auto" also steps up to finer codes if it must.
        memory_budget_bytes: the most the index itself may take (default: half of RAM).
        k: the k of recall@k.
        seed: seeds the training sample, k-means and the recall queries.
        exact_threshold: below this many vectors "auto" builds an exact Flat index.
        n_queries: vectors sampled from ``embeddings`` to measure recall with; each is searched
            against the whole index (nothing is held out of it).
        exclude_self: leave-one-out recall (default): each query's own id is removed from both
            its exact and its approximate neighbours, as search-by-star and the kNN score do, and
            as a star not in the index sees it. False counts the query itself, which is always
            found, and so overstates recall by ~(1 - recall)/k, more on held-out stars.
        device: "auto" (GPU if faiss sees one), "cpu", "cuda" or a Device object.

    Returns:
        (index, params): a CPU index with its tuned search parameters set, and a JSON-ready dict
        with the factory, n, d, measured recall, search parameters, tuning curve and timings.
    """
    start = time.perf_counter()
    embeddings, ids = check_vectors(embeddings, ids)
    n, d = embeddings.shape
    if n == 0:
        raise SpecsearchError("no embeddings to index")
    device = resolve_device(device)
    budget = memory_budget_bytes or default_memory_budget()
    auto = factory == "auto"
    first = choose_factory(n, d, budget, exact_threshold, gpu=device.is_gpu) if auto else factory
    ladder = code_ladder(first, n, d, budget) if auto else [first]

    rng = np.random.default_rng(seed)
    query_rows = np.sort(rng.choice(n, size=min(n_queries, n), replace=False))
    queries = embeddings[query_rows]
    exclude_self = exclude_self and n > 1
    k = min(k, n - 1 if exclude_self else n)
    query_ids = ids[query_rows] if exclude_self else None
    _, true_rows = device.knn(queries, embeddings, k + 1 if exclude_self else k)
    true_ids = drop_self(ids[true_rows], query_ids, k) if exclude_self else ids[true_rows]

    tried = []
    for candidate in ladder:
        host = make_index(candidate, d)
        work = device.to_device(host)
        t0 = time.perf_counter()
        train_size = train_index(work, embeddings, seed, device)
        t1 = time.perf_counter()
        add_vectors(work, embeddings, ids, show_progress)
        t2 = time.perf_counter()
        tuning = tune_search_params(
            work,
            queries,
            true_ids,
            target_recall,
            k,
            set_params=device.set_params,
            query_ids=query_ids,
        )
        t3 = time.perf_counter()
        tried.append({"factory": candidate, "recall": round(tuning.recall, 5)})
        if tuning.recall >= target_recall or candidate == ladder[-1]:
            break
        device.discard(work)
    index = device.to_host(work)
    set_search_params(index, tuning.search_params)
    params = _record(
        factory=candidate,
        auto=auto,
        n=n,
        d=d,
        k=k,
        target_recall=target_recall,
        tuning=tuning,
        tried=tried,
        n_queries=len(queries),
        exclude_self=exclude_self,
        train_size=train_size,
        budget=budget,
        exact_threshold=exact_threshold,
        device=device,
        seed=seed,
        times=(start, t0, t1, t2, t3),
        storage={"ondisk": False},
    )
    return index, params


def _record(
    *,
    factory: str,
    auto: bool,
    n: int,
    d: int,
    k: int,
    target_recall: float,
    tuning: Tuning,
    tried: list[dict],
    n_queries: int,
    exclude_self: bool,
    train_size: int,
    budget: int,
    exact_threshold: int,
    device: CpuDevice,
    seed: int,
    times: tuple[float, float, float, float, float],
    storage: dict,
    estimate_n: int | None = None,
) -> dict:
    """The parameters JSON written beside an index: what was built, how it was tuned, timings.

    times: (start, trained from, added from, tuned from, tuned until) perf_counter readings."""
    start, t0, t1, t2, t3 = times
    return {
        "factory": factory,
        "auto": auto,
        "metric": METRIC,
        "n": int(n),
        "d": int(d),
        "k": int(k),
        "target_recall": float(target_recall),
        "recall": round(float(tuning.recall), 5),
        "search_params": tuning.search_params,
        "tuning": tuning.curve,
        "tried": tried,
        "n_queries": n_queries,
        "recall_queries": "indexed vectors, self excluded"
        if exclude_self
        else "indexed vectors, self included",
        "train_size": int(train_size),
        "memory_budget_bytes": int(budget),
        "index_bytes_estimate": int(index_bytes(factory, estimate_n or n, d)),
        "exact_threshold": int(exact_threshold),
        "device": device.name,
        **storage,
        "seed": int(seed),
        "seconds": {
            "train": round(t1 - t0, 3),
            "add": round(t2 - t1, 3),
            "tune": round(t3 - t2, 3),
            "total": round(time.perf_counter() - start, 3),
        },
        "faiss_version": faiss.__version__,
    }


def build_sharded_index(
    trained_index: faiss.Index,
    shards: Iterable[tuple[np.ndarray, np.ndarray]],
    out_dir: Path,
    ivfdata_name: str,
    shard_size: int | None = None,
    show_progress: bool = True,
) -> faiss.Index:
    """Add a set too large for memory to an IVF index, one shard at a time, via the disk.

    Each shard of (embeddings, ids) goes into its own empty copy of ``trained_index`` (which
    must be a trained, empty inverted file), written to a scratch folder in ``out_dir``; the
    shards' inverted lists are then merged into ``out_dir/ivfdata_name``, which the returned
    index memory-maps. Batches are grouped into shards of at least ``shard_size`` vectors
    (default: each batch is a shard). The scratch folder is removed.
    """
    if not is_ivf(trained_index) or not trained_index.is_trained or trained_index.ntotal:
        raise SpecsearchError("a sharded build needs a trained, empty inverted-file (IVF) index")
    out_dir = Path(out_dir)
    scratch = out_dir / f".{ivfdata_name}.shards"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        paths = []
        shard = None
        with progress("adding shards", None, show_progress) as advance:
            for embeddings, ids in shards:
                shard = shard if shard is not None else empty_copy(trained_index)
                shard.add_with_ids(
                    np.ascontiguousarray(embeddings, dtype=np.float32),
                    np.asarray(ids, dtype=np.int64),
                )
                advance(len(ids))
                if shard_size is None or shard.ntotal >= shard_size:
                    paths.append(_write_shard(shard, scratch, len(paths)))
                    shard = None
            if shard is not None and shard.ntotal:
                paths.append(_write_shard(shard, scratch, len(paths)))
        # memory-mapped, so the shards' lists are never all in RAM at once
        loaded = [faiss.read_index(str(p), faiss.IO_FLAG_MMAP) for p in paths]
        merged = merge_ondisk(
            trained_index,
            [faiss.extract_index_ivf(s).invlists for s in loaded],
            out_dir / ivfdata_name,
        )
        del loaded
        return merged
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _write_shard(shard: faiss.Index, scratch: Path, number: int) -> Path:
    path = scratch / f"shard-{number:05d}.faiss"
    faiss.write_index(shard, str(path))
    return path


def build_index_streaming(
    batches: Batches,
    n: int,
    d: int,
    out_dir: Path,
    ivfdata_name: str,
    factory: str = "auto",
    target_recall: float = DEFAULT_TARGET_RECALL,
    memory_budget_bytes: int | None = None,
    k: int = 10,
    seed: int = 0,
    *,
    n_queries: int = 1000,
    exclude_self: bool = True,
    shard_size: int | None = None,
    device: str | CpuDevice = "auto",
    show_progress: bool = True,
) -> tuple[faiss.Index, dict]:
    """``build_index`` for a set given as batches that need not fit in memory together.

    ``batches()`` must return a fresh iterator over the same (embeddings, ids) each call; it is
    read three times: to sample training and query vectors, to add shards, and for the exact
    neighbours of the queries. The index is an IVF with on-disk lists in ``out_dir/ivfdata_name``.
    The other arguments are as for ``build_index``.
    """
    start = time.perf_counter()
    device = resolve_device(device)
    budget = memory_budget_bytes or default_memory_budget()
    auto = factory == "auto"
    # the lists live on disk, outside the memory budget: only the quantiser and one shard are in RAM
    chosen = (
        choose_factory(n, d, 1 << 62, exact_threshold=0, gpu=device.is_gpu) if auto else factory
    )
    trained = make_index(chosen, d)
    if not is_ivf(trained):
        raise SpecsearchError(
            f"factory {chosen!r} is not an inverted file: it cannot be built in shards"
        )
    nlist = faiss.extract_index_ivf(trained).nlist
    sample_size = min(n, max(TRAIN_POINTS_PER_LIST * nlist, n_queries))

    def checked():
        return (check_vectors(embeddings, ids) for embeddings, ids in batches())

    sample, sample_ids = sample_queries_streaming(checked(), sample_size, seed)
    t0 = time.perf_counter()
    work = device.to_device(trained)
    train_size = train_index(work, sample, seed, device)
    trained = device.to_host(work)
    t1 = time.perf_counter()
    if shard_size is None:
        shard_size = max(ADD_BATCH, budget // (4 * (4 * d + 8)))
    index = build_sharded_index(
        trained, checked(), out_dir, ivfdata_name, shard_size, show_progress
    )
    t2 = time.perf_counter()
    queries = sample[: min(n_queries, len(sample))]  # the sample is in random order
    exclude_self = exclude_self and n > 1
    k = min(k, n - 1 if exclude_self else n)
    query_ids = sample_ids[: len(queries)] if exclude_self else None
    _, true_ids = exact_knn_streaming(
        queries, checked(), k + 1 if exclude_self else k, knn=device.knn
    )
    if exclude_self:
        true_ids = drop_self(true_ids, query_ids, k)
    tuning = tune_search_params(index, queries, true_ids, target_recall, k, query_ids=query_ids)
    t3 = time.perf_counter()
    params = _record(
        factory=chosen,
        auto=auto,
        n=int(index.ntotal),
        d=d,
        k=k,
        target_recall=target_recall,
        tuning=tuning,
        tried=[{"factory": chosen, "recall": round(tuning.recall, 5)}],
        n_queries=len(queries),
        exclude_self=exclude_self,
        train_size=train_size,
        budget=budget,
        exact_threshold=0,
        device=device,
        seed=seed,
        times=(start, t0, t1, t2, t3),
        storage={"ondisk": True, "ivfdata": ivfdata_name, "shard_size": int(shard_size)},
        estimate_n=n,
    )
    return index, params
