"""Nearest-neighbour search: specsearch's auto index against its peers, side by side in one run.

For each N, on the same database and the same held-out queries (vectors not in the index):

- ``auto``: ``specsearch.indexes.build_index`` as a user gets it (it measures its candidates and
  tunes itself; nothing here adjusts it); and, when its record says the fastest in a batch is
  another candidate, ``auto --speed-for batch`` too;
- hand-tuned FAISS: graphs (``HNSW8,SQfp16``, ``HNSW16,SQfp16``, ``HNSW16,Flat``,
  ``HNSW32,Flat``) and inverted files with an HNSW quantiser (SQfp16 with half the lists auto
  would take, SQ8 with as many);
- ``hnswlib`` (M=16 and M=32, ef_construction 200), ``usearch`` (bf16, connectivity 16) and
  ``autofaiss`` (its own choice and settings, then the same index re-tuned), when installed
  (``pip install -e .[bench]``; autofaiss with ``--no-deps``, see ``pyproject.toml``);
- exact FAISS search (also the ground truth); with ``--naive``, scikit-learn and DuckDB.

Every peer's knob (efSearch, nprobe, ef, expansion) is set to the smallest value whose recall@k
on the evaluation queries themselves reaches --target-recall: the most favourable tuning a peer
could have. Then all are timed in --rounds interleaved rounds, each cut in ten slices in which
every method takes a turn in a new order (so a shared machine's passing load falls on all
alike): batch QPS (the queries in batch calls of a tenth, on --threads threads) and single-query
latency (the median of --single one-query calls, one thread; fewer where a query is slow); the
table gives the median over rounds, the build time, the size of the index as saved,
and the ratios of auto to the best configuration that reaches the target recall. Writes
``benchmarks/results/search_<source>_<N>.json``.

    python benchmarks/bench_search.py --n 200000 1000000 --embeddings STORE/embeddings --modality xp
    python benchmarks/bench_search.py --n 100000            # synthetic clustered vectors
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import faiss
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table
from sklearn.metrics.pairwise import cosine_similarity

from specsearch.indexes import build_index, default_memory_budget, nlist_for, recall_at_k
from specsearch.indexes.measure import (
    search_few,
    search_knob,
    set_search_params,
    time_interleaved,
)

RESULTS = Path(__file__).parent / "results"
ID_OFFSET, ID_STRIDE = 1_000_000, 7  # sparse ids, like source_ids
AUTO_NAMES = ("auto", "auto, for batch")
console = Console(stderr=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[200_000], help="database sizes")
    parser.add_argument("--d", type=int, default=128, help="dimension of synthetic vectors")
    parser.add_argument(
        "--clusters-per", type=int, default=1000, help="synthetic: one cluster per this many"
    )
    parser.add_argument(
        "--intrinsic-dim", type=int, default=16, help="synthetic: 0 for isotropic clusters"
    )
    parser.add_argument("--spread", type=float, default=0.5, help="synthetic: cluster radius")
    parser.add_argument(
        "--embeddings", type=Path, help="Parquet file or folder with an 'embedding' column"
    )
    parser.add_argument("--modality", help="with --embeddings: keep rows of this modality")
    parser.add_argument("--queries", type=int, default=5000, help="held-out evaluation queries")
    parser.add_argument("--single", type=int, default=2000, help="one-query searches a round")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=2, help="threads of batch searches")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--skip", nargs="*", default=[], help="methods to leave out (by name prefix)"
    )
    parser.add_argument("--naive", action="store_true", help="also scikit-learn and DuckDB")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


# --- data


def synthetic(n: int, args) -> tuple[np.ndarray, dict]:
    from specsearch.indexes import sphere_mixture

    clusters = max(16, n // args.clusters_per)
    vectors = sphere_mixture(
        n + args.queries,
        args.d,
        n_clusters=clusters,
        spread=args.spread,
        seed=args.seed,
        intrinsic_dim=args.intrinsic_dim or None,
    )
    return vectors, {
        "source": "synthetic sphere mixture",
        "d": args.d,
        "clusters": clusters,
        "intrinsic_dim": args.intrinsic_dim or None,
        "spread": args.spread,
    }


def from_parquet(n: int, args) -> tuple[np.ndarray, dict]:
    """Unit vectors from real embeddings: n + queries rows drawn at random (fewer if fewer exist).

    Drawn rows whose embedding is zero or not finite (a star the encoder could not embed) are
    dropped, not normalised into NaN: the data record counts them.
    """
    dataset = ds.dataset(args.embeddings, format="parquet", partitioning="hive")
    selection = None
    if args.modality:
        if "modality" not in dataset.schema.names:
            sys.exit(f"{args.embeddings}: no modality column to select {args.modality!r} with")
        selection = ds.field("modality") == args.modality
    column = (
        dataset.to_table(columns=["embedding"], filter=selection)
        .column("embedding")
        .combine_chunks()
    )
    kind = column.type
    d = kind.list_size if pa.types.is_fixed_size_list(kind) else len(column[0])
    vectors = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, d)
    rng = np.random.default_rng(args.seed)
    take = min(len(vectors), n + args.queries)
    vectors = vectors[rng.choice(len(vectors), take, replace=False)].astype(np.float32)
    norms = np.linalg.norm(vectors, axis=1)
    usable = np.isfinite(norms) & (norms > 0)
    if not usable.all():
        console.print(
            f"dropped {int((~usable).sum()):,} drawn rows with a zero or non-finite embedding"
        )
    vectors = vectors[usable] / norms[usable, None]
    return vectors, {
        "source": str(args.embeddings),
        "modality": args.modality,
        "d": d,
        "rows_available": int(len(column)),
        "rows_dropped_not_finite_or_zero": int((~usable).sum()),
    }


# --- the methods


@dataclass
class Method:
    """An index under test: how to search it in a batch and one query at a time, and its knob.

    ``batch(queries, k)`` and ``one(query, k)`` return labels (nq, k); ``to_ids`` turns labels
    into ids (FAISS peers return row numbers). ``set_knob(v)`` sets the knob; ``knob_from`` is
    its smallest useful value.
    """

    name: str
    build_s: float
    nbytes: int
    batch: Callable[[np.ndarray, int], np.ndarray]
    one: Callable[[np.ndarray, int], np.ndarray]
    to_ids: Callable[[np.ndarray], np.ndarray] = lambda labels: labels
    set_knob: Callable[[int], None] | None = None
    knob: str = ""
    knob_from: int = 1
    knob_to: int = 4096
    setting: str = ""
    describe: Callable[[int], str] | None = None
    extra: dict = field(default_factory=dict)


def faiss_method(
    name: str, index: faiss.Index, build_s: float, ids: np.ndarray, args, labels_are_ids=False
) -> Method:
    """A FAISS index searched as its users would: the batch on --threads threads, one query as
    ``search_store`` does (``search_few``); its knob is the one ``build_index`` tunes."""

    def batch(queries, k):
        faiss.omp_set_num_threads(args.threads)
        return index.search(queries, k)[1]

    def one(query, k):
        return search_few(index, query, k)[1]

    knob = search_knob(index, args.k)
    method = Method(
        name,
        build_s,
        len(faiss.serialize_index(index)),
        batch,
        one,
        extra={"index": index},
    )
    if not labels_are_ids:
        method.to_ids = lambda labels: np.where(labels < 0, -1, ids[labels])
    if knob is not None:
        method.set_knob = lambda v: set_search_params(index, knob.to_string(v))
        method.knob, method.knob_from = knob.name, knob.values[0]
        method.describe = knob.to_string
    return method


def build_faiss(factory: str, database: np.ndarray, args) -> tuple[faiss.Index, float]:
    """A plain FAISS index (row numbers as ids), trained on up to 256 vectors a list."""
    start = time.perf_counter()
    index = faiss.index_factory(database.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        ivf = faiss.try_extract_index_ivf(index)
        size = min(len(database), 256 * ivf.nlist if ivf is not None else 100_000)
        rows = np.random.default_rng(args.seed).choice(len(database), size, replace=False)
        index.train(database[np.sort(rows)])
    index.add(database)
    return index, time.perf_counter() - start


def run_auto(database, ids, args, speed_for: str = "single") -> tuple[Method, dict]:
    faiss.omp_set_num_threads(args.threads)
    start = time.perf_counter()
    index, params = build_index(
        database,
        ids,
        target_recall=args.target_recall,
        k=args.k,
        seed=args.seed,
        speed_for=speed_for,
        show_progress=False,
    )
    build_s = time.perf_counter() - start
    label = AUTO_NAMES[0] if speed_for == "single" else AUTO_NAMES[1]
    method = faiss_method(label, index, build_s, ids, args, labels_are_ids=True)
    method.set_knob = None  # as built: it tuned itself
    method.setting = f"{params['factory']} {params['search_params'] or 'exact'}"
    return method, params


def saved_bytes(save: Callable[[str], None]) -> int:
    """Size of the file ``save(path)`` writes."""
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "index.bin"
        save(str(path))
        return path.stat().st_size


def hnswlib_method(database, ids, m: int, args) -> Method | None:
    try:
        import hnswlib
    except ImportError:
        return None
    start = time.perf_counter()
    index = hnswlib.Index(space="ip", dim=database.shape[1])
    index.init_index(max_elements=len(database), ef_construction=200, M=m, random_seed=args.seed)
    index.add_items(database, ids, num_threads=args.threads)
    build_s = time.perf_counter() - start
    return Method(
        f"hnswlib M={m}",
        build_s,
        saved_bytes(index.save_index),
        lambda q, k: index.knn_query(q, k=k, num_threads=args.threads)[0].astype(np.int64),
        lambda q, k: index.knn_query(q, k=k, num_threads=1)[0],
        set_knob=index.set_ef,
        knob="ef",
        knob_from=args.k,  # hnswlib searches max(ef, k) wide
    )


def usearch_method(database, ids, args, dtype: str = "bf16") -> Method | None:
    try:
        from usearch.index import Index
    except ImportError:
        return None
    start = time.perf_counter()
    index = Index(ndim=database.shape[1], metric="ip", dtype=dtype, connectivity=16)
    index.add(ids, database, threads=args.threads)
    build_s = time.perf_counter() - start

    def set_knob(v):
        index.expansion_search = v

    return Method(
        f"usearch {dtype}",
        build_s,
        saved_bytes(index.save),
        lambda q, k: index.search(q, k, threads=args.threads).keys.astype(np.int64),
        lambda q, k: index.search(q[0], k, threads=1).keys,
        set_knob=set_knob,
        knob="expansion_search",
        knob_from=1,
    )


def autofaiss_methods(database, ids, args) -> list[Method]:
    """autofaiss's own choice as it tunes it (to a query time), and the same index re-tuned."""
    try:
        from autofaiss import build_index as autofaiss_build
    except ImportError:
        return []
    # the index may take specsearch's budget (half of RAM); building may use all of RAM
    budget_gb, ram_gb = (f"{x * default_memory_budget() / 2**30:.0f}G" for x in (1, 2))
    faiss.omp_set_num_threads(args.threads)
    start = time.perf_counter()
    index, info = autofaiss_build(
        database,
        save_on_disk=False,
        metric_type="ip",
        max_index_memory_usage=budget_gb,
        current_memory_available=ram_gb,
        min_nearest_neighbors_to_retrieve=args.k,
        verbose=logging.ERROR,
    )
    build_s = time.perf_counter() - start
    chosen = faiss_method("autofaiss", index, build_s, ids, args)
    chosen.setting = f"{info['index_key']} {info['index_param']}"
    chosen.set_knob = None  # as autofaiss set it
    copy = faiss.clone_index(index)  # its own knob
    retuned = faiss_method("autofaiss, re-tuned", copy, build_s, ids, args)
    retuned.setting = info["index_key"]
    return [chosen, retuned]


