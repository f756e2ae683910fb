"""Stage 2: CLIP alignment of the two pre-trained encoders on paired stars.

The encoders are frozen (as published); the LRS attention-pooling head, the XP MLP head, the
learnable temperature and, for the ``pr``/``split`` variants, the reconstruction and
cross-prediction decoders are trained on: InfoNCE + L1 reconstruction + L1 cross-prediction.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import SpecsearchError
from ..models.factory import build_model, load_model, save_model
from .data import load_arrays
from .loop import TrainConfig, Trainer, quiet

PAIR_INPUTS = ("lrs_z", "lrs_stats", "lrs_ivar", "xp_x", "xp_stats")


def _align_loss(model, batch):
    lrs_z, lrs_stats, lrs_ivar, xp_x, xp_stats = batch
    return model.alignment_loss(lrs_z, lrs_stats, xp_x, xp_stats, lrs_ivar=lrs_ivar)


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
) -> dict:
    """Align pre-trained encoders on the train split's pairs; writes a SpecCLIP model to ``out``."""
    cfg = cfg or TrainConfig()
    train = load_arrays(data, "train", ("lrs", "xp"))
    val = load_arrays(data, "val", ("lrs", "xp"))
    log(f"align ({variant}): {len(train)} train pairs, {len(val)} val pairs")
    model = build_model("specclip", config, variant=variant)
    lrs, xp = load_model(lrs_encoder), load_model(xp_encoder)
    try:
        model.load_encoders(lrs_encoder=lrs, xp_encoder=xp)
    except ValueError as err:
        raise SpecsearchError(str(err)) from None
    model.freeze_encoders()
    card = {
        "stage": "align",
        "variant": variant,
        "data": [str(p) for p in data],
        "n_train_pairs": len(train),
        "lrs_encoder": str(lrs_encoder),
        "xp_encoder": str(xp_encoder),
    }
    trainer = Trainer(
        model, _align_loss, lambda m, d, c: save_model(m, d, {**card, **c}), out, cfg, device, log
    )
    return trainer.fit(train.tensors(PAIR_INPUTS), val.tensors(PAIR_INPUTS), resume=resume)
