"""Build models from named configs, and save/load them as safetensors + JSON (nothing unpickled).

A model directory holds:
- ``model.safetensors``: the state dict (parameters and buffers, BatchNorm statistics, label scaler);
- ``config.json``: {"format": "specsearch-model", "format_version": 1, "kind": ..., "config": {...}},
  the config of the model's kind (the whole `SpecCLIPConfig` for ``specclip``);
- ``card.json``: the model card (id, kind, sizes, and whatever the training stage adds: data,
  commands, metrics).
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import SpecsearchError
from ..files import atomic_path
from .clip import SpecCLIPModel
from .configs import SpecCLIPConfig, config_to_dict, get_config, sub_config_from_dict
from .specformer import SpecFormer, SpecFormerConfig
from .xp_oae import XPAutoencoder, XPAutoencoderConfig
from .xp_transformer import XPTransformer, XPTransformerConfig

FORMAT = "specsearch-model"
FORMAT_VERSION = 1
WEIGHTS_FILE, CONFIG_FILE, CARD_FILE = "model.safetensors", "config.json", "card.json"

# kind -> (class, the SpecCLIPConfig field that configures it, its config class)
KINDS: dict[str, tuple[type[nn.Module], str | None, type]] = {
    "specformer": (SpecFormer, "lrs", SpecFormerConfig),
    "xp_oae": (XPAutoencoder, "xp_oae", XPAutoencoderConfig),
    "xp_transformer": (XPTransformer, "xp_transformer", XPTransformerConfig),
    "specclip": (SpecCLIPModel, None, SpecCLIPConfig),
}
ALIASES = {
    "lrs": "specformer",
    "xp": "xp_oae",
    "oae": "xp_oae",
    "xp-transformer": "xp_transformer",
    "clip": "specclip",
}


OPTIONAL_BUFFERS = (".sigma_scale",)


def canonical_kind(kind: str) -> str:
    kind = ALIASES.get(kind, kind)
    if kind not in KINDS:
        raise SpecsearchError(f"unknown model kind {kind!r}; choose one of {', '.join(KINDS)}")
    return kind


def build_model(
    kind: str, config: str | dict | SpecCLIPConfig = "small", variant: str | None = None
) -> nn.Module:
    """A freshly initialised model.

    kind: specformer (lrs), xp_oae (xp), xp_transformer, specclip. config: a named config
    ("small", "paper"), a dict of overrides (see `configs.get_config`) or a SpecCLIPConfig;
    variant: shortcut for config.clip.variant (base, pr, split).
    """
    kind = canonical_kind(kind)
    full = get_config(config)
    if variant is not None:
        full.clip.variant = variant
    cls, field_name, _ = KINDS[kind]
    return cls(full if field_name is None else getattr(full, field_name))


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts per top-level part and in total."""
    counts = {
        name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()
    }
    counts = {k: v for k, v in counts.items() if v}
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def _atomic_write_bytes(path: Path, write) -> None:
    with atomic_path(path) as tmp:
        write(tmp)


def _write_json(path: Path, data: dict) -> None:
    _atomic_write_bytes(
        path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    )


HALF_MIN_SIZE = 4096  # save_model(half=True) stores tensors at least this large as float16


def save_model(
    model: nn.Module,
    directory: str | Path,
    card: dict[str, Any] | None = None,
    half: bool = False,
) -> Path:
    """Write model.safetensors, config.json and card.json into ``directory`` (created).

    half: store every floating tensor of at least `HALF_MIN_SIZE` values (the weight matrices)
    as float16, the rest (biases, norms, label scalers, temperature) as float32: half the file,
    for a shipped model; `load_model` reads either into float32."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    kind = canonical_kind(model.kind)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    if half:
        state = {
            k: v.half() if v.is_floating_point() and v.numel() >= HALF_MIN_SIZE else v
            for k, v in state.items()
        }
    _atomic_write_bytes(
        directory / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp), metadata={"kind": kind})
    )
    _write_json(
        directory / CONFIG_FILE,
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": kind,
            "config": config_to_dict(model.config),
        },
    )
    full = {
        "model_id": directory.name,
        "kind": kind,
        "config_name": getattr(model.config, "name", None),
        "variant": model.variant if isinstance(model, SpecCLIPModel) else None,
        "embed_dim": model.embed_dim if isinstance(model, SpecCLIPModel) else None,
        "n_parameters": count_parameters(model),
        "labels_fitted": model.labels_fitted if isinstance(model, SpecCLIPModel) else None,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    full.update(card or {})
    _write_json(directory / CARD_FILE, full)
    return directory


def read_model_config(directory: str | Path) -> tuple[str, Any]:
    """(kind, config object) from a model directory's config.json."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise SpecsearchError(f"{path}: no such model config")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SpecsearchError(
            f"{path}: not valid JSON ({err.msg if hasattr(err, 'msg') else err})"
        ) from None
    if meta.get("format") != FORMAT or "kind" not in meta or "config" not in meta:
        raise SpecsearchError(f"{path}: not a specsearch model config")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise SpecsearchError(
            f"{path}: format version {meta['format_version']} is newer than this specsearch"
        )
    kind = canonical_kind(meta["kind"])
    config_cls = KINDS[kind][2]
    if config_cls is SpecCLIPConfig:
        return kind, get_config(meta["config"])
    return kind, sub_config_from_dict(config_cls, meta["config"])


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Build the model a directory describes, load its safetensors weights, return it in eval mode."""
    directory = Path(directory)
    kind, config = read_model_config(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise SpecsearchError(f"{weights}: no such weights file")
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise SpecsearchError(
            f"{weights}: cannot read safetensors ({str(err).splitlines()[0]})"
        ) from None
    model = KINDS[kind][0](config)
    # buffers added after a model was saved keep their initial value (e.g. sigma_scale = 1)
    defaults = {k: v for k, v in model.state_dict().items() if k.endswith(OPTIONAL_BUFFERS)}
    state = {**defaults, **state}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()
        raise SpecsearchError(
            f"{weights}: weights do not match config.json ({' '.join(first[1:2]).strip()})"
        ) from None
    return model.to(device).eval()


def read_card(directory: str | Path) -> dict:
    """The card.json of a model directory ({} when absent)."""
    path = Path(directory) / CARD_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SpecsearchError(f"{path}: not valid JSON ({err.msg})") from None
