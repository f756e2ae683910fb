"""Simulator throughput: stars per second of ``specsearch simulate``, end to end and by stage.

End to end is ``specsearch.sim.simulate.simulate_release`` into a temporary folder (shards + truth,
compressed Parquet, the writer overlapping the simulation in a thread). The stages are timed on
one chunk of --chunk stars: the LRS simulator, the XP emulator (shape, errors, noise), building
the Arrow tables and writing them. The machine is reported with its load average, because a
shared machine's other work slows every number here.

    python benchmarks/bench_simulate.py --n 20000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from threadpoolctl import threadpool_limits

from specsearch.files import parquet_options
from specsearch.schema import make_shard_table
from specsearch.sim import lrs_synth, simulate

RESULTS = Path(__file__).parent / "results"


def best_of(repeat: int, func) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        func()
        times.append(time.perf_counter() - t0)
    return min(times)


def stage_times(n: int, repeat: int) -> dict[str, float]:
    """Seconds per stage for n stars (best of ``repeat``)."""
    emulator = simulate.default_emulator()
    rng = np.random.default_rng(0)
    labels = emulator.sample_labels(n, rng)
    lrs_labels = {
        "teff": labels["teff"],
        "logg": labels["logg"],
        "fe_h": labels["fe_h"],
        "alpha_m": labels["alpha_m"],
        "a_v": labels["extinction"],
        "snr": simulate.snr_from_g(labels["g_mag"], rng),
        "rv": simulate.draw_rv(labels["fe_h"], rng),
    }
    out: dict[str, float] = {}
    out["labels"] = best_of(repeat, lambda: emulator.sample_labels(n, rng))
    out["lrs_synthesize"] = best_of(repeat, lambda: lrs_synth.synthesize_lrs(lrs_labels, rng))
    shape = emulator.predict_shape(
        labels["teff"], labels["logg"], labels["fe_h"], labels["alpha_m"], labels["extinction"]
    )
    norm = emulator.norm_from_g(labels["g_mag"], shape)
    out["xp_predict_shape"] = best_of(
        repeat,
        lambda: emulator.predict_shape(
            labels["teff"], labels["logg"], labels["fe_h"], labels["alpha_m"], labels["extinction"]
        ),
    )
    out["xp_sample_error"] = best_of(repeat, lambda: emulator.sample_error(shape, norm, rng))
    error = emulator.sample_error(shape, norm, rng)
    out["xp_sample_noise"] = best_of(repeat, lambda: emulator.sample_noise(error, rng))
    flux, ivar = lrs_synth.synthesize_lrs(lrs_labels, rng)

    def table():
        return make_shard_table(
            np.arange(n),
            "BENCH",
            obsid=np.arange(n),
            lrs_flux=flux,
            lrs_ivar=ivar,
            xp_flux=(shape * norm[:, None]).astype(np.float32),
            xp_flux_error=error.astype(np.float32),
        )

    out["make_shard_table"] = best_of(repeat, table)
    tab = table()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.parquet"
        out["write_parquet"] = best_of(
            repeat,
            lambda: pq.write_table(
                tab, path, row_group_size=simulate.ROW_GROUP_SIZE, **parquet_options(tab.schema)
            ),
        )
        out["bytes_per_star"] = path.stat().st_size / n
    chunk = simulate.Chunk(np.arange(n), np.full(n, simulate.NORMAL, dtype=object), np.full(n, -1))
    out["simulate_chunk"] = best_of(
        repeat, lambda: simulate.simulate_chunk(chunk, "BENCH", 0, 0, None, emulator, rng)
    )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20000, help="stars in the end-to-end run")
    parser.add_argument(
        "--chunk", type=int, default=simulate.CHUNK_SIZE, help="stars per stage timing"
    )
    parser.add_argument("--repeat", type=int, default=3, help="stage timings: best of this many")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "simulate.json")
    args = parser.parse_args(argv)

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    simulate.default_emulator()
    lrs_synth.synthesize_lrs(
        {"teff": np.array([5000.0])}, np.random.default_rng(0)
    )  # build the basis
    warmup = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t0, c0 = time.perf_counter(), time.process_time()
        summary = simulate.simulate_release(
            tmp, n=args.n, seed=args.seed, release="BENCH", anomaly_fraction=0.02
        )
        end_to_end, cpu = time.perf_counter() - t0, time.process_time() - c0
        size = sum(p.stat().st_size for p in Path(tmp).rglob("*.parquet"))
    # stages run single-threaded, as inside simulate_release (its threads are the parallelism)
    with threadpool_limits(limits=1, user_api="blas"), simulate._torch_threads(1):
        stages = stage_times(args.chunk, args.repeat)
    load_after = os.getloadavg()

    rate = args.n / end_to_end
    print(summary)
    print(
        f"\nend to end: {args.n} stars in {end_to_end:.2f} s = {rate:,.0f} stars/s "
        f"({size / args.n / 1024:.1f} KiB per star on disk; warm-up {warmup:.1f} s not counted)"
    )
    print(
        f"CPU time of this process: {cpu:.2f} s = {cpu / args.n * 1e3:.3f} ms per star "
        f"(all threads; {args.n / cpu:,.0f} stars per CPU-second)"
    )
    print(f"\nstages for {args.chunk} stars (best of {args.repeat}):")
    for name, seconds in stages.items():
        if name == "bytes_per_star":
            continue
        print(f"  {name:18s} {seconds * 1000:8.1f} ms  {args.chunk / seconds:>10,.0f} stars/s")
    print(
        f"\nload average before/after: {load_before[0]:.2f} / {load_after[0]:.2f} on {os.cpu_count()} CPUs"
    )

    result = {
        "benchmark": "simulate",
        "n": args.n,
        "seconds": round(end_to_end, 3),
        "cpu_seconds": round(cpu, 3),
        "stars_per_cpu_second": round(args.n / cpu, 1),
        "stars_per_second": round(rate, 1),
        "bytes_per_star": round(size / args.n, 1),
        "warmup_seconds": round(warmup, 2),
        "stage_chunk": args.chunk,
        "stage_seconds": {k: round(v, 4) for k, v in stages.items() if k != "bytes_per_star"},
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_before": round(load_before[0], 2),
            "load_average_after": round(load_after[0], 2),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "numpy": np.__version__,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
