"""Make a large store of real model embeddings for the search benchmarks.

N simulated stars (labels bootstrapped from the real train split, XP spectra from the emulator
with the real noise model) are encoded by a SpecCLIP model's XP encoder, in batches, and written
as a store: catalog-only shards (source_id, release, labels; no spectra, to keep the disk small)
and XP embedding Parquet in the embed stage's format, for the stars with a usable XP (as the
embed stage, it writes none for a star the encoder cannot use). Source ids skip the reserved
bucket.

    python benchmarks/make_embedding_store.py --store /tmp/store1m --n 1000000 [--model default]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

BATCH = 20_000


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--model", default="default")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)

    from specsearch.files import write_parquet_atomic
    from specsearch.models.runner import SpecCLIPRunner
    from specsearch.schema import embedding_schema, make_shard_table
    from specsearch.sim.xp_emulator import XPEmulator
    from specsearch.splits import RESERVED_BUCKET, bucket
    from specsearch.store import Store

    rng = np.random.default_rng(args.seed)
    emulator = XPEmulator.load_default()
    runner = SpecCLIPRunner(args.model, device="cpu", batch_size=4096)
    store = Store(args.store)
    release = "BENCH"
    candidates = np.arange(1, int(args.n * 1.2) + 2, dtype=np.int64) * 977 + 10**15
    source_ids = candidates[bucket(candidates) != RESERVED_BUCKET][: args.n]
    shards, unusable, t0 = [], 0, time.perf_counter()
    schema = embedding_schema(runner.embed_dim)
    for start in range(0, args.n, BATCH):
        ids = source_ids[start : start + BATCH]
        labels = emulator.sample_labels(len(ids), rng)
        flux, error = emulator.sample_spectrum(
            labels["teff"],
            labels["logg"],
            labels["fe_h"],
            labels["alpha_m"],
            labels["extinction"],
            g_mag=labels["g_mag"],
            rng=rng,
        )
        out = runner.run_batch(xp_flux=flux, xp_flux_error=error, outputs=["xp_embedding"])
        # as the embed stage does: a star with no usable XP (no positive flux over 500-600 nm,
        # e.g. a cool giant behind heavy extinction) has a NaN embedding and gets no row
        usable = out["has_xp"]
        unusable += int((~usable).sum())
        vectors = out["xp_embedding"][usable]
        n = len(vectors)
        columns = {field.name: pa.nulls(n, field.type) for field in schema}
        columns["source_id"] = pa.array(ids[usable], pa.int64())
        columns["modality"] = pa.array(["xp"] * n, pa.string())
        columns["model_id"] = pa.array([runner.model_id] * n, pa.string())
        columns["embedding"] = pa.FixedSizeListArray.from_arrays(
            pa.array(vectors.astype(np.float16).ravel(), pa.float16()), runner.embed_dim
        )
        write_parquet_atomic(
            pa.table(columns, schema=schema),
            store.embedding_path(release, "xp", f"part-00000-r{start:08d}.parquet"),
            row_group_size=4096,
        )
        known = labels["metallicity_known"]
        shards.append(
            make_shard_table(
                ids,
                release,
                labels={
                    "teff": labels["teff"],
                    "logg": labels["logg"],
                    "fe_h": np.where(known, labels["fe_h"], np.nan),
                    "alpha_m": np.where(known, labels["alpha_m"], np.nan),
                },
            )
        )
        done = start + len(ids)
        print(
            f"\r{done:,}/{args.n:,} stars, {done / (time.perf_counter() - t0):,.0f} stars/s",
            end="",
            flush=True,
        )
    print()
    store.write_release(release, shards, rows_per_file=250_000)
    store.record_embeddings(runner.model_id)
    print(
        f"store {args.store}: {args.n:,} stars, {args.n - unusable:,} with {runner.model_id} "
        f"XP embeddings ({unusable:,} without a usable XP) in {time.perf_counter() - t0:.0f} s"
    )


if __name__ == "__main__":
    main()
