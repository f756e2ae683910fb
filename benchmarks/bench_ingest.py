"""Peak memory and time of `ingest` against the size of the release.

Simulates releases of 20k and 200k stars (both modalities; reused when already under --work),
then ingests each into a fresh store in a fresh process. Ingest sorts reader batches into runs
spilled inside the store and merges them into the shard files, so its peak memory should not grow
with the release.

    python benchmarks/bench_ingest.py [--sizes 20000 200000] [--work DIR]

Prints a table and writes benchmarks/results/ingest.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
from pathlib import Path

from bench_embed import fresh_process_peak

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20000, 200000])
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args(argv)

    from specsearch.sim.simulate import simulate_release

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    runs = {}
    for n in args.sizes:
        sim = work / f"sim{n}"
        if not (sim / "truth.parquet").exists():
            simulate_release(sim, n=n, seed=n, release="BENCH", anomaly_fraction=0.0)
        store = work / f"ingest-store{n}"
        shutil.rmtree(store, ignore_errors=True)
        source = sim / "shards" / "release=BENCH"
        runs[n] = fresh_process_peak(
            "from specsearch.pipeline.ingest import ingest; "
            f"print(ingest({str(source)!r}, {str(store)!r}, 'BENCH', show_progress=False))"
        )
        runs[n]["shard_bytes"] = sum(p.stat().st_size for p in store.rglob("part-*.parquet"))
        shutil.rmtree(store)
    small, large = min(args.sizes), max(args.sizes)
    result = {
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPUs",
        "runs": {str(n): r for n, r in runs.items()},
        "memory_ratio": runs[large]["peak_rss_mb"] / runs[small]["peak_rss_mb"],
    }
    print(f"ingest of simulated releases (LRS + XP), {result['machine']}")
    print(f"{'stars':>8}{'ingest s':>10}{'stars/s':>10}{'peak RSS MB':>13}{'shards MB':>11}")
    for n, r in runs.items():
        print(
            f"{n:>8}{r['seconds']:>10.1f}{n / r['seconds']:>10.0f}{r['peak_rss_mb']:>13.0f}"
            f"{r['shard_bytes'] / 2**20:>11.0f}"
        )
    print(f"peak memory {large} / {small}: {result['memory_ratio']:.2f}x")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ingest.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
