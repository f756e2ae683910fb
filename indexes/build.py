"""Build a FAISS index over L2-normalised embeddings: choose, train, add, tune, report.

``build_index`` is the one entry point for a set that fits in memory; ``build_index_streaming``
does the same for a set given in batches (trained on a sample, added shard by shard into
per-shard indexes on disk, whose inverted lists are then merged into one on-disk file).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import faiss
import numpy as np

from specsearch.errors import SpecsearchError, os_error_from
from specsearch.progress import progress

from .choose import (
    DEFAULT_TARGET_RECALL,
    EXACT_THRESHOLD,
    choose_factory,
    choose_index,
    code_ladder,
    default_memory_budget,
    index_bytes,
    index_family,
)
from .device import CpuDevice, resolve_device
from .make import (
    ADD_BATCH,
    GRAPH_EF_CONSTRUCTION,
    TRAIN_POINTS_PER_LIST,
    add_vectors,
    is_ivf,
    make,
    make_index,
    train_index,
)
from .measure import (
    Batches,
    QuerySet,
    Tuning,
    query_sets,
    query_sets_streaming,
    sample_queries_streaming,
    set_search_params,
    tune,
    tuning_queries,
)

METRIC = "inner_product"


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
    n_queries: int | None = None,
    exclude_self: bool = True,
    speed_for: str = "single",
    device: str | CpuDevice = "auto",
    show_progress: bool = True,
) -> tuple[faiss.Index, dict]:
    """Build, train and tune an inner-product index over L2-normalised embeddings.

    Args:
        embeddings: (n, d) float array of unit vectors (float16 input is fine; it is cast).
        ids: (n,) int64 ids, e.g. Gaia ``source_id``; the index returns these.
        factory: "auto" or any FAISS factory string, honoured as given (types without native
            ids are wrapped in IDMap). On the CPU "auto" is the measured choice
            (``choose.choose_index``): exact search below ``exact_threshold`` vectors, else the
            fastest candidate that reaches the target recall within the budget; on a GPU it is
            the rule ``choose.choose_factory``, stepping up to finer codes if it must.
        target_recall: recall@k against exact search that the search-time knob (nprobe,
            efSearch) is tuned to reach, on every kind of query.
        memory_budget_bytes: the most the index itself may take (default: half of RAM).
        k: the k of recall@k.
        seed: seeds the training sample, k-means, the sample of the choice and the queries.
        exact_threshold: below this many vectors "auto" builds an exact Flat index.
        n_queries: queries of each kind that recall is measured on: stars of the set searched
            for their neighbours, and as many stars held out of the index until it is tuned
            (then added), searched as vectors new to it (default ``tuning_queries(n)``).
        exclude_self: the stars of the set leave their own id out of both their exact and their
            approximate neighbours (default), as search-by-star and the kNN graph do. False
            counts it (it is always found), which overstates recall by ~(1 - recall)/k.
        speed_for: "single" (default: a user's search, one query at a time) or "batch" (a kNN
            graph of the whole set): what "fastest" means to the measured choice.
        device: "auto" (GPU if faiss sees one), "cpu", "cuda" or a Device object.

    Returns:
        (index, params): a CPU index with its tuned search parameters set, and a JSON-ready dict
        with the factory, n, d, measured recall of each kind of query, search parameters, speed,
        tuning curve, timings and, for the measured choice, every candidate and the reason.
    """
    start = time.perf_counter()
    embeddings, ids = check_vectors(embeddings, ids)
    n, d = embeddings.shape
    if n == 0:
        raise SpecsearchError("no embeddings to index")
    device = resolve_device(device)
    budget = memory_budget_bytes or default_memory_budget()
    auto = factory == "auto"
    exclude_self = exclude_self and n > 1
    held, kept, self_rows = _query_rows(n, n_queries or tuning_queries(n), seed)
    k = min(k, len(kept) - 1 if exclude_self else len(kept))
    indexed, indexed_ids = np.ascontiguousarray(embeddings[kept]), ids[kept]
    exact = n < exact_threshold and index_bytes("IDMap2,Flat", n, d) <= budget

    t0 = time.perf_counter()
    choice = None
    if auto and not device.is_gpu and not exact:
        choice = choose_index(
            indexed,
            indexed_ids,
            self_rows,
            embeddings[held],
            target_recall,
            k,
            budget,
            speed_for=speed_for,
            seed=seed,
            show_progress=show_progress,
        )
        made, tuning, sets = choice.made, choice.tuning, choice.sets
        index = made.index
        tried = [
            {"factory": c["factory"], "recall": c["recall"]}
            for c in choice.record["candidates"]
            if "recall" in c
        ]
    else:
        first = (
            choose_factory(n, d, budget, exact_threshold, gpu=device.is_gpu) if auto else factory
        )
        ladder = code_ladder(first, n, d, budget) if auto else [first]
        sets = query_sets(
            indexed, indexed_ids, self_rows, embeddings[held], k, device.knn, exclude_self
        )
        tried = []
        for candidate in ladder:
            made = make(candidate, indexed, indexed_ids, seed, device, show_progress)
            tuning = tune(made.index, sets, target_recall, k, device.set_params)
            tried.append({"factory": candidate, "recall": tuning.recalls})
            if tuning.reached or candidate == ladder[-1]:
                break
            device.discard(made.index)
        index = device.to_host(made.index)
    t1 = time.perf_counter()
    add_vectors(index, embeddings[held], ids[held], show_progress=False)
    set_search_params(index, tuning.search_params)
    params = _record(
        factory=made.factory if choice is None else choice.record["winner"],
        auto=auto,
        n=n,
        d=d,
        k=k,
        target_recall=target_recall,
        tuning=tuning,
        tried=tried,
        sets=sets,
        train_size=made.train_size,
        budget=budget,
        exact_threshold=exact_threshold,
        device=device,
        seed=seed,
        seconds={**made.seconds, "choose_and_tune": round(t1 - t0, 3)},
        start=start,
        storage={"ondisk": False},
        choice=choice.record if choice is not None else None,
    )
    return index, params


def _query_rows(n: int, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(held-out rows, indexed rows, self-query positions among the indexed rows).

    At most n_queries of each kind; a tenth of the set at most is held out (none of fewer than
    20 vectors).
    """
    order = np.random.default_rng(seed).permutation(n)
    n_held = min(n_queries, n // 10) if n >= 20 else 0
    held = np.sort(order[:n_held])
    kept = np.sort(order[n_held:])
    self_rows = np.sort(order[n_held : n_held + min(n_queries, n - n_held)])
    return held, kept, np.searchsorted(kept, self_rows)


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
    sets: list[QuerySet],
    train_size: int,
    budget: int,
    exact_threshold: int,
    device: CpuDevice,
    seed: int,
    seconds: dict,
    start: float,
    storage: dict,
    estimate_n: int | None = None,
    choice: dict | None = None,
) -> dict:
    """The parameters JSON written beside an index: what was built, how it was tuned, timings.

    ``recall`` is the lowest mean recall@k over the kinds of query, ``recalls`` each kind's;
    ``speed`` the batch QPS and single-query ms at the chosen setting (where timed); ``choice``
    the candidates of the measured choice and the reason the winner won."""
    record = {
        "factory": factory,
        "auto": auto,
        "metric": METRIC,
        "n": int(n),
        "d": int(d),
        "k": int(k),
        "target_recall": float(target_recall),
        "recall": round(float(tuning.recall), 5),
        "recalls": tuning.recalls,
        "search_params": tuning.search_params,
        **({"ef_construction": GRAPH_EF_CONSTRUCTION} if index_family(factory) == "graph" else {}),
        "speed": tuning.speed,
        "tuning": tuning.curve,
        "tried": tried,
        "n_queries": {s.kind: len(s.queries) for s in sets},
        "recall_queries": ", ".join(
            "indexed vectors, self excluded"
            if s.kind == "self excluded"
            else "indexed vectors, self included"
            if s.kind == "self included"
            else "vectors held out of the index"
            for s in sets
        ),
        "train_size": int(train_size),
        "memory_budget_bytes": int(budget),
        "index_bytes_estimate": int(index_bytes(factory, estimate_n or n, d)),
        "exact_threshold": int(exact_threshold),
        "device": device.name,
        **storage,
        "seed": int(seed),
        "seconds": {**seconds, "total": round(time.perf_counter() - start, 3)},
        "faiss_version": faiss.__version__,
    }
    if choice is not None:
        record["choice"] = choice
    return record


