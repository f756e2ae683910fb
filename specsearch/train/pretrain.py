"""Stage 1: pre-train one modality's encoder on single spectra (no pairs needed).

- ``lrs``: SpecFormer, masked-chunk token regression on z-scored LRS spectra.
- ``xp``: the OAE autoencoder, MSE on [mean, std, z, log norm] of the normalised XP spectrum.
- ``xp-transformer``: the XP masked transformer (released, not used by the default model).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import SpecsearchError
from ..models.factory import build_model, load_model, save_model
from .data import load_arrays
from .loop import TrainConfig, Trainer, quiet

INPUTS = {
    "lrs": ("lrs_z", "lrs_stats", "lrs_ivar"),
    "xp": ("xp_x", "xp_stats"),
    "xp-transformer": ("xp_x", "xp_stats"),
}
KINDS = {"lrs": "specformer", "xp": "xp_oae", "xp-transformer": "xp_transformer"}


def _loss(modality: str):
    if modality == "lrs":
        return lambda model, batch: model.masked_loss(
            batch[0], batch[1], batch[2] if model.config.ivar_channel else None
        )
    if modality == "xp":
        return lambda model, batch: model.reconstruction_loss(batch[0], batch[1])
    return lambda model, batch: model.masked_loss(batch[0], batch[1])


def _load_encoder(model, init: Path, modality: str) -> None:
    """Copy the weights of ``init`` (an encoder, or a SpecCLIP model holding one) into ``model``."""
    source = load_model(init)
    if getattr(source, "kind", None) == "specclip":
        source = source.lrs_encoder if modality == "lrs" else source.xp_encoder
    if type(source) is not type(model) or source.config != model.config:
        raise SpecsearchError(
            f"{init}: its {type(source).__name__} does not match the {modality} encoder's config"
        )
    model.load_state_dict(source.state_dict())


def pretrain(
    modality: str,
    data: list[Path],
    out: Path,
    config: str = "small",
    cfg: TrainConfig | None = None,
    device: str = "auto",
    resume: bool = False,
    log=quiet,
    init: Path | None = None,
) -> dict:
    """Pre-train the ``modality`` encoder on the train split of ``data``; writes ``out`` (and ``out/best``).

    init: start from the weights of a trained encoder of this kind, or of the encoder inside a
    SpecCLIP model directory (a model's own encoder config must match ``config``'s)."""
    if modality not in KINDS:
        raise SpecsearchError(f"--modality must be one of {', '.join(KINDS)}, not {modality!r}")
    cfg = cfg or TrainConfig()
    require = ("lrs",) if modality == "lrs" else ("xp",)
    train = load_arrays(data, "train", require)
    val = load_arrays(data, "val", require)
    log(f"pretrain {modality}: {len(train)} train, {len(val)} val spectra")
    model = build_model(KINDS[modality], config)
    if init is not None:
        _load_encoder(model, init, modality)
        log(f"pretrain {modality}: starting from the encoder of {init}")
    names = INPUTS[modality]
    card = {
        "stage": "pretrain",
        "modality": modality,
        "data": [str(p) for p in data],
        "n_train": len(train),
        "n_val": len(val),
        **({"init": str(init)} if init is not None else {}),
    }
    trainer = Trainer(
        model,
        _loss(modality),
        lambda m, d, c: save_model(m, d, {**card, **c}),
        out,
        cfg,
        device,
        log,
    )
    return trainer.fit(train.tensors(names), val.tensors(names), resume=resume)
