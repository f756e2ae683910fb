"""Load checkpoints of the published SpecCLIP code (PyTorch Lightning) into specsearch models.

The published checkpoints are Lightning ``.ckpt`` files whose ``state_dict`` uses the attribute
names of the published modules. They are read with ``torch.load(..., weights_only=True)`` (tensors
and plain containers only, never arbitrary objects) or passed in as a state dict.

ASSUMPTION: no published checkpoint was available when this was written. The key names below
come from the published source (SpecCLIP's ``specclip/modules.py`` and ``specclip/models/*.py``);
a checkpoint made by another version of that code may use other names, and then loading fails
with a message naming the first key that did not match.

Key mapping (published -> specsearch), per module:

SpecFormer (LRS; a pre-training checkpoint has no prefix, a CLIP checkpoint has
``lamost_lrs_encoder.backbone.``; -> ``lrs_encoder.`` in a SpecCLIPModel)
    data_embed.{w,b}                       token_embed.{w,b}
    position_embed.weight                  pos_embed.weight
    blocks.i.ln1 / ln2                     blocks.i.ln_1 / ln_2
    blocks.i.attention.q_proj + kv_proj    blocks.i.attn.qkv   (rows concatenated q, k, v)
      (or the fused blocks.i.attention.attention of the non-flash path)
    blocks.i.attention.out_proj            blocks.i.attn.proj
    blocks.i.mlp.0 / mlp.2                 blocks.i.mlp.fc / mlp.proj
    final_layernorm                        ln_f
    head                                   head
XP OAE (no prefix, or ``gaia_xp_encoder.backbone.``; -> ``xp_encoder.``)
    input_proj, output_proj                same names
    {encoder,decoder}_blocks.i.norm        {encoder,decoder}_blocks.i.norm
    {encoder,decoder}_blocks.i.mlp.0 / .3  {encoder,decoder}_blocks.i.fc / .proj
    bottleneck_down / _norm / _up          to_latent / latent_norm / from_latent
LRS CLIP head (``lamost_lrs_encoder.`` -> ``lrs_head.``)
    cross_attention.query                  pool.query
    cross_attention.multihead_attn.in_proj_weight / in_proj_bias (or q/k/v_proj_weight)
                                           pool.{q,k,v}_proj.{weight,bias}  (split in three)
    cross_attention.multihead_attn.out_proj    pool.out_proj
    cross_attention.layernorm              norm
    mlp.encoder / mlp.decoder              mlp.fc / mlp.proj
XP CLIP head (``gaia_xp_encoder.`` -> ``xp_head.``)
    projection                             proj
    feature_mlp.0 / .1 / .3 / .4           feature.fc / norm_hidden / out / norm_out
    mlp.encoder / mlp.decoder              mlp.fc / mlp.proj
Decoders (pr): gaia_xp_decoder, lamost_lrs_decoder, gaia_xp_cross_decoder, lamost_lrs_cross_decoder
    -> decoders.xp_recon, lrs_recon, xp_from_lrs, lrs_from_xp; inside, the Sequential index
    4k -> layers.k.fc, 4k+2 -> layers.k.norm (BatchNorm incl. running statistics), 4K -> out.
logit_scale (only saved when learnable)    logit_scale; otherwise log(15.5) from the config.

Not in a published checkpoint, left as initialised: the label heads (unfitted).
Only the ``base`` and ``pr`` variants map; the published split models used other decoders.

`published_config` is `paper` with the improvements switched off, so the loaded model computes
what the published one did: the LRS stats token holds log10(std) only, the attention logit scale
is 1/head_dim (the published flash path scales q by 1/sqrt(d) before scaled_dot_product_attention
scales again), the OAE blocks have no residual and no norm input, and the temperature is fixed
at 15.5. One input difference remains: specsearch normalises XP by its mean flux over 500-600 nm,
the published model by the flux at 550 nm (`grids.XP_INDEX_550NM`).
"""

from __future__ import annotations