def run_flat(database: np.ndarray, ids: np.ndarray, queries: np.ndarray, args):
    start = time.perf_counter()
    index = faiss.IndexFlatIP(database.shape[1])
    index.add(database)
    build_s = time.perf_counter() - start
    faiss.omp_set_num_threads(args.threads)
    _, true_rows = index.search(queries, args.k)
    method = faiss_method("faiss Flat (exact)", index, build_s, ids, args)
    method.setting = "exact"
    return method, ids[true_rows]


# --- tuning and timing


def tune_peer(method: Method, queries: np.ndarray, true_ids: np.ndarray, args) -> float:
    """Set the peer's knob to the smallest value reaching the target recall on ``queries``.

    Doubling from ``knob_from``, then bisection to the exact smallest value. Returns its recall.
    """

    def recall(value: int) -> float:
        method.set_knob(value)
        return recall_at_k(method.to_ids(method.batch(queries, args.k)), true_ids)

    value, low, measured = method.knob_from, None, {}
    while value < method.knob_to:
        measured[value] = recall(value)
        if measured[value] >= args.target_recall:
            break
        low, value = value, value * 2
    value = min(value, method.knob_to)
    if value not in measured:
        measured[value] = recall(value)
    while low is not None and value - low > 1:
        middle = (low + value) // 2
        measured[middle] = recall(middle)
        if measured[middle] >= args.target_recall:
            value = middle
        else:
            low = middle
    method.set_knob(value)
    described = method.describe(value) if method.describe else f"{method.knob}={value}"
    method.setting = f"{method.setting} {described}".strip()
    return measured[value]


