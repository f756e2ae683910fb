"""Time to first result of `specsearch search --store S --source-id ID -k 10` on a built store,
and of `specsearch sql` looking the same star up in the shards.

Each run is a fresh process (as a user types it), so the time includes Python start-up, imports,
reading the query's embedding from Parquet, loading the index and the neighbours' catalog rows.
Queries are distinct random stars of the store. Median and max of the wall time over the runs,
and the median CPU time (user + system) of the process, which other jobs on a shared machine
inflate less than the wall time; JSON beside.

    python benchmarks/bench_search_cli.py --store /tmp/store1m [--runs 7] [--target xp]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--modality", default="xp")
    parser.add_argument("--target", default=None)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from specsearch.store import Store

    store = Store.open(args.store)
    ids = store.embeddings(args.modality, columns=["source_id"]).column("source_id").to_numpy()
    n_stars = store.read_manifest()["releases"]
    queries = np.random.default_rng(args.seed).choice(ids, size=args.runs, replace=False)
    exe = shutil.which("specsearch")
    if exe is None:
        raise SystemExit("specsearch is not on PATH (activate the environment)")
    walls, cpus, sql_walls, sql_cpus = [], [], [], []
    for source_id in queries:
        cmd = [
            exe,
            "search",
            "--store",
            str(args.store),
            "--source-id",
            str(source_id),
            "-k",
            str(args.k),
            "--modality",
            args.modality,
            "--format",
            "csv",
        ]
        if args.target:
            cmd += ["--target", args.target]
        out = timed(cmd, walls, cpus)
        assert len(out.strip().splitlines()) == args.k + 1, out  # header + k neighbours
        lookup = f"SELECT source_id, release, teff FROM shards WHERE source_id = {source_id}"
        sql = [exe, "sql", "--store", str(args.store), lookup, "--format", "csv"]
        out = timed(sql, sql_walls, sql_cpus)
        assert len(out.strip().splitlines()) == 2, out  # header + the star
    result = {
        "store": str(args.store),
        "stars_per_release": {r: e["rows"] for r, e in n_stars.items()},
        "embeddings": int(len(ids)),
        "k": args.k,
        "runs": args.runs,
        "median_s": statistics.median(walls),
        "max_s": max(walls),
        "median_cpu_s": statistics.median(cpus),
        "all_s": walls,
        "sql_median_s": statistics.median(sql_walls),
        "sql_max_s": max(sql_walls),
        "sql_median_cpu_s": statistics.median(sql_cpus),
        "sql_all_s": sql_walls,
        "load_average": list(os.getloadavg()),
    }
    print(
        f"`specsearch search -k {args.k}` on {len(ids):,} {args.modality} embeddings, fresh process per query"
    )
    print(
        f"time to first result: median {result['median_s']:.2f} s, max {result['max_s']:.2f} s "
        f"(CPU {result['median_cpu_s']:.2f} s) over {args.runs} queries"
    )
    print(
        f"`specsearch sql` lookup by source_id: median {result['sql_median_s']:.2f} s, max "
        f"{result['sql_max_s']:.2f} s (CPU {result['sql_median_cpu_s']:.2f} s); load average "
        f"{result['load_average'][0]:.1f}"
    )
    RESULTS.mkdir(exist_ok=True)
    name = f"search_cli_{len(ids)}.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")


def timed(cmd: list[str], walls: list[float], cpus: list[float]) -> str:
    """Run ``cmd`` in a fresh process; append its wall and CPU seconds; return its stdout."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    walls.append(time.perf_counter() - t0)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpus.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return out


if __name__ == "__main__":
    main()
