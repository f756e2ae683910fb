"""Benchmark: Gaia XP continuous -> sampled conversion, specsearch's batched matrix products vs
``gaiaxpy.calibrate``, on synthetic sources built from one real star.

The sources are Gaia DR3 5937083312263887616 (astroquery's test product) with its coefficients
redrawn from their own covariance (errors and the real correlations); every source keeps the
star's errors and correlations. Prints a table and writes benchmarks/results/xp_convert.json.

    python benchmarks/bench_xp_convert.py            # 10,000 sources (GaiaXPy takes minutes)
    python benchmarks/bench_xp_convert.py --n 500    # quick run
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import os
import platform
import statistics
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from specsearch.surveys.gaia_xp import (
    BANDS,
    N_XP_BASES,
    coefficient_covariance,
    continuous_to_sampled,
    design_matrix,
    sampled_from_columns,
)

STAR = 5937083312263887616
RESULTS = Path(__file__).resolve().parent / "results" / "xp_convert.json"


def star_csv_row() -> dict[str, str]:
    """The star's XP_CONTINUOUS row, as text, from astroquery's bundled datalink zip (CSV)."""
    spec = importlib.util.find_spec("astroquery")
    if spec is None or spec.origin is None:
        raise SystemExit("astroquery is needed for the real star's coefficients")
    path = Path(spec.origin).parent / "gaia" / "tests" / "data"
    with zipfile.ZipFile(path / f"gaia_dr3_source_id_{STAR}_dl_products_csv.zip") as archive:
        name = next(n for n in archive.namelist() if n.startswith("XP_CONTINUOUS"))
        return next(csv.DictReader(io.StringIO(archive.read(name).decode())))


def real_star() -> dict[str, np.ndarray]:
    """The star's XP_CONTINUOUS row with its arrays as numpy."""
    return {
        key: np.array([float(v) for v in value.strip("()").split(",")])
        if value.startswith("(")
        else float(value)
        for key, value in star_csv_row().items()
    }


def write_archive_csv(sources: dict[str, np.ndarray], path: Path) -> Path:
    """The sources as one XP_CONTINUOUS CSV in the archive's own layout (the star's row with the
    redrawn coefficients and ids of its own), as a user downloads it."""
    template = star_csv_row()
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(template))
        writer.writeheader()
        for i, source_id in enumerate(sources["source_id"]):
            row = dict(template, source_id=str(int(source_id)))
            for band in BANDS:
                values = sources[f"{band}_coefficients"][i]
                row[f"{band}_coefficients"] = "(" + ", ".join(repr(float(v)) for v in values) + ")"
            writer.writerow(row)
    return path


def from_file(sources: dict[str, np.ndarray]) -> dict:
    """File -> sampled spectra, parsing included: specsearch's reader against gaiaxpy.calibrate
    on the same CSV file."""
    import gaiaxpy
    import pyarrow as pa

    from specsearch.schema import column_matrix
    from specsearch.surveys.gaia_xp import read_gaia_xp

    with tempfile.TemporaryDirectory() as tmp:
        path = write_archive_csv(sources, Path(tmp) / "XP_CONTINUOUS.csv")
        ours_wall, ours_cpu, parts = timed(lambda: list(read_gaia_xp(path, "BENCH")))
        ref_wall, ref_cpu, (spectra, _) = timed(
            lambda: gaiaxpy.calibrate(str(path), truncation=False, save_file=False)
        )
        size = path.stat().st_size
    table = pa.concat_tables([shards for shards, _ in parts])
    order = np.argsort(table.column("source_id").to_numpy())
    flux = column_matrix(table, "xp_flux")[order]
    reference = np.stack(spectra.sort_values("source_id")["flux"])
    return {
        "csv_megabytes": size / 2**20,
        "specsearch_wall_seconds": ours_wall,
        "specsearch_cpu_seconds": ours_cpu,
        "gaiaxpy_wall_seconds": ref_wall,
        "gaiaxpy_cpu_seconds": ref_cpu,
        "speedup_wall": ref_wall / ours_wall,
        # the shards store float32: agreement to float32 precision is all there is to see here
        "max_relative_difference_flux_float32": float(np.max(np.abs(flux / reference - 1.0))),
    }


