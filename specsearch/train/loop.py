"""One training loop for every stage: AdamW, warm-up + cosine, clipping, checkpoints, resume.

Improvements over the published recipe: the cosine decays to ``min_lr_ratio * lr`` (the published
``lr // 100`` is 0 for any lr < 100), bf16 autocast on CUDA, and every checkpoint is safetensors
+ JSON (model, optimiser state and loop state), so a run resumes exactly where it stopped.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import SpecsearchError
from ..files import atomic_path, write_json_atomic
from ..models.device import choose_device

STATE_FILE = "train_state.json"
OPTIM_FILE = "optimizer.safetensors"
METRICS_FILE = "metrics.jsonl"


def quiet(message: str) -> None:
    """The default log of the training stages: say nothing (the CLI passes its own)."""


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    patience: int = 0  # epochs without validation improvement before stopping; 0 = never stop early
    max_minutes: float = 0.0  # stop after the epoch in which this wall time is spent; 0 = no limit
    stop_after: int = 0  # stop this run after so many epochs (resumable later); 0 = run to the end


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine down to cfg.min_lr_ratio * cfg.lr."""
    warmup = max(1, int(cfg.warmup_fraction * total))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = cfg.min_lr_ratio * cfg.lr
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = opt.state_dict()
    tensors, meta = {}, {"param_groups": state["param_groups"], "state": {}}
    for pid, pstate in state["state"].items():
        meta["state"][str(pid)] = {}
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                meta["state"][str(pid)][key] = value
    return tensors, meta


def _restore_optimizer(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict
) -> None:
    state: dict = {}
    for pid, extra in meta["state"].items():
        state[int(pid)] = dict(extra)
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


