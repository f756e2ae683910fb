"""Whole releases on one machine: `specsearch nightly` over 100k, 300k and 1M paired stars.

For each size N, a clean reference release (REF, N/2 stars, no anomalies) and a new release with
2% anomalies (NEW, N/2 stars) go through `specsearch nightly --json`, each in a fresh process,
into a new store: REF's night ingests, embeds, builds the indexes, scores (the calibration) and
reports; NEW's night ingests, embeds, extends the indexes, scores against REF and reports. For
every stage: wall seconds (from the night's own metrics), stars per second, and the peak resident
memory of the whole process tree (the night and its workers, sampled every 0.2 s). Across sizes:
the exponent of each stage's time against N (a least-squares line through log t against log N).

Inputs. The simulator makes about 225 stars/s on this machine, so 1M simulated stars would take
over an hour before the benchmark starts. Each release is therefore simulated once at ``--base``
stars (cached under ``--work``) and grown to N/2 by re-observation: copy c of a star keeps its
labels and anomaly, gets a new source_id (the id's 22 free bits XOR c, so its HEALPix pixel and
split bucket stay), a new obsid, and a fresh Gaussian noise draw from its own errors added to both
spectra. The pipeline's cost does not depend on how varied the stars are; a copy's nearest
neighbours are often its own siblings, so the anomaly scores of this benchmark are not a quality
measure (`bench_anomaly.py` is).

    python benchmarks/scale.py [--sizes 100000 300000 1000000] [--base 25000] [--work DIR]
        [--keep] [--plot docs/plots/scale.png]

Prints a table per size and the exponents, and writes benchmarks/results/scale.json (merged with
the sizes of earlier runs, so sizes may run in separate sittings).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
STAGES = ("ingest", "embed", "index", "score", "report")
NIGHTS = ("REF", "NEW")
# what each release is simulated as: (seed, anomaly fraction)
RELEASES = {"REF": (11, 0.0), "NEW": (12, 0.02)}
ROW_GROUP = 4096


# --- inputs ---------------------------------------------------------------------------------


def base_release(work: Path, release: str, base: int) -> Path:
    """The release simulated once at ``base`` stars (cached): its shard folder."""
    out = work / "base" / release
    meta = out / f"simulation-{release}.json"
    if meta.exists() and json.loads(meta.read_text()).get("n") == base:
        return out / "shards" / f"release={release}"
    from specsearch.sim.simulate import simulate_release

    shutil.rmtree(out, ignore_errors=True)
    seed, fraction = RELEASES[release]
    result = simulate_release(
        out, base, seed, release=release, anomaly_fraction=fraction, show_progress=True
    )
    print(result, flush=True)
    return out / "shards" / f"release={release}"


def grown_release(base_dir: Path, out: Path, n: int, seed: int) -> Path:
    """``n`` rows from the base release's shards: copy 0 as simulated, copy c >= 1 re-observed
    (new ids, fresh noise from each spectrum's own errors). Returns the folder of shard files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    files = sorted(base_dir.glob("*.parquet"))
    n_base = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    copies = math.ceil(n / n_base)
    written = 0
    rng = np.random.default_rng(seed)
    for copy in range(copies):
        path = out / f"part-{copy:05d}.parquet"
        writer = None
        for f in files:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=ROW_GROUP):
                if written >= n:
                    break
                table = pa.Table.from_batches([batch]).slice(0, n - written)
                if copy:
                    table = _reobserve(table, copy, n_base, rng)
                writer = writer or pq.ParquetWriter(path, table.schema)
                writer.write_table(table)
                written += table.num_rows
        if writer is not None:
            writer.close()
    return out