def synthetic_sources(star: dict[str, np.ndarray], n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """n sources: coefficients ~ N(star, C_star) per band; errors and correlations the star's."""
    rng = np.random.default_rng(seed)
    sources: dict[str, np.ndarray] = {"source_id": np.arange(1, n + 1, dtype=np.int64)}
    for band in BANDS:
        errors = star[f"{band}_coefficient_errors"]
        correlations = star[f"{band}_coefficient_correlations"]
        chol = np.linalg.cholesky(coefficient_covariance(errors[None], correlations[None])[0])
        sources[f"{band}_coefficients"] = (
            star[f"{band}_coefficients"] + rng.standard_normal((n, N_XP_BASES)) @ chol.T
        )
        sources[f"{band}_coefficient_errors"] = np.broadcast_to(errors, (n, N_XP_BASES)).copy()
        sources[f"{band}_coefficient_correlations"] = np.broadcast_to(
            correlations, (n, correlations.size)
        ).copy()
        sources[f"{band}_standard_deviation"] = np.full(n, star[f"{band}_standard_deviation"])
    return sources


def convert_with_correlations(sources: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The readers' path: errors and flat correlations straight into two matrix products per band."""
    return sampled_from_columns(sources)


def convert_with_covariances(sources: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The general path: (n, 55, 55) covariances built with einsum, then diag(D^T C D)."""
    covariances = [
        coefficient_covariance(
            sources[f"{band}_coefficient_errors"], sources[f"{band}_coefficient_correlations"]
        )
        for band in BANDS
    ]
    return continuous_to_sampled(
        sources["bp_coefficients"], sources["rp_coefficients"], *covariances
    )


def timed(function, *args):
    """(wall seconds, CPU seconds of this process, result): CPU time is less sensitive to other
    processes sharing the machine, wall time is what a user waits."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args)
    return time.perf_counter() - wall, time.process_time() - cpu, result


def median_timing(function, sources, repeats: int) -> tuple[float, float, list[float], tuple]:
    walls, cpus, result = [], [], None
    for _ in range(repeats):
        wall, cpu, result = timed(function, sources)
        walls.append(wall)
        cpus.append(cpu)
    return statistics.median(walls), statistics.median(cpus), walls, result


def gaiaxpy_calibrate(
    sources: dict[str, np.ndarray],
) -> tuple[float, float, np.ndarray, np.ndarray, str]:
    import gaiaxpy
    import pandas as pd

    frame = pd.DataFrame({"source_id": sources["source_id"]})
    for band in BANDS:
        frame[f"{band}_n_parameters"] = N_XP_BASES
        frame[f"{band}_standard_deviation"] = sources[f"{band}_standard_deviation"]
        for name in ("coefficients", "coefficient_errors", "coefficient_correlations"):
            frame[f"{band}_{name}"] = list(sources[f"{band}_{name}"])
    wall, cpu, (spectra, _) = timed(
        lambda: gaiaxpy.calibrate(frame, truncation=False, save_file=False)
    )
    spectra = spectra.sort_values("source_id")
    return (
        wall,
        cpu,
        np.stack(spectra["flux"]),
        np.stack(spectra["flux_error"]),
        gaiaxpy.__version__,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="number of sources (default 10,000)")
    parser.add_argument("--repeats", type=int, default=7, help="repeats of specsearch's conversion")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    start = time.perf_counter()
    design_matrix()
    load_seconds = time.perf_counter() - start
    sources = synthetic_sources(real_star(), args.n)
    # specsearch is timed before and after GaiaXPy, so both see the machine in a similar state
    before = median_timing(convert_with_correlations, sources, args.repeats)
    cov_wall, cov_cpu, _, (_, cov_error) = median_timing(convert_with_covariances, sources, 3)
    print(
        f"specsearch: {args.n} sources in {before[0]:.3f} s (median of {args.repeats}); running gaiaxpy ...",
        flush=True,
    )
    gaiaxpy_wall, gaiaxpy_cpu, reference_flux, reference_error, gaiaxpy_version = gaiaxpy_calibrate(
        sources
    )
    after = median_timing(convert_with_correlations, sources, args.repeats)
    with threadpool_limits(1):  # on a busy machine one BLAS thread wastes less time spinning
        one_thread = median_timing(convert_with_correlations, sources, args.repeats)
    print("from the archive's CSV file, parsing included ...", flush=True)
    file_run = from_file(sources)
    walls = before[2] + after[2]
    fast_wall = statistics.median(walls)
    fast_cpu = statistics.median([before[1], after[1]])
    flux, flux_error = after[3]

    flux_rel = float(np.max(np.abs(flux / reference_flux - 1.0)))
    error_rel = float(np.max(np.abs(flux_error / reference_error - 1.0)))
    cov_error_rel = float(np.max(np.abs(cov_error / reference_error - 1.0)))
    load = os.getloadavg()[0]
    rows = [
        ("gaiaxpy.calibrate", gaiaxpy_wall, gaiaxpy_cpu, "reference", "reference"),
        (
            "specsearch, errors + correlations",
            fast_wall,
            fast_cpu,
            f"{flux_rel:.1e}",
            f"{error_rel:.1e}",
        ),
        (
            "  the same, 1 BLAS thread",
            one_thread[0],
            one_thread[1],
            f"{flux_rel:.1e}",
            f"{error_rel:.1e}",
        ),
        (
            "specsearch, (n,55,55) covariances",
            cov_wall,
            cov_cpu,
            f"{flux_rel:.1e}",
            f"{cov_error_rel:.1e}",
        ),
    ]
    print(
        f"\nGaia XP continuous -> sampled, {args.n} sources x 343 samples, flux and flux_error "
        f"({os.cpu_count()} CPUs, {platform.machine()}, load average {load:.1f} at the end)"
    )
    print(
        f"{'method':<36} {'wall s':>9} {'speed-up':>9} {'CPU s':>9} {'speed-up':>9} "
        f"{'max rel flux':>13} {'max rel error':>14}"
    )
    for name, wall, cpu, flux_text, error_text in rows:
        print(
            f"{name:<36} {wall:>9.3f} {gaiaxpy_wall / wall:>8.0f}x {cpu:>9.3f} {gaiaxpy_cpu / cpu:>8.0f}x "
            f"{flux_text:>13} {error_text:>14}"
        )
    print(
        f"{'from a CSV file (' + format(file_run['csv_megabytes'], '.0f') + ' MB):':<36}"
        f" gaiaxpy {file_run['gaiaxpy_wall_seconds']:.2f} s, specsearch's reader "
        f"{file_run['specsearch_wall_seconds']:.2f} s: {file_run['speedup_wall']:.1f}x"
    )
    print(
        f"(specsearch wall times, all {len(walls)} runs: {', '.join(f'{w:.2f}' for w in walls)} s; "
        f"design matrix load, once per process: {load_seconds * 1e3:.1f} ms)"
    )

    result = {
        "n_sources": args.n,
        "specsearch_wall_seconds_median": fast_wall,
        "specsearch_wall_seconds_all": walls,
        "specsearch_cpu_seconds_median": fast_cpu,
        "specsearch_one_blas_thread_wall_seconds_median": one_thread[0],
        "specsearch_one_blas_thread_cpu_seconds_median": one_thread[1],
        "speedup_wall_one_blas_thread": gaiaxpy_wall / one_thread[0],
        "specsearch_covariance_path_wall_seconds_median": cov_wall,
        "specsearch_covariance_path_cpu_seconds_median": cov_cpu,
        "gaiaxpy_wall_seconds": gaiaxpy_wall,
        "gaiaxpy_cpu_seconds": gaiaxpy_cpu,
        "speedup_wall": gaiaxpy_wall / fast_wall,
        "speedup_cpu": gaiaxpy_cpu / fast_cpu,
        "speedup_wall_covariance_path": gaiaxpy_wall / cov_wall,
        "max_relative_difference_flux": flux_rel,
        "max_relative_difference_flux_error": error_rel,
        "max_relative_difference_flux_error_covariance_path": cov_error_rel,
        "from_csv_file": file_run,
        "design_matrix_load_seconds": load_seconds,
        "gaiaxpy_version": gaiaxpy_version,
        "numpy_version": np.__version__,
        "cpu_count": os.cpu_count(),
        "load_average_1min_at_end": load,
        "machine": platform.machine(),
        "sources": f"Gaia DR3 {STAR} coefficients redrawn from their covariance (seed 0)",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
