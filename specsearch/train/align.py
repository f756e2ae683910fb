"""Stage 2: CLIP alignment of the two pre-trained encoders on paired stars.

The encoders are frozen (as published); the LRS attention-pooling head, the XP MLP head, the
learnable temperature and, for the ``pr``/``split`` variants, the reconstruction and
cross-prediction decoders are trained on: InfoNCE + L1 reconstruction + L1 cross-prediction.
Optionally the (small) XP encoder trains too, at a lower learning rate.

The frozen LRS encoder gives every spectrum the same token states in every epoch, so they are
computed once (float16, ~28 kB a star) and each step runs only the heads and decoders: the
transformer's forward pass was most of an epoch's time.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import SpecsearchError
from ..models.device import choose_device
from ..models.factory import build_model, load_model, save_model
from .data import load_arrays
from .loop import TrainConfig, Trainer, quiet

PAIR_INPUTS = ("lrs_z", "lrs_stats", "lrs_ivar", "xp_x", "xp_stats")


def _align_loss(model, batch):
    lrs_z, lrs_stats, lrs_ivar, xp_x, xp_stats, *tokens = batch
    return model.alignment_loss(
        lrs_z, lrs_stats, xp_x, xp_stats, lrs_ivar=lrs_ivar, lrs_tokens=(tokens or [None])[0]
    )


@torch.no_grad()
def lrs_tokens(model, tensors: list[torch.Tensor], device, batch_size: int = 256) -> torch.Tensor:
    """The frozen LRS encoder's token states (n, tokens, width) float16 on the CPU, batched."""
    encoder = model.lrs_encoder.eval().to(device)
    lrs_z, lrs_stats, lrs_ivar = tensors[:3]
    use_ivar = model.config.lrs.ivar_channel
    parts = []
    for start in range(0, len(lrs_z), batch_size):
        rows = slice(start, start + batch_size)
        tokens = encoder(
            lrs_z[rows].to(device),
            lrs_stats[rows].to(device),
            lrs_ivar[rows].to(device) if use_ivar else None,
        )
        parts.append(tokens.half().cpu())
    return torch.cat(parts)


def align(
    data: list[Path],
    lrs_encoder: Path,
    xp_encoder: Path,
    out: Path,
    variant: str = "pr",
    config: str = "small",
    cfg: TrainConfig | None = None,
    device: str = "auto",
    resume: bool = False,
    log=quiet,
    init: Path | None = None,
    xp_encoder_lr: float = 0.0,
) -> dict:
    """Align pre-trained encoders on the train split's pairs; writes a SpecCLIP model to ``out``.

    init: a SpecCLIP model directory whose heads, temperature and decoders to start from (its
    config must match); the encoders always come from ``lrs_encoder`` and ``xp_encoder``.
    xp_encoder_lr: 0 keeps the XP encoder frozen (as published); a positive value trains it too,
    at that fraction of the heads' learning rate (the OAE is small: this costs little)."""
    cfg = cfg or TrainConfig()
    train = load_arrays(data, "train", ("lrs", "xp"))
    val = load_arrays(data, "val", ("lrs", "xp"))
    log(f"align ({variant}): {len(train)} train pairs, {len(val)} val pairs")
    model = build_model("specclip", config, variant=variant)
    if init is not None:
        start = load_model(init)
        if start.config.clip != model.config.clip or start.config.lrs != model.config.lrs:
            raise SpecsearchError(
                f"{init}: its config does not match the {config!r} {variant} model"
            )
        model.load_state_dict(start.state_dict())
        log(f"align: heads and decoders start from {init}")
    lrs, xp = load_model(lrs_encoder), load_model(xp_encoder)
    try:
        model.load_encoders(lrs_encoder=lrs, xp_encoder=xp)
    except ValueError as err:
        raise SpecsearchError(str(err)) from None
    model.freeze_encoders(lrs=True, xp=xp_encoder_lr <= 0)
    card = {
        "stage": "align",
        "variant": variant,
        "data": [str(p) for p in data],
        "n_train_pairs": len(train),
        "lrs_encoder": str(lrs_encoder),
        "xp_encoder": str(xp_encoder),
        **({"init": str(init)} if init is not None else {}),
        **({"xp_encoder_lr": xp_encoder_lr} if xp_encoder_lr > 0 else {}),
    }
    train_tensors, val_tensors = train.tensors(PAIR_INPUTS), val.tensors(PAIR_INPUTS)
    dev = choose_device(device)
    for tensors in (train_tensors, val_tensors):
        tensors.append(lrs_tokens(model, tensors, dev))
    log(f"align: LRS token states of {len(train) + len(val)} spectra computed once")
    trainer = Trainer(
        model,
        _align_loss,
        lambda m, d, c: save_model(m, d, {**card, **c}),
        out,
        cfg,
        device,
        log,
        lr_scales={"xp_encoder.": xp_encoder_lr} if xp_encoder_lr > 0 else None,
    )
    return trainer.fit(train_tensors, val_tensors, resume=resume)
