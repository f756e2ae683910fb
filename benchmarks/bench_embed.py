"""Embedding throughput and memory of the embed stage.

1. Batched pipeline (`SpecCLIPRunner.run_batch`, as `specsearch embed` runs it) against a
   per-spectrum loop over the same model (one forward per star, the way the original release
   runs inference), side by side in one run, on the same simulated stars.
2. Peak resident memory of `specsearch embed` (a fresh process each) on stores of 20k and 200k
   simulated stars: streaming in chunks should keep it flat.

    python benchmarks/bench_embed.py [--model default] [--loop-stars 300] [--sizes 20000 200000]

Prints a table and writes benchmarks/results/embed.json. The model is the shipped default when
installed; else a freshly initialised `small` model (throughput does not depend on the weights).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def _model(model: str, scratch: Path) -> str:
    from specsearch.models.registry import resolve_model

    try:
        resolve_model(model)
        return model
    except Exception:
        from specsearch.models.factory import build_model, save_model

        path = save_model(
            build_model("specclip", "small", variant="pr"), scratch / "small-untrained"
        )
        return str(path)


def _arrays(store: Path, n: int) -> dict[str, np.ndarray]:
    from specsearch.schema import column_matrix
    from specsearch.store import Store

    table = Store(store, create=False).shards().head(n)
    return {
        c: column_matrix(table, c) for c in ("lrs_flux", "lrs_ivar", "xp_flux", "xp_flux_error")
    }


def _paired_rates(
    runner, data: dict, outputs: list[str], n_batched: int, n_loop: int, repeats: int
) -> dict:
    batched, loop = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        runner.run_batch(**{k: v[:n_batched] for k, v in data.items()}, outputs=outputs)
        batched.append(n_batched / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        for i in range(n_loop):  # one star per forward pass
            runner.run_batch(**{k: v[i : i + 1] for k, v in data.items()}, outputs=outputs)
        loop.append(n_loop / (time.perf_counter() - t0))
    return {
        "batched_spectra_per_s": statistics.median(batched),
        "loop_spectra_per_s": statistics.median(loop),
        "ratio": statistics.median(fast / slow for fast, slow in zip(batched, loop, strict=True)),
    }


def throughput(model: str, store: Path, n_batched: int, n_loop: int, repeats: int) -> dict:
    """Side by side, same model and stars: every output of both modalities (what `embed` runs),
    and the XP path alone (XP spectra through encoder, head, decoders and label head)."""
    from specsearch.models.runner import SpecCLIPRunner
    from specsearch.pipeline.embed import EMBED_OUTPUTS

    runner = SpecCLIPRunner(model, device="cpu")
    data = _arrays(store, max(n_batched, n_loop))
    xp_only = {k: v for k, v in data.items() if k.startswith("xp")}
    return {
        "both_modalities": _paired_rates(
            runner, data, list(EMBED_OUTPUTS), n_batched, n_loop, repeats
        ),
        "xp_only": _paired_rates(
            runner,
            xp_only,
            ["xp_embedding", "xp_recon", "lrs_from_xp", "xp_labels"],
            n_batched,
            n_loop,
            repeats,
        ),
        "n_batched": n_batched,
        "n_loop": n_loop,
        "repeats": repeats,
    }


def fresh_process_peak(code: str) -> dict:
    """Run Python ``code`` in a fresh process; returns its wall seconds and peak RSS in MB, from
    VmHWM in /proc (getrusage's ru_maxrss would carry the parent's peak across fork + exec)."""
    code = (
        "import re, time; t=time.perf_counter()\n"
        + code
        + "\nprint('SECONDS', time.perf_counter()-t); "
        "print('PEAK_KB', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    values = dict(
        line.split(" ", 1) for line in out.splitlines() if line.startswith(("PEAK_KB", "SECONDS"))
    )
    return {"peak_rss_mb": int(values["PEAK_KB"]) / 1024, "seconds": float(values["SECONDS"])}


def peak_memory(model: str, store: Path) -> dict:
    """`specsearch embed` of the whole store in a fresh process. Earlier embeddings of the store
    are removed first, so every run embeds every star."""
    shutil.rmtree(store / "embeddings", ignore_errors=True)
    (store / "embeddings").mkdir()
    return fresh_process_peak(
        "from specsearch.pipeline.embed import embed_store; "
        f"print(embed_store({str(store)!r}, model={model!r}, device='cpu', show_progress=False))"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--sizes", type=int, nargs="+", default=[20000, 200000])
    parser.add_argument("--batched-stars", type=int, default=4096)
    parser.add_argument("--loop-stars", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args(argv)

    from specsearch.pipeline.ingest import ingest
    from specsearch.sim.simulate import simulate_release

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-embed-"))
    model = _model(args.model, work)
    stores = {}
    for n in args.sizes:
        sim = work / f"sim{n}"
        if not (sim / "truth.parquet").exists():
            simulate_release(sim, n=n, seed=n, release="BENCH", anomaly_fraction=0.0)
        stores[n] = work / f"store{n}"
        if not (
            stores[n] / "manifest.json"
        ).exists():  # (re-runs reuse the stores: delete to re-embed)
            ingest(sim / "shards" / "release=BENCH", stores[n], "BENCH", show_progress=False)

    speed = throughput(
        model, stores[min(args.sizes)], args.batched_stars, args.loop_stars, args.repeats
    )
    memory = {n: peak_memory(model, stores[n]) for n in args.sizes}
    small, large = min(args.sizes), max(args.sizes)
    result = {
        "model": model,
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPUs",
        "throughput": speed,
        "memory": {str(k): v for k, v in memory.items()},
        "memory_ratio": memory[large]["peak_rss_mb"] / memory[small]["peak_rss_mb"],
    }
    print(f"embedding throughput, model {Path(model).name}, CPU ({result['machine']})")
    print(f"{'path':<36}{'batched /s':>12}{'loop /s':>10}{'ratio':>8}")
    for name, label in (
        ("both_modalities", "LRS + XP, every output (embed)"),
        ("xp_only", "XP alone"),
    ):
        r = speed[name]
        print(
            f"{label:<36}{r['batched_spectra_per_s']:>12.1f}{r['loop_spectra_per_s']:>10.1f}"
            f"{r['ratio']:>7.1f}x"
        )
    print(
        f"(loop = one star per forward pass, as the original release runs inference; "
        f"ratio = median of {args.repeats} paired runs)"
    )
    print(f"\n{'stars':>8}{'embed s':>10}{'stars/s':>10}{'peak RSS MB':>13}")
    for n, m in memory.items():
        print(f"{n:>8}{m['seconds']:>10.1f}{n / m['seconds']:>10.0f}{m['peak_rss_mb']:>13.0f}")
    print(f"peak memory {large} / {small}: {result['memory_ratio']:.2f}x")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "embed.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