class Trainer:
    """Runs ``loss_fn(model, batch) -> dict with 'loss'`` over a tensor dataset.

    ``save_fn(model, out_dir, card)`` writes the model (safetensors + JSON); the trainer adds the
    optimiser and loop state beside it after every epoch, and ``best/`` for the best validation loss.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[nn.Module, list[torch.Tensor]], dict[str, torch.Tensor]],
        save_fn: Callable[[nn.Module, Path, dict], None],
        out: Path,
        cfg: TrainConfig,
        device: str = "auto",
        log: Callable[[str], None] | None = None,
        lr_scales: dict[str, float] | None = None,
    ):
        self.model, self.loss_fn, self.save_fn = model, loss_fn, save_fn
        self.out, self.cfg, self.log = Path(out), cfg, log or quiet
        self.device = choose_device(device)
        self.model.to(self.device)
        # lr_scales: {parameter-name prefix: factor on the learning rate} (e.g. a slower encoder)
        scales = lr_scales or {}
        groups: dict[float, list[nn.Parameter]] = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                scale = next((v for k, v in scales.items() if name.startswith(k)), 1.0)
                groups.setdefault(scale, []).append(param)
        if not groups:
            raise SpecsearchError("nothing to train: every parameter is frozen")
        self.optimizer = torch.optim.AdamW(
            [{"params": params, "lr_scale": scale} for scale, params in groups.items()],
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            betas=cfg.betas,
        )
        self.autocast = self.device.type == "cuda"
        self.best_state: dict[str, torch.Tensor] | None = None

    def _batches(self, tensors: list[torch.Tensor], epoch: int, shuffle: bool):
        n = len(tensors[0])
        if shuffle:
            order = torch.from_numpy(
                np.random.default_rng(self.cfg.seed * 1000 + epoch).permutation(n)
            )
        else:
            order = torch.arange(n)
        for start in range(0, n, self.cfg.batch_size):
            idx = order[start : start + self.cfg.batch_size]
            if shuffle and len(idx) < 2:
                continue  # BatchNorm and InfoNCE need at least two rows
            yield [t[idx].to(self.device, non_blocking=True) for t in tensors]

    def _step_loss(self, batch: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            return self.loss_fn(self.model, batch)

    def evaluate(self, tensors: list[torch.Tensor]) -> dict[str, float]:
        self.model.eval()
        sums: dict[str, float] = {}
        count = 0
        torch.manual_seed(self.cfg.seed)  # masked losses draw masks: fix them for comparable epochs
        with torch.no_grad():
            for batch in self._batches(tensors, 0, shuffle=False):
                terms = self._step_loss(batch)
                n = len(batch[0])
                for k, v in terms.items():
                    if torch.is_tensor(v) and v.ndim == 0:
                        sums[k] = sums.get(k, 0.0) + float(v) * n
                count += n
        return {k: v / max(count, 1) for k, v in sums.items()}

    def _checkpoint(
        self, epoch: int, step: int, best: float, bad_epochs: int, history: list
    ) -> None:
        self.save_fn(self.model, self.out, {"train": asdict(self.cfg), "epochs_done": epoch})
        tensors, meta = _flatten_optimizer(self.optimizer)
        with atomic_path(self.out / OPTIM_FILE) as tmp:
            save_file(tensors, str(tmp))
        state = {
            "epoch": epoch,
            "step": step,
            "best": best,
            "bad_epochs": bad_epochs,
            "optimizer": meta,
            "config": asdict(self.cfg),
            "history": history,
        }
        write_json_atomic(
            state, self.out / STATE_FILE
        )  # written last: marks the checkpoint complete

    def fit(
        self, train: list[torch.Tensor], val: list[torch.Tensor] | None = None, resume: bool = False
    ) -> dict:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        steps_per_epoch = math.ceil(len(train[0]) / cfg.batch_size)
        total = steps_per_epoch * cfg.epochs
        epoch, step, best, bad_epochs, history = 0, 0, math.inf, 0, []
        if resume and (self.out / STATE_FILE).exists():
            state = json.loads((self.out / STATE_FILE).read_text())
            from ..models.factory import load_model

            self.model.load_state_dict(load_model(self.out).state_dict())
            _restore_optimizer(
                self.optimizer, load_file(str(self.out / OPTIM_FILE)), state["optimizer"]
            )
            epoch, step, best, bad_epochs = (
                state["epoch"],
                state["step"],
                state["best"],
                state["bad_epochs"],
            )
            history = state["history"]
            self.log(f"resumed at epoch {epoch}")
        started, first_epoch = time.perf_counter(), epoch
        metrics_path = self.out / METRICS_FILE
        if epoch == 0:
            metrics_path.unlink(missing_ok=True)  # a fresh run starts a fresh log
        finished = epoch >= cfg.epochs or bool(cfg.patience and bad_epochs >= cfg.patience)
        while not finished:
            self.model.train()
            torch.manual_seed(cfg.seed * 1000 + epoch)
            t0, sums, count = time.perf_counter(), {}, 0
            for batch in self._batches(train, epoch, shuffle=True):
                for group in self.optimizer.param_groups:
                    group["lr"] = lr_at(step, total, cfg) * group.get("lr_scale", 1.0)
                terms = self._step_loss(batch)
                self.optimizer.zero_grad(set_to_none=True)
                terms["loss"].backward()
                if cfg.grad_clip > 0:
                    nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                self.optimizer.step()
                step += 1
                n = len(batch[0])
                for k, v in terms.items():
                    if torch.is_tensor(v) and v.ndim == 0:
                        sums[k] = sums.get(k, 0.0) + float(v.detach()) * n
                count += n
            epoch += 1
            record = {
                "epoch": epoch,
                "step": step,
                "lr": lr_at(step - 1, total, cfg),
                "seconds": round(time.perf_counter() - t0, 2),
            }
            record.update({f"train_{k}": v / max(count, 1) for k, v in sums.items()})
            if val is not None and len(val[0]):
                record.update({f"val_{k}": v for k, v in self.evaluate(val).items()})
            current = record.get("val_loss", record.get("train_loss", math.inf))
            improved = current < best
            if improved:
                best, bad_epochs = current, 0
            else:
                bad_epochs += 1
            history.append(record)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            self.log(
                " ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in record.items()
                )
            )
            if improved:
                self.best_state = {
                    k: v.detach().clone() for k, v in self.model.state_dict().items()
                }
                self.save_fn(
                    self.model, self.out / "best", {"train": asdict(cfg), "epochs_done": epoch}
                )
            self._checkpoint(epoch, step, best, bad_epochs, history)
            finished = epoch >= cfg.epochs
            if cfg.patience and bad_epochs >= cfg.patience:
                self.log(f"early stop: no improvement for {bad_epochs} epochs")
                finished = True
            if finished:
                break
            if cfg.max_minutes and (time.perf_counter() - started) / 60 > cfg.max_minutes:
                self.log(f"time budget of {cfg.max_minutes} min spent")
                break
            if cfg.stop_after and epoch - first_epoch >= cfg.stop_after:
                self.log(f"stopped after {cfg.stop_after} epoch(s); resume to continue")
                break
        # finished: every epoch ran or early stopping ended it; otherwise resume to go on
        return {"best": best, "epochs": epoch, "history": history, "finished": finished}
