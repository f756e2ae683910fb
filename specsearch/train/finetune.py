"""Stage 3: label heads (teff, logg, fe_h, alpha_m with uncertainties) on the aligned features.

Everything but the label head of the chosen modality is frozen, so the features are computed
once and the head trains on them with the Gaussian negative log-likelihood. The XP head learns
from real Gaia XP spectra with APOGEE labels; the LRS head from (simulated) LRS with their labels.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import SpecsearchError
from ..models.device import choose_device
from ..models.factory import load_model, save_model
from .data import SpectraArrays, load_arrays
from .loop import TrainConfig, Trainer, quiet


@torch.no_grad()
def features(
    model, arrays: SpectraArrays, modality: str, device: torch.device, batch_size: int = 1024
) -> torch.Tensor:
    """Head features (n, d) of one modality, computed in eval mode, batched."""
    model.eval().to(device)
    out = []
    for start in range(0, len(arrays), batch_size):
        part = arrays.subset(slice(start, start + batch_size))
        if modality == "lrs":
            z, stats, ivar = (
                t.to(device) for t in part.tensors(("lrs_z", "lrs_stats", "lrs_ivar"))
            )
            out.append(
                model.lrs_features(z, stats, ivar if model.config.lrs.ivar_channel else None)
                .float()
                .cpu()
            )
        else:
            x, stats = (t.to(device) for t in part.tensors(("xp_x", "xp_stats")))
            out.append(model.xp_features(x, stats).float().cpu())
    return torch.cat(out)


class _HeadOnly(torch.nn.Module):
    """Wraps one label head so the trainer sees only its parameters."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, x):
        return self.head(x)


def finetune(
    model_dir: Path,
    data: list[Path],
    out: Path,
    modality: str = "both",
    cfg: TrainConfig | None = None,
    device: str = "auto",
    log=quiet,
) -> dict:
    """Train the label head(s) of ``modality`` ('lrs', 'xp' or 'both') and save the whole model to ``out``."""
    modalities = ("lrs", "xp") if modality == "both" else (modality,)
    if not set(modalities) <= {"lrs", "xp"}:
        raise SpecsearchError(f"--modality must be lrs, xp or both, not {modality!r}")
    cfg = cfg or TrainConfig(epochs=30)
    dev = choose_device(device)
    model = load_model(model_dir)
    results = {}
    for mod in modalities:
        train = load_arrays(data, "train", (mod,))
        val = load_arrays(data, "val", (mod,))
        labelled = np.isfinite(train.labels).any(axis=1)
        train = train.subset(labelled)
        if len(train) == 0:
            raise SpecsearchError(
                f"no labelled {mod} spectra in the train split of {', '.join(map(str, data))}"
            )
        log(f"finetune {mod}: {len(train)} train, {len(val)} val stars")
        head = model.label_heads[mod]
        known = np.isfinite(train.labels)
        count = np.maximum(known.sum(axis=0), 1)
        mean = np.where(known, train.labels, 0.0).sum(axis=0) / count
        std = np.sqrt(np.where(known, (train.labels - mean) ** 2, 0.0).sum(axis=0) / count)
        # a label no training star has keeps a unit scaler (its head output is then unused)
        head.set_scaler(mean, np.where(std > 0, std, 1.0))
        x_train, x_val = features(model, train, mod, dev), features(model, val, mod, dev)
        wrapper = _HeadOnly(head)
        with tempfile.TemporaryDirectory() as scratch:  # the head's optimiser checkpoints
            trainer = Trainer(
                wrapper,
                lambda m, b: {"loss": m.head.loss(b[0], b[1])},
                lambda m, d, c: None,
                Path(scratch),
                cfg,
                device,
                log,
            )
            results[mod] = trainer.fit(
                [x_train, torch.from_numpy(train.labels)], [x_val, torch.from_numpy(val.labels)]
            )
        if trainer.best_state is not None:  # keep the epoch with the best validation NLL
            wrapper.load_state_dict(trainer.best_state)
        head.eval()
        factors = head.calibrate_sigma(x_val, torch.from_numpy(val.labels))
        log(
            f"finetune {mod}: sigma calibration factors on val "
            + ", ".join(f"{f:.2f}" for f in factors.tolist())
        )
        model.label_heads[mod] = head.cpu()
    model.cpu()
    card = {
        "stage": "finetune",
        "label_data": [str(p) for p in data],
        "label_modalities": list(modalities),
    }
    save_model(model, out, card)
    return results