def build_sharded_index(
    trained_index: faiss.Index,
    shards: Iterable[tuple[np.ndarray, np.ndarray]],
    out_dir: Path,
    ivfdata_name: str,
    shard_size: int | None = None,
    show_progress: bool = True,
    workers: int = 1,
) -> faiss.Index:
    """Add a set too large for memory to an IVF index, one shard at a time, via the disk.

    Each shard of (embeddings, ids) goes into its own empty copy of ``trained_index`` (which
    must be a trained, empty inverted file), written to a scratch folder in ``out_dir``; the
    shards' inverted lists are then merged into ``out_dir/ivfdata_name``, which the returned
    index memory-maps. Batches are grouped into shards of at least ``shard_size`` vectors
    (default: each batch is a shard). With ``workers`` > 1 the shards are added by that many
    processes at once (each reads the trained index from the scratch folder and writes its
    shard there; at most 2 x ``workers`` shards are in memory); the merge, and so the index, is
    the same. The scratch folder is removed.
    """
    if not is_ivf(trained_index) or not trained_index.is_trained or trained_index.ntotal:
        raise SpecsearchError("a sharded build needs a trained, empty inverted-file (IVF) index")
    out_dir = Path(out_dir)
    scratch = out_dir / f".{ivfdata_name}.shards"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        grouped = _grouped(shards, shard_size)
        with progress("adding shards", None, show_progress) as advance:
            if workers > 1:
                paths = _add_in_processes(trained_index, grouped, scratch, workers, advance)
            else:
                paths = []
                for number, (embeddings, ids) in enumerate(grouped):
                    shard = empty_copy(trained_index)
                    shard.add_with_ids(embeddings, ids)
                    paths.append(_write_shard(shard, scratch, number))
                    advance(len(ids))
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