def time_rounds(methods: list[Method], queries: np.ndarray, args) -> dict[str, dict]:
    """Median batch QPS and single-query ms of each method over interleaved rounds, each round
    cut in slices in which every method takes a turn (``time_interleaved``)."""
    speeds = time_interleaved(
        {m.name: (m.batch, m.one) for m in methods},
        queries,
        args.k,
        rounds=args.rounds,
        singles=args.single,
        seed=args.seed,
    )
    return {
        name: {
            "qps": speed["batch_qps"],
            "single_ms": speed["single_ms"],
            "qps_rounds": speed["batch_qps_rounds"],
            "single_ms_rounds": speed["single_ms_rounds"],
        }
        for name, speed in speeds.items()
    }


# --- the naive baselines (--naive)


def sklearn_top_k(queries: np.ndarray, database: np.ndarray, k: int) -> np.ndarray:
    similarity = cosine_similarity(queries, database)
    top = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(similarity, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)


def run_sklearn(database, ids, queries, true_ids, args, count: int = 1000) -> dict:
    count = min(count, len(queries))
    start = time.perf_counter()
    found = np.concatenate(
        [ids[sklearn_top_k(queries[s : s + 100], database, args.k)] for s in range(0, count, 100)]
    )
    batch_s = time.perf_counter() - start
    start = time.perf_counter()
    for query in queries[:5]:
        sklearn_top_k(query[None], database, args.k)
    return {
        "method": "sklearn cosine_similarity (chunked)",
        "queries": count,
        "qps": count / batch_s,
        "single_ms": 1e3 * (time.perf_counter() - start) / 5,
        "recall": recall_at_k(found, true_ids[:count]),
        "build_s": 0.0,
    }