def _reobserve(table, copy: int, n_base: int, rng: np.random.Generator):
    import pyarrow as pa

    def noisy(values: str, errors: str, ivar: bool):
        column = table.column(values).combine_chunks()
        width = column.type.list_size
        flux = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
        err = table.column(errors).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        err = err.reshape(-1, width)
        if ivar:
            with np.errstate(divide="ignore"):
                sigma = np.where(err > 0, 1.0 / np.sqrt(np.where(err > 0, err, 1.0)), 0.0)
        else:
            sigma = np.where(np.isfinite(err), err, 0.0)
        draw = rng.standard_normal(flux.shape, dtype=np.float32)
        new = (flux + np.nan_to_num(sigma * draw)).astype(np.float32)
        new[~np.isfinite(flux)] = flux[~np.isfinite(flux)]  # missing pixels stay missing
        array = pa.FixedSizeListArray.from_arrays(pa.array(new.ravel()), width)
        mask = column.is_null()
        return (
            pa.array(
                [
                    None if m else v
                    for m, v in zip(mask.to_pylist(), array.to_pylist(), strict=True)
                ],
                type=column.type,
            )
            if mask.true_count
            else array
        )

    ids = table.column("source_id").to_numpy() ^ np.int64(copy << 13)
    obsid = table.column("obsid").to_numpy(zero_copy_only=False) + copy * n_base
    table = table.set_column(table.schema.get_field_index("source_id"), "source_id", pa.array(ids))
    table = table.set_column(table.schema.get_field_index("obsid"), "obsid", pa.array(obsid))
    for values, errors, ivar in (
        ("lrs_flux", "lrs_ivar", True),
        ("xp_flux", "xp_flux_error", False),
    ):
        field = table.schema.field(values)
        table = table.set_column(
            table.schema.get_field_index(values), field, noisy(values, errors, ivar)
        )
    return table


# --- one night, measured --------------------------------------------------------------------


def _tree_rss_kb(root: int) -> int:
    """Resident memory of ``root`` and all its descendants, in KB."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    page_kb = os.sysconf("SC_PAGE_SIZE") // 1024
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            parents[int(entry.name)] = int(fields[1])
            rss[int(entry.name)] = int(fields[21]) * page_kb
        except (OSError, ValueError, IndexError):
            continue
    tree, grew = {root}, True
    while grew:
        more = {pid for pid, ppid in parents.items() if ppid in tree} - tree
        grew = bool(more)
        tree |= more
    return sum(rss.get(pid, 0) for pid in tree)


def run_night(source: Path, store: Path, release: str) -> dict:
    """`specsearch nightly --json` in a fresh process, with the tree's RSS sampled meanwhile."""
    cli = Path(sys.executable).with_name("specsearch")
    command = [str(cli), "nightly", str(source), "--store", str(store), "--release", release]
    t0 = time.time()
    process = subprocess.Popen(
        [*command, "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    samples: list[tuple[float, int]] = []

    def sample() -> None:
        while process.poll() is None:
            samples.append((time.time(), _tree_rss_kb(process.pid)))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = process.communicate()
    sampler.join()
    wall = time.time() - t0
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if process.returncode or not lines:
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}): {stderr[-2000:]}")
    summary = json.loads(lines[-1])
    stages = {}
    for stage in STAGES:
        metric = summary["metrics"].get(stage)
        if metric is None:
            continue
        start, stop = metric["started"], metric["started"] + metric["seconds"]
        inside = [kb for t, kb in samples if start <= t <= stop]
        stages[stage] = {
            "seconds": metric["seconds"],
            "peak_rss_mb": round(max(inside, default=0) / 1024, 1),
            "main_process_peak_rss_mb": metric["peak_rss_mb"],
        }
    return {
        "wall_seconds": round(wall, 2),
        "peak_rss_mb": round(max((kb for _, kb in samples), default=0) / 1024, 1),
        "stages": stages,
        "stars": summary["stars"],
        "above_threshold": summary["above_threshold"],
    }


def run_size(work: Path, n: int, base: int, keep: bool, saved=None) -> dict:
    """Both nights at size ``n``; ``saved(result)`` is called after each night, so a run stopped
    part-way keeps the nights it finished."""
    folder = work / f"n{n}"
    shutil.rmtree(folder, ignore_errors=True)
    half = n // 2
    result: dict = {"n": n, "per_release": half, "nights": {}}
    store = folder / "store"
    for release in NIGHTS:
        t0 = time.perf_counter()
        source = grown_release(
            base_release(work, release, base),
            folder / "input" / release,
            half,
            seed=RELEASES[release][0] + n,
        )
        grow = time.perf_counter() - t0
        print(f"{n:,}: {release} input of {half:,} stars made in {grow:.0f} s", flush=True)
        night = run_night(source, store, release)
        night["input_seconds"] = round(grow, 1)
        result["nights"][release] = night
        print(f"{n:,}: {release} night {night['wall_seconds']:.0f} s", flush=True)
        if saved is not None and release != NIGHTS[-1]:
            saved({**result, "partial": True})
        if not keep:
            shutil.rmtree(source)
    result["wall_seconds"] = round(sum(v["wall_seconds"] for v in result["nights"].values()), 1)
    result["peak_rss_mb"] = max(v["peak_rss_mb"] for v in result["nights"].values())
    result["store_gb"] = round(
        sum(p.stat().st_size for p in store.rglob("*") if p.is_file()) / 1e9, 2
    )
    if not keep:
        shutil.rmtree(folder)
    return result


