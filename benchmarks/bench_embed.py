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


def _gemms(runner, data: dict) -> tuple[float, dict]:
    """FLOPs per star of the embed stage and the matrix products it runs, with their counts.

    Attention runs through the math backend here, so that its two products are seen (the fast
    CPU kernel is opaque to the counter); the products are the same."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    from specsearch.pipeline.embed import EMBED_OUTPUTS

    shapes: dict[tuple, int] = {}

    class Shapes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.__name__.split(".")[0]
            key = None
            if name == "linear":  # x (..., in) @ weight (out, in).T
                x, w = args[0], args[1]
                key = ("mm", (int(np.prod(x.shape[:-1])), x.shape[-1]), (w.shape[1], w.shape[0]))
            elif name in ("addmm", "mm"):
                a, b = (args[1], args[2]) if name == "addmm" else (args[0], args[1])
                key = ("mm", tuple(a.shape), tuple(b.shape))
            elif name in ("bmm", "matmul") and args[0].dim() >= 3:
                a, b = args[0], args[1]
                batch = int(np.prod(a.shape[:-2]))
                key = ("bmm", (batch, *a.shape[-2:]), (batch, *b.shape[-2:]))
            if key is not None:
                shapes[key] = shapes.get(key, 0) + 1
            return func(*args, **(kwargs or {}))

    n = len(data["lrs_flux"])
    runner.model.requires_grad_(False)  # the counter's module hooks need no autograd
    # the counter is the inner mode: it hands on the products it counts (linear as addmm,
    # attention as bmm), which the outer mode records
    with sdpa_kernel(SDPBackend.MATH), Shapes(), FlopCounterMode(display=False) as counter:
        runner.run_batch(**data, outputs=list(EMBED_OUTPUTS))
    return counter.get_total_flops() / n, shapes


def _gflops(fn, flops: float, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return flops / min(times) / 1e9


def efficiency(model: str, store: Path, n: int, repeats: int) -> dict:
    """The embed stage against the hardware, side by side in one run: its FLOPs per star, its
    rate, the fp32 matmul peak of this CPU (2048^3, all threads), and its own matrix products
    timed alone (the most the model's shapes can get from this BLAS)."""
    import torch

    from specsearch.models.runner import SpecCLIPRunner
    from specsearch.pipeline.embed import EMBED_OUTPUTS

    runner = SpecCLIPRunner(model, device="cpu")
    data = _arrays(store, n)
    batch = {k: v[: runner.batch_size] for k, v in data.items()}
    flops_per_star, shapes = _gemms(runner, batch)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    rates, peaks = [], []
    for _ in range(repeats):
        peaks.append(_gflops(lambda: torch.mm(a, b), 2 * 2048**3))
        t0 = time.perf_counter()
        runner.run_batch(**data, outputs=list(EMBED_OUTPUTS))
        rates.append(n / (time.perf_counter() - t0))
    gemm_flops, gemm_seconds = 0.0, 0.0
    for (name, sa, sb), count in shapes.items():
        x, y = torch.randn(*sa), torch.randn(*sb)
        flops = 2.0 * float(np.prod(sa)) * sb[-1]
        op = (lambda x=x, y=y: torch.bmm(x, y)) if name == "bmm" else (lambda x=x, y=y: x @ y)
        gemm_flops += flops * count
        gemm_seconds += flops * count / (_gflops(op, flops) * 1e9)
    rate, peak = statistics.median(rates), statistics.median(peaks)
    return {
        "batch_size": runner.batch_size,
        "gflop_per_star": flops_per_star / 1e9,
        "stars_per_s": rate,
        "achieved_gflops": rate * flops_per_star / 1e9,
        "matmul_peak_gflops": peak,
        "fraction_of_peak": statistics.median(
            r * flops_per_star / 1e9 / p for r, p in zip(rates, peaks, strict=True)
        ),
        "own_gemms_alone_gflops": gemm_flops / gemm_seconds / 1e9,
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
    parser.add_argument(
        "--efficiency-only",
        action="store_true",
        help="only the FLOP rate against the matmul peak (writes embed_efficiency.json)",
    )
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

    hardware = efficiency(model, stores[min(args.sizes)], args.batched_stars, args.repeats)
    _print_efficiency(hardware)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "embed_efficiency.json").write_text(json.dumps(hardware, indent=2) + "\n")
    if args.efficiency_only:
        return
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


def _print_efficiency(h: dict) -> None:
    print(
        f"embed on CPU: {h['gflop_per_star']:.4f} GFLOP per star (LRS + XP, every output), "
        f"{h['stars_per_s']:.0f} stars/s at batch {h['batch_size']} = "
        f"{h['achieved_gflops']:.1f} GFLOP/s; fp32 matmul peak {h['matmul_peak_gflops']:.1f} "
        f"GFLOP/s: {100 * h['fraction_of_peak']:.0f}% of peak (median of {h['repeats']} paired "
        f"runs). The model's own matrix products alone reach {h['own_gemms_alone_gflops']:.1f} "
        f"GFLOP/s ({100 * h['own_gemms_alone_gflops'] / h['matmul_peak_gflops']:.0f}% of peak)."
    )


if __name__ == "__main__":
    main()