def run_duckdb(database, ids, queries, true_ids, args, scratch: Path, count: int = 50) -> dict:
    """Top-k by array_cosine_similarity over a float16 Parquet file, as the SQL views would do."""
    d = database.shape[1]
    path = scratch / "embeddings.parquet"
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(database.astype(np.float16).ravel()), d)
    start = time.perf_counter()
    pq.write_table(pa.table({"source_id": ids, "embedding": embedding}), path, compression="zstd")
    build_s = time.perf_counter() - start
    count = min(count, len(queries))
    con = duckdb.connect()
    con.register(
        "queries_table",
        pa.table(
            {
                "qid": pa.array(np.arange(count)),
                "q": pa.FixedSizeListArray.from_arrays(pa.array(queries[:count].ravel()), d),
            }
        ),
    )
    source = f"read_parquet('{path}')"
    start = time.perf_counter()
    rows = con.execute(
        f"SELECT qid, max_by(source_id, s, {args.k}) AS top FROM ("
        f"  SELECT q.qid, e.source_id, array_cosine_similarity(e.v, q.q::FLOAT[{d}]) AS s"
        f"  FROM (SELECT source_id, embedding::FLOAT[{d}] AS v FROM {source}) e"
        f"  CROSS JOIN queries_table q) GROUP BY qid ORDER BY qid"
    ).fetchall()
    batch_s = time.perf_counter() - start
    found = np.array([top for _, top in rows], dtype=np.int64)
    single_sql = (
        f"SELECT source_id FROM {source} ORDER BY "
        f"array_cosine_similarity(embedding::FLOAT[{d}], $q::FLOAT[{d}]) DESC LIMIT {args.k}"
    )
    start = time.perf_counter()
    for query in queries[:5]:
        con.execute(single_sql, {"q": query.tolist()}).fetchall()
    return {
        "method": "duckdb array_cosine_similarity (Parquet)",
        "queries": count,
        "qps": count / batch_s,
        "single_ms": 1e3 * (time.perf_counter() - start) / 5,
        "recall": recall_at_k(found, true_ids[:count]),
        "build_s": build_s,
    }