import math
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import SpecsearchError
from .clip import SpecCLIPModel
from .configs import SpecCLIPConfig, get_config
from .specformer import SpecFormer
from .xp_oae import XPAutoencoder

PUBLISHED_LOGIT_SCALE = 15.5

# (published key regex, specsearch key template) inside one module, after `_unfuse`.
SPECFORMER_KEYS = [
    (r"data_embed\.(weight|bias)", r"token_embed.\1"),
    (r"position_embed\.weight", r"pos_embed.weight"),
    (r"blocks\.(\d+)\.ln1\.(weight|bias)", r"blocks.\1.ln_1.\2"),
    (r"blocks\.(\d+)\.ln2\.(weight|bias)", r"blocks.\1.ln_2.\2"),
    (r"blocks\.(\d+)\.attention\.attention\.(weight|bias)", r"blocks.\1.attn.qkv.\2"),
    (r"blocks\.(\d+)\.attention\.out_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"blocks\.(\d+)\.mlp\.0\.(weight|bias)", r"blocks.\1.mlp.fc.\2"),
    (r"blocks\.(\d+)\.mlp\.2\.(weight|bias)", r"blocks.\1.mlp.proj.\2"),
    (r"final_layernorm\.(weight|bias)", r"ln_f.\1"),
    (r"head\.(weight|bias)", r"head.\1"),
]
OAE_KEYS = [
    (r"(input_proj|output_proj)\.(weight|bias)", r"\1.\2"),
    (r"(encoder_blocks|decoder_blocks)\.(\d+)\.norm\.(weight|bias)", r"\1.\2.norm.\3"),
    (r"(encoder_blocks|decoder_blocks)\.(\d+)\.mlp\.0\.(weight|bias)", r"\1.\2.fc.\3"),
    (r"(encoder_blocks|decoder_blocks)\.(\d+)\.mlp\.3\.(weight|bias)", r"\1.\2.proj.\3"),
    (r"bottleneck_down\.(weight|bias)", r"to_latent.\1"),
    (r"bottleneck_norm\.(weight|bias)", r"latent_norm.\1"),
    (r"bottleneck_up\.(weight|bias)", r"from_latent.\1"),
]
LRS_HEAD_KEYS = [
    (r"cross_attention\.query", r"pool.query"),
    (r"cross_attention\.multihead_attn\.([qkv])_proj_weight", r"pool.\1_proj.weight"),
    (r"cross_attention\.multihead_attn\.([qkv])_proj_bias", r"pool.\1_proj.bias"),
    (r"cross_attention\.multihead_attn\.out_proj\.(weight|bias)", r"pool.out_proj.\1"),
    (r"cross_attention\.layernorm\.(weight|bias)", r"norm.\1"),
    (r"mlp\.encoder\.(weight|bias)", r"mlp.fc.\1"),
    (r"mlp\.decoder\.(weight|bias)", r"mlp.proj.\1"),
]
XP_HEAD_KEYS = [
    (r"projection\.(weight|bias)", r"proj.\1"),
    (r"feature_mlp\.0\.(weight|bias)", r"feature.fc.\1"),
    (r"feature_mlp\.1\.(weight|bias)", r"feature.norm_hidden.\1"),
    (r"feature_mlp\.3\.(weight|bias)", r"feature.out.\1"),
    (r"feature_mlp\.4\.(weight|bias)", r"feature.norm_out.\1"),
    (r"mlp\.encoder\.(weight|bias)", r"mlp.fc.\1"),
    (r"mlp\.decoder\.(weight|bias)", r"mlp.proj.\1"),
]
DECODER_MODULES = {
    "gaia_xp_decoder": "xp_recon",
    "lamost_lrs_decoder": "lrs_recon",
    "gaia_xp_cross_decoder": "xp_from_lrs",
    "lamost_lrs_cross_decoder": "lrs_from_xp",
}
BATCHNORM_FIELDS = "weight|bias|running_mean|running_var|num_batches_tracked"

# specsearch keys that a published checkpoint does not hold
NOT_PUBLISHED = re.compile(r"^(label_heads\.|logit_scale$)")


def published_config(variant: str = "pr", base: str | dict = "paper") -> SpecCLIPConfig:
    """The config whose model computes what the published SpecCLIP model computes."""
    if variant not in ("base", "pr"):
        raise SpecsearchError(
            f"published checkpoints map for variants base and pr, not {variant!r}"
        )
    cfg = get_config(base)
    cfg.name = "published"
    cfg.lrs.stats_mean = False
    cfg.lrs.attention_scale = "linear"
    cfg.xp_oae.residual = False
    cfg.xp_oae.norm_stat_input = False
    cfg.xp_oae.log_moments = False
    cfg.xp_encoder = "oae"
    cfg.clip.variant = variant
    cfg.clip.learn_temperature = False
    cfg.clip.logit_scale_init = math.log(PUBLISHED_LOGIT_SCALE)
    return cfg


def read_checkpoint(source: str | Path | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict from a Lightning checkpoint path (weights_only) or a mapping, prefix-free."""
    if isinstance(source, Mapping):
        state = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise SpecsearchError(f"{path}: no such checkpoint")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
            raise SpecsearchError(
                f"{path}: cannot be read with weights_only=True ({str(err).splitlines()[0]}); "
                "save its state_dict alone with torch.save and load that"
            ) from None
    if isinstance(state.get("state_dict"), Mapping):
        state = dict(state["state_dict"])
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise SpecsearchError("checkpoint holds no tensors")
    if all(k.startswith("model.") for k in tensors):  # a Lightning wrapper around the module
        tensors = {k[len("model.") :]: v for k, v in tensors.items()}
    return tensors


def _unfuse(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rewrite the two published projections whose layout differs from specsearch's.

    q_proj + kv_proj (flash-path attention) -> one fused ``attention.attention`` (q, k, v rows);
    MultiheadAttention's in_proj_weight / in_proj_bias -> separate q/k/v weights and biases.
    """
    out = dict(state)
    for key in [k for k in state if re.search(r"\battention\.q_proj\.(weight|bias)$", k)]:
        kv_key = key.replace("q_proj", "kv_proj")
        if kv_key not in state:
            raise SpecsearchError(f"checkpoint has {key} but no {kv_key}")
        out[key.replace("q_proj", "attention")] = torch.cat([state[key], state[kv_key]], dim=0)
        del out[key], out[kv_key]
    for key in [k for k in state if k.endswith("multihead_attn.in_proj_weight")]:
        for name, part in zip("qkv", state[key].chunk(3, dim=0), strict=True):
            out[key.replace("in_proj_weight", f"{name}_proj_weight")] = part
        del out[key]
    for key in [k for k in state if k.endswith("multihead_attn.in_proj_bias")]:
        for name, part in zip("qkv", state[key].chunk(3, dim=0), strict=True):
            out[key.replace("in_proj_bias", f"{name}_proj_bias")] = part
        del out[key]
    return out


def _decoder_rule(n_hidden: int):
    def rename(rest: str) -> str | None:
        m = re.fullmatch(rf"decoder\.(\d+)\.({BATCHNORM_FIELDS})", rest)
        if not m:
            return None
        index, field = int(m.group(1)), m.group(2)
        if index == 4 * n_hidden and field in ("weight", "bias"):
            return f"out.{field}"
        if index % 4 == 0 and index // 4 < n_hidden and field in ("weight", "bias"):
            return f"layers.{index // 4}.fc.{field}"
        if index % 4 == 2 and index // 4 < n_hidden:
            return f"layers.{index // 4}.norm.{field}"
        return None

    return rename


def _table_rule(table):
    compiled = [(re.compile(pattern), template) for pattern, template in table]

    def rename(rest: str) -> str | None:
        for pattern, template in compiled:
            if pattern.fullmatch(rest):
                return pattern.sub(template, rest)
        return None

    return rename


def _rules(kind: str, config: SpecCLIPConfig) -> list[tuple[str, str, object]]:
    """(published prefix, specsearch prefix, rename function) for one kind of checkpoint."""
    if kind == "specformer":
        return [("", "", _table_rule(SPECFORMER_KEYS))]
    if kind == "xp_oae":
        return [("", "", _table_rule(OAE_KEYS))]
    rules = [
        ("lamost_lrs_encoder.backbone.", "lrs_encoder.", _table_rule(SPECFORMER_KEYS)),
        ("gaia_xp_encoder.backbone.", "xp_encoder.", _table_rule(OAE_KEYS)),
        ("lamost_lrs_encoder.", "lrs_head.", _table_rule(LRS_HEAD_KEYS)),
        ("gaia_xp_encoder.", "xp_head.", _table_rule(XP_HEAD_KEYS)),
        ("", "", _table_rule([(r"logit_scale", r"logit_scale")])),
    ]
    hidden = {"xp": len(config.clip.xp_decoder_hidden), "lrs": len(config.clip.lrs_decoder_hidden)}
    for published, ours in DECODER_MODULES.items():
        rules.append(
            (f"{published}.", f"decoders.{ours}.", _decoder_rule(hidden[ours.split("_")[0]]))
        )
    return rules


def map_published_state_dict(
    state: Mapping[str, torch.Tensor], kind: str, config: SpecCLIPConfig
) -> dict[str, torch.Tensor]:
    """Rename a published state dict to specsearch keys. Raises on a key no rule maps."""
    rules = _rules(kind, config)
    mapped: dict[str, torch.Tensor] = {}
    for key, value in _unfuse(dict(state)).items():
        target = None
        for published, ours, rename in rules:  # the longest prefixes come first
            if key.startswith(published):
                rest = rename(key[len(published) :])
                if rest is not None:
                    target = ours + rest
                    break
        if target is None:
            raise SpecsearchError(f"published checkpoint key {key!r} has no specsearch counterpart")
        mapped[target] = value
    return mapped


def load_published(
    source: str | Path | Mapping[str, torch.Tensor],
    kind: str = "specclip",
    variant: str = "pr",
    base: str | dict = "paper",
) -> nn.Module:
    """Build the published-equivalent model of ``kind`` and load a published checkpoint into it.

    kind: "specclip" (a CLIP-stage checkpoint, variant base or pr), "specformer" or "xp_oae"
    (pre-training checkpoints). Every parameter and buffer of the model must come from the
    checkpoint (except the label heads and a fixed temperature) with the same shape, and every
    checkpoint tensor must be used; otherwise a SpecsearchError names the first offender.
    Returns the model in eval mode.
    """
    if kind not in ("specclip", "specformer", "xp_oae"):
        raise SpecsearchError(
            f"cannot load a published {kind!r} checkpoint; use specclip, specformer or xp_oae"
        )
    config = published_config(variant, base)
    mapped = map_published_state_dict(read_checkpoint(source), kind, config)
    model: nn.Module
    if kind == "specclip":
        model = SpecCLIPModel(config)
    elif kind == "specformer":
        model = SpecFormer(config.lrs)
    else:
        model = XPAutoencoder(config.xp_oae)
    expected = model.state_dict()
    for key, value in mapped.items():
        if key not in expected:
            raise SpecsearchError(
                f"published tensor maps to {key!r}, which the {kind} model does not have"
            )
        if tuple(value.shape) != tuple(expected[key].shape):
            raise SpecsearchError(
                f"{key}: published shape {tuple(value.shape)} != specsearch shape {tuple(expected[key].shape)}"
            )
    missing = [k for k in expected if k not in mapped and not NOT_PUBLISHED.match(k)]
    if missing:
        raise SpecsearchError(
            f"published checkpoint lacks {missing[0]!r} ({len(missing)} missing in all)"
        )
    model.load_state_dict({**expected, **mapped}, strict=True)
    return model.eval()