def _grouped(
    batches: Iterable[tuple[np.ndarray, np.ndarray]], shard_size: int | None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches joined into shards of at least ``shard_size`` vectors (None: one per batch)."""
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    held = 0
    for embeddings, ids in batches:
        if not len(ids):
            continue
        parts.append(
            (np.ascontiguousarray(embeddings, dtype=np.float32), np.asarray(ids, dtype=np.int64))
        )
        held += len(ids)
        if shard_size is None or held >= shard_size:
            yield _joined(parts)
            parts, held = [], 0
    if parts:
        yield _joined(parts)


def _joined(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _add_in_processes(
    trained_index: faiss.Index,
    grouped: Iterator[tuple[np.ndarray, np.ndarray]],
    scratch: Path,
    workers: int,
    advance,
) -> list[Path]:
    import functools
    import os
    from concurrent.futures import ProcessPoolExecutor

    from specsearch.pool import die_with_parent, ordered_map

    trained_path = scratch / "trained.faiss"
    write_faiss(trained_index, trained_path)
    threads = max(1, (os.cpu_count() or 1) // workers)
    job = functools.partial(_add_shard_file, str(trained_path), str(scratch), threads)
    items = ((number, shard) for number, shard in enumerate(grouped))
    paths = []
    with ProcessPoolExecutor(workers, initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
        for path, count in ordered_map(pool, job, items, ahead=workers):
            paths.append(Path(path))
            advance(count)
    return paths


def _add_shard_file(
    trained_path: str, scratch: str, threads: int, item: tuple[int, tuple[np.ndarray, np.ndarray]]
) -> tuple[str, int]:
    """In a worker process: one shard's vectors into a copy of the trained index, on disk."""
    number, (embeddings, ids) = item
    faiss.omp_set_num_threads(threads)
    shard = faiss.read_index(trained_path)
    shard.add_with_ids(embeddings, ids)
    return str(_write_shard(shard, Path(scratch), number)), len(ids)


def write_faiss(index: faiss.Index, path: Path) -> None:
    """``faiss.write_index``, with a failed write (a full disk) raised as the OSError it is."""
    try:
        faiss.write_index(index, str(path))
    except RuntimeError as err:
        raise (os_error_from(err, str(path)) or err) from None


def _write_shard(shard: faiss.Index, scratch: Path, number: int) -> Path:
    path = scratch / f"shard-{number:05d}.faiss"
    write_faiss(shard, path)
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
    n_queries: int | None = None,
    exclude_self: bool = True,
    shard_size: int | None = None,
    workers: int = 1,
    device: str | CpuDevice = "auto",
    show_progress: bool = True,
) -> tuple[faiss.Index, dict]:
    """``build_index`` for a set given as batches that need not fit in memory together.

    ``batches()`` must return a fresh iterator over the same (embeddings, ids) each call; it is
    read three times: to sample training and query vectors, to add shards, and for the exact
    neighbours of the queries. The index is an IVF with on-disk lists in ``out_dir/ivfdata_name``.
    ``workers``: processes adding shards at once (``build_sharded_index``). The other arguments
    are as for ``build_index``.
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
    n_queries = n_queries or tuning_queries(n)
    n_held = min(n_queries, n // 10) if n >= 20 else 0
    sample_size = min(n, max(TRAIN_POINTS_PER_LIST * nlist, n_queries + n_held))

    def checked():
        return (check_vectors(embeddings, ids) for embeddings, ids in batches())

    # the sample is in random order: its first n_held stars are held out of the index until it
    # is tuned, the next n_queries are searched as stars of the index
    sample, sample_ids = sample_queries_streaming(checked(), sample_size, seed)
    held, held_ids = sample[:n_held], sample_ids[:n_held]

    def indexed():
        for embeddings, ids in checked():
            keep = ~np.isin(ids, held_ids)
            yield embeddings[keep], ids[keep]

    t0 = time.perf_counter()
    work = device.to_device(trained)
    train_size = train_index(work, sample, seed, device)
    trained = device.to_host(work)
    t1 = time.perf_counter()
    if shard_size is None:
        shard_size = max(ADD_BATCH, budget // (4 * (4 * d + 8)))
    index = build_sharded_index(
        trained, indexed(), out_dir, ivfdata_name, shard_size, show_progress, workers
    )
    t2 = time.perf_counter()
    exclude_self = exclude_self and n > 1
    k = min(k, n - n_held - 1 if exclude_self else n - n_held)
    self_queries = sample[n_held : n_held + n_queries]
    sets = query_sets_streaming(
        indexed(),
        self_queries,
        sample_ids[n_held : n_held + n_queries],
        held,
        k,
        device.knn,
        exclude_self,
    )
    tuning = tune(index, sets, target_recall, k)
    index.add_with_ids(held, held_ids)  # into the on-disk lists
    t3 = time.perf_counter()
    params = _record(
        factory=chosen,
        auto=auto,
        n=int(index.ntotal),
        d=d,
        k=k,
        target_recall=target_recall,
        tuning=tuning,
        tried=[{"factory": chosen, "recall": tuning.recalls}],
        sets=sets,
        train_size=train_size,
        budget=budget,
        exact_threshold=0,
        device=device,
        seed=seed,
        seconds={"train": round(t1 - t0, 3), "add": round(t2 - t1, 3), "tune": round(t3 - t2, 3)},
        start=start,
        storage={
            "ondisk": True,
            "ivfdata": ivfdata_name,
            "shard_size": int(shard_size),
            "workers": int(workers),
        },
        estimate_n=n,
    )
    return index, params