# --- one size


def wanted(name: str, args) -> bool:
    return not any(name.startswith(prefix) for prefix in args.skip)


def bench(n: int, args) -> dict:
    vectors, data = from_parquet(n, args) if args.embeddings else synthetic(n, args)
    n = len(vectors) - args.queries
    database, queries = vectors[:n], np.ascontiguousarray(vectors[n:])
    ids = np.arange(n, dtype=np.int64) * ID_STRIDE + ID_OFFSET
    console.print(f"[bold]N={n:,}[/] d={database.shape[1]}: exact FAISS ...")
    flat, true_ids = run_flat(database, ids, queries, args)
    methods = [flat] if wanted(flat.name, args) else []  # the ground truth, timed or not
    console.print("auto ...")
    auto, params = run_auto(database, ids, args)
    methods.append(auto)
    choice = params.get("choice", {})
    batch_pick = choice.get("batch_winner")
    if batch_pick and batch_pick != choice.get("winner") and wanted(AUTO_NAMES[1], args):
        console.print(f"auto for batch ({batch_pick}) ...")
        auto_batch, params["batch_build"] = run_auto(database, ids, args, speed_for="batch")
        methods.append(auto_batch)
    nlist = nlist_for(n)
    factories = [
        "HNSW8,SQfp16",
        "HNSW16,SQfp16",
        "HNSW16,Flat",
        "HNSW32,Flat",
        f"IVF{nlist // 2}_HNSW32,SQfp16",
        f"IVF{nlist}_HNSW32,SQ8",
    ]
    for factory in factories:
        if wanted(f"faiss {factory}", args):
            console.print(f"faiss {factory} ...")
            index, build_s = build_faiss(factory, database, args)
            methods.append(faiss_method(f"faiss {factory}", index, build_s, ids, args))
            methods[-1].setting = factory
    for m in (16, 32):
        if wanted(f"hnswlib M={m}", args):
            console.print(f"hnswlib M={m} ...")
            methods += [x for x in [hnswlib_method(database, ids, m, args)] if x is not None]
    if wanted("usearch", args):
        console.print("usearch ...")
        methods += [x for x in [usearch_method(database, ids, args)] if x is not None]
    if wanted("autofaiss", args):
        console.print("autofaiss ...")
        methods += autofaiss_methods(database, ids, args)
    missing = [
        name
        for name, present in (
            ("hnswlib", any(m.name.startswith("hnswlib") for m in methods)),
            ("usearch", any(m.name.startswith("usearch") for m in methods)),
            ("autofaiss", any(m.name.startswith("autofaiss") for m in methods)),
        )
        if not present and wanted(name, args)
    ]
    recalls = {}
    for method in methods:
        if method.set_knob is not None:
            console.print(f"tuning {method.name} ...")
            recalls[method.name] = tune_peer(method, queries, true_ids, args)
        else:
            recalls[method.name] = recall_at_k(
                method.to_ids(method.batch(queries, args.k)), true_ids
            )
    console.print(f"timing {len(methods)} methods in {args.rounds} rounds ...")
    speeds = time_rounds(methods, queries, args)
    rows = [
        {
            "method": m.name,
            "setting": m.setting,
            "recall": recalls[m.name],
            "build_s": m.build_s,
            "bytes": m.nbytes,
            **speeds[m.name],
        }
        for m in methods
    ]
    if args.naive:
        rows.append(run_sklearn(database, ids, queries, true_ids, args))
        with tempfile.TemporaryDirectory() as scratch:
            rows.append(run_duckdb(database, ids, queries, true_ids, args, Path(scratch)))
    return {
        "n": n,
        "k": args.k,
        "queries": len(queries),
        "target_recall": args.target_recall,
        "data": data,
        "methods": rows,
        "summary": summarise(rows, args.target_recall),
        "auto_params": params,
        "missing_peers": missing,
        "machine": {
            "cpus": os.cpu_count(),
            "threads": args.threads,
            "platform": platform.platform(),
            "faiss": faiss.__version__,
            "memory_budget_bytes": default_memory_budget(),
        },
        "note": "recall@k of held-out queries (not in the index) against exact inner-product "
        "search; peers tuned on these queries (smallest knob reaching the target), auto as "
        "built; QPS and single-query ms are medians over interleaved rounds; bytes as saved",
    }