# --- tables ---------------------------------------------------------------------------------


def exponents(sizes: dict[int, dict]) -> dict[str, dict[str, float]]:
    """Slope of log(seconds) against log(N) per night and stage, over the sizes measured."""
    ns = sorted(sizes)
    out: dict[str, dict[str, float]] = {}
    if len(ns) < 2:
        return out
    for night in NIGHTS:
        for stage in (*STAGES, "night"):
            ts = []
            for n in ns:
                entry = sizes[n]["nights"][night]
                ts.append(
                    entry["wall_seconds"]
                    if stage == "night"
                    else entry["stages"].get(stage, {}).get("seconds")
                )
            if any(t is None or t <= 0 for t in ts):
                continue
            slope = np.polyfit(np.log(ns), np.log(ts), 1)[0]
            out.setdefault(night, {})[stage] = round(float(slope), 3)
    return out


def print_tables(sizes: dict[int, dict], fitted: dict) -> None:
    for n in sorted(sizes):
        entry = sizes[n]
        print(
            f"\nN = {n:,} ({entry['per_release']:,} per release): "
            f"{entry['wall_seconds'] / 60:.1f} min, peak {entry['peak_rss_mb'] / 1024:.2f} GB, "
            f"store {entry['store_gb']} GB"
        )
        print(f"{'night':<6}{'stage':<8}{'seconds':>10}{'stars/s':>10}{'peak MB':>10}")
        for night in NIGHTS:
            stages = entry["nights"][night]["stages"]
            for stage, m in stages.items():
                rate = entry["per_release"] / m["seconds"] if m["seconds"] else float("nan")
                print(
                    f"{night:<6}{stage:<8}{m['seconds']:>10.1f}{rate:>10.0f}{m['peak_rss_mb']:>10.0f}"
                )
    if fitted:
        print("\nexponent of time against N (1.0 = linear)")
        for night, stages in fitted.items():
            print(f"{night:<6}" + "  ".join(f"{s} {v:.2f}" for s, v in stages.items()))


def plot(sizes: dict[int, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted(sizes)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for night, style in zip(NIGHTS, ("-", "--"), strict=True):
        for stage in STAGES:
            ts = [sizes[n]["nights"][night]["stages"].get(stage, {}).get("seconds") for n in ns]
            if None in ts:
                continue
            axes[0].loglog(ns, ts, style, marker="o", label=f"{night} {stage}")
        axes[1].plot(
            ns,
            [sizes[n]["nights"][night]["peak_rss_mb"] / 1024 for n in ns],
            style,
            marker="o",
            label=night,
        )
    axes[0].set(xlabel="stars (N, both releases)", ylabel="seconds", title="stage time")
    axes[0].legend(fontsize=7, ncol=2)
    axes[1].axhline(4, color="grey", lw=0.8)
    axes[1].set(xlabel="stars (N)", ylabel="GB", title="peak memory, process tree", ylim=(0, 4.5))
    axes[1].set_xscale("log")
    axes[1].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    parser.add_argument("--base", type=int, default=25_000, help="stars simulated per release")
    parser.add_argument("--work", type=Path, default=Path("scale-work"))
    parser.add_argument("--keep", action="store_true", help="keep the stores and inputs")
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    args = parser.parse_args(argv)
    earlier = json.loads(args.out.read_text()) if args.out.exists() else {}
    sizes = {int(k): v for k, v in earlier.get("sizes", {}).items()}

    def save(result: dict | None = None) -> None:
        if result is not None:
            sizes[result["n"]] = result
        complete = {k: v for k, v in sizes.items() if not v.get("partial")}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {
                    "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                    "base_per_release": args.base,
                    "sizes": {str(k): v for k, v in sorted(sizes.items())},
                    "exponents": exponents(complete),
                },
                indent=2,
            )
        )

    for n in args.sizes:
        save(run_size(args.work, n, args.base, args.keep, save))
    sizes = {k: v for k, v in sizes.items() if not v.get("partial")}
    print_tables(sizes, exponents(sizes))
    if args.plot:
        plot(sizes, args.plot)


if __name__ == "__main__":
    main()
