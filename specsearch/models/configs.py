"""Named model configurations, as data.

A `SpecCLIPConfig` holds one config per family (each family's dataclass sits at the top of its own
file) and round-trips through JSON with `config_to_dict` / `get_config`.

Named configs:
- ``paper``: the published sizes (about 43M parameters per encoder, 768-d embeddings), with the
  improvements of SPECCLIP.md switched on (learnable temperature, XP norm as an input, residual
  OAE blocks, the mean in the LRS stats token). `compat.published_config` switches them off.
- ``small``: the same architecture narrowed to train on a 2-core CPU (128-d embeddings). An
  aligned forward + backward of 256 pairs (frozen encoders) is about 25 GFLOP, most of it the LRS
  transformer's 146 tokens, which is why its width is 96 rather than 128: 0.5-0.8 s measured on
  one core shared with other jobs.

A dict may name a base config and override any field: ``{"base": "small", "clip": {"variant": "split"}}``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from ..errors import SpecsearchError
from .clip import CLIPConfig
from .heads import LabelHeadConfig
from .specformer import SpecFormerConfig
from .xp_oae import XPAutoencoderConfig
from .xp_transformer import XPTransformerConfig


@dataclass
class SpecCLIPConfig:
    name: str = "paper"
    xp_encoder: str = "oae"  # or "transformer"
    lrs: SpecFormerConfig = field(default_factory=SpecFormerConfig)
    xp_oae: XPAutoencoderConfig = field(default_factory=XPAutoencoderConfig)
    xp_transformer: XPTransformerConfig = field(default_factory=XPTransformerConfig)
    clip: CLIPConfig = field(default_factory=CLIPConfig)
    labels: LabelHeadConfig = field(default_factory=LabelHeadConfig)


def _paper() -> SpecCLIPConfig:
    return SpecCLIPConfig(name="paper")


def _small() -> SpecCLIPConfig:
    return SpecCLIPConfig(
        name="small",
        lrs=SpecFormerConfig(width=96, depth=3, n_heads=4, mlp_ratio=2),
        xp_oae=XPAutoencoderConfig(hidden=256, expansion=2, n_blocks=2, latent=128),
        xp_transformer=XPTransformerConfig(width=96, depth=2, n_heads=4, mlp_ratio=2),
        clip=CLIPConfig(
            embed_dim=128,
            shared_dim=96,
            xp_head_hidden=192,
            xp_decoder_hidden=(256, 256, 128),
            lrs_decoder_hidden=(256, 256, 256),
        ),
        labels=LabelHeadConfig(hidden=(128, 64)),
    )


NAMED_CONFIGS = {"paper": _paper, "small": _small}


def config_names() -> list[str]:
    return sorted(NAMED_CONFIGS)


def config_to_dict(config: Any) -> dict:
    """Dataclass -> plain JSON-serialisable dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _from_dict(cls: type, data: dict, base: Any, where: str) -> Any:
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise SpecsearchError(f"config {where}: unknown key(s) {', '.join(sorted(unknown))}")
    values = {}
    for f in dataclasses.fields(cls):
        current = getattr(base, f.name)
        if f.name not in data:
            values[f.name] = copy.deepcopy(current)
        elif dataclasses.is_dataclass(current):
            if not isinstance(data[f.name], dict):
                raise SpecsearchError(f"config {where}{f.name}: expected an object")
            values[f.name] = _from_dict(type(current), data[f.name], current, f"{where}{f.name}.")
        elif isinstance(current, tuple):
            values[f.name] = tuple(data[f.name])
        else:
            values[f.name] = data[f.name]
    return cls(**values)


def get_config(name_or_dict: str | dict | SpecCLIPConfig = "small") -> SpecCLIPConfig:
    """A named config, a (partial) dict on top of ``dict["base"]`` (default "paper"), or a copy."""
    if isinstance(name_or_dict, SpecCLIPConfig):
        return copy.deepcopy(name_or_dict)
    if isinstance(name_or_dict, str):
        if name_or_dict not in NAMED_CONFIGS:
            raise SpecsearchError(
                f"unknown model config {name_or_dict!r}; choose one of {', '.join(config_names())}"
            )
        return NAMED_CONFIGS[name_or_dict]()
    data = dict(name_or_dict)
    base = data.pop("base", None)
    if base is None:  # a saved config names itself; anything else starts from paper
        base = data["name"] if data.get("name") in NAMED_CONFIGS else "paper"
    return _from_dict(SpecCLIPConfig, data, get_config(base), "")


def sub_config_from_dict(cls: type, data: dict) -> Any:
    """One family's config from its dict (as saved with a pre-trained encoder)."""
    return _from_dict(cls, data, cls(), "")