def summarise(rows: list[dict], target: float) -> dict:
    """Auto against the best configuration that reaches the target recall, batch and single."""
    able = [r for r in rows if r["recall"] >= target and "qps_rounds" in r]
    best_qps = max(able, key=lambda r: r["qps"])
    best_single = min(able, key=lambda r: r["single_ms"])
    summary = {"best_batch": best_qps["method"], "best_single": best_single["method"]}
    for row in rows:
        if row["method"] in AUTO_NAMES:
            summary[row["method"]] = {
                "recall": row["recall"],
                "reaches_target": row["recall"] >= target,
                "qps_vs_best": row["qps"] / best_qps["qps"],
                "single_ms_vs_best": row["single_ms"] / best_single["single_ms"],
            }
    return summary


def print_table(result: dict) -> None:
    table = Table(
        title=f"search, N={result['n']:,}, d={result['data']['d']}, k={result['k']}, "
        f"{result['queries']:,} held-out queries, {result['machine']['threads']} threads"
    )
    columns = ("method", "setting", "recall", "batch QPS", "1-query ms", "build s", "MB")
    for column in columns:
        table.add_column(column, justify="left" if column in ("method", "setting") else "right")
    for m in result["methods"]:
        table.add_row(
            m["method"],
            m.get("setting", ""),
            f"{m['recall']:.4f}",
            f"{m['qps']:,.0f}",
            f"{m['single_ms']:.4f}",
            f"{m['build_s']:.1f}",
            f"{m.get('bytes', 0) / 1e6:.1f}",
        )
    Console(width=160).print(table)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    source = "real" if args.embeddings else "synthetic"
    for n in args.n:
        result = bench(n, args)
        print_table(result)
        path = args.out / f"search_{source}_{n}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=2, default=float) + "\n")
        os.replace(tmp, path)
        summary = result["summary"]
        for name, ratios in summary.items():
            if isinstance(ratios, dict):
                print(
                    f"{name}: recall {ratios['recall']:.4f}, batch QPS "
                    f"{ratios['qps_vs_best']:.2f}x the best ({summary['best_batch']}), "
                    f"single-query ms {ratios['single_ms_vs_best']:.2f}x the best "
                    f"({summary['best_single']})"
                )
        if result["missing_peers"]:
            print(f"not installed: {', '.join(result['missing_peers'])}")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
