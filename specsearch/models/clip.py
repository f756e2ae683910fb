"""The CLIP stage: heads that map each encoder into one embedding space, decoders, and the
`SpecCLIPModel` container that holds everything a trained model needs.

Heads (backbones frozen by default):
- LRS: attention pooling with one learned query (4 heads) over SpecFormer's token states, then
  LayerNorm and a residual MLP d -> 4d -> d.
- XP: on the OAE latent, Linear d_latent -> d, an MLP d -> 1160 -> d with LayerNorm and GELU, and
  a residual MLP d -> 4d -> d. (With the XP transformer as encoder, the XP head is the LRS kind.)

Variants (``CLIPConfig.variant``):
- ``base``: CLIP loss only; no decoders.
- ``pr``: CLIP + in-modal reconstruction + cross-modal prediction, L1 terms, weights 1.
- ``split``: each head output is [shared | private] (512 + 256 in `paper`); CLIP on the shared part,
  reconstruction from shared + private, cross-prediction from the shared part only.

What the decoders predict (the published targets; L1 losses over good pixels):
- ``lrs_recon``: the z-scored LRS, (n, 1462); flux = mean + 10**log10std * z with the star's own
  ``lrs_stats``.
- ``lrs_from_xp``: the continuum-normalised LRS flux itself, (n, 1462); no LRS statistics needed,
  so it works for a star with only an XP spectrum.
- ``xp_recon`` and ``xp_from_lrs``: the normalised XP, flux / norm, (n, 343); flux = x * norm with
  norm = 10**xp_stats (the star's own XP; LRS alone cannot tell the absolute flux).

"Embedding" = `SpecCLIPModel.embed`: the L2-normalised CLIP part of the head output (the whole
output for base/pr, the shared part for split): the vector to compare across modalities. The full
head output (``features``, the 768-d concatenation for split) feeds the decoders and label heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..grids import N_LRS, N_XP
from .heads import LabelHead
from .layers import MLP, AttentionPool
from .loss import ClipLoss
from .specformer import SpecFormer
from .xp_oae import XPAutoencoder
from .xp_transformer import XPTransformer

if TYPE_CHECKING:
    from .configs import SpecCLIPConfig

VARIANTS = ("base", "pr", "split")


@dataclass
class CLIPConfig:
    variant: str = "pr"
    embed_dim: int = 768
    shared_dim: int = 512  # split only: the first shared_dim features are the CLIP part
    pool_heads: int = 4
    head_mlp_ratio: int = 4
    xp_head_hidden: int = 1160
    head_dropout: float = 0.1
    xp_decoder_hidden: tuple[int, ...] = (3072, 1536, 768)
    lrs_decoder_hidden: tuple[int, ...] = (3072, 3072, 3072)
    decoder_dropout: float = 0.1
    recon_weight: float = 1.0
    cross_weight: float = 1.0
    logit_scale_init: float = math.log(1 / 0.07)
    learn_temperature: bool = True  # published: fixed at log(15.5)
    max_logit_scale: float = 100.0
    freeze_encoders: bool = True
    gather_negatives: bool = True

    @property
    def clip_dim(self) -> int:
        return self.shared_dim if self.variant == "split" else self.embed_dim


class TokenHead(nn.Module):
    """Token states (n, t, w) -> features (n, d): attention pool, LayerNorm, residual MLP."""

    def __init__(
        self, token_width: int, embed_dim: int, n_heads: int, mlp_ratio: int, dropout: float
    ):
        super().__init__()
        self.pool = AttentionPool(token_width, embed_dim, n_heads)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(embed_dim)
        self.mlp = MLP(embed_dim, mlp_ratio * embed_dim, dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.drop(self.pool(tokens)))
        return x + self.mlp(x)


class FeatureMLP(nn.Module):
    """d -> hidden -> d with a LayerNorm after each Linear and GELU between."""

    def __init__(self, width: int, hidden: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(width, hidden)
        self.norm_hidden = nn.LayerNorm(hidden)
        self.gelu = nn.GELU()
        self.out = nn.Linear(hidden, width)
        self.norm_out = nn.LayerNorm(width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.norm_out(self.out(self.gelu(self.norm_hidden(self.fc(x))))))


class LatentHead(nn.Module):
    """OAE latent (n, l) -> features (n, d): projection, feature MLP, residual MLP."""

    def __init__(
        self, latent_dim: int, embed_dim: int, hidden: int, mlp_ratio: int, dropout: float
    ):
        super().__init__()
        self.proj = nn.Linear(latent_dim, embed_dim)
        self.feature = FeatureMLP(embed_dim, hidden, dropout)
        self.mlp = MLP(embed_dim, mlp_ratio * embed_dim, dropout)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        x = self.feature(self.proj(latent))
        return x + self.mlp(x)


class DecoderLayer(nn.Module):
    """Linear -> GELU -> BatchNorm -> Dropout (the published order)."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim)
        self.gelu = nn.GELU()
        self.norm = nn.BatchNorm1d(out_dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.norm(self.gelu(self.fc(x))))


class SpectrumDecoder(nn.Module):
    """features (n, in_dim) -> spectrum (n, out_dim) through hidden DecoderLayers."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...], out_dim: int, dropout: float):
        super().__init__()
        widths = (in_dim, *hidden)
        self.layers = nn.ModuleList(
            DecoderLayer(a, b, dropout) for a, b in zip(widths[:-1], widths[1:], strict=True)
        )
        self.out = nn.Linear(widths[-1], out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.out(x)


def masked_l1(
    prediction: torch.Tensor, target: torch.Tensor, good: torch.Tensor | None
) -> torch.Tensor:
    """Mean absolute error over good elements (all when good is None)."""
    if good is None:
        return F.l1_loss(prediction, target)
    good = good.to(prediction.dtype)
    return ((prediction - target).abs() * good).sum() / good.sum().clamp_min(1.0)


class SpecCLIPModel(nn.Module):
    """LRS encoder, XP encoder, CLIP heads, temperature, decoders (pr/split) and label heads."""

    kind = "specclip"

    def __init__(self, config: SpecCLIPConfig):
        super().__init__()
        self.config = config
        clip = config.clip
        if clip.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {clip.variant!r}")
        if clip.variant == "split" and not 0 < clip.shared_dim < clip.embed_dim:
            raise ValueError("split needs 0 < shared_dim < embed_dim")

        self.lrs_encoder = SpecFormer(config.lrs)
        self.lrs_head = TokenHead(
            config.lrs.width,
            clip.embed_dim,
            clip.pool_heads,
            clip.head_mlp_ratio,
            clip.head_dropout,
        )
        if config.xp_encoder == "oae":
            self.xp_encoder = XPAutoencoder(config.xp_oae)
            self.xp_head = LatentHead(
                config.xp_oae.latent,
                clip.embed_dim,
                clip.xp_head_hidden,
                clip.head_mlp_ratio,
                clip.head_dropout,
            )
        elif config.xp_encoder == "transformer":
            self.xp_encoder = XPTransformer(config.xp_transformer)
            self.xp_head = TokenHead(
                config.xp_transformer.width,
                clip.embed_dim,
                clip.pool_heads,
                clip.head_mlp_ratio,
                clip.head_dropout,
            )
        else:
            raise ValueError(
                f"xp_encoder must be 'oae' or 'transformer', got {config.xp_encoder!r}"
            )

        init = torch.tensor(float(clip.logit_scale_init))
        if clip.learn_temperature:
            self.logit_scale = nn.Parameter(init)
        else:
            self.register_buffer("logit_scale", init)
        self.clip_loss = ClipLoss(gather=clip.gather_negatives, max_scale=clip.max_logit_scale)

        self.decoders = None
        if clip.variant != "base":
            cross_in = clip.clip_dim  # the shared part for split, everything for pr
            d = clip.decoder_dropout
            self.decoders = nn.ModuleDict(
                {
                    "lrs_recon": SpectrumDecoder(clip.embed_dim, clip.lrs_decoder_hidden, N_LRS, d),
                    "xp_recon": SpectrumDecoder(clip.embed_dim, clip.xp_decoder_hidden, N_XP, d),
                    "lrs_from_xp": SpectrumDecoder(cross_in, clip.lrs_decoder_hidden, N_LRS, d),
                    "xp_from_lrs": SpectrumDecoder(cross_in, clip.xp_decoder_hidden, N_XP, d),
                }
            )
            # these three predict flux near 1 (continuum-normalised LRS, XP / its 500-600 nm mean):
            # start there, so early training learns shapes rather than the offset
            for name in ("xp_recon", "lrs_from_xp", "xp_from_lrs"):
                nn.init.ones_(self.decoders[name].out.bias)
        self.label_heads = nn.ModuleDict(
            {
                "lrs": LabelHead(clip.embed_dim, config.labels),
                "xp": LabelHead(clip.embed_dim, config.labels),
            }
        )
        if clip.freeze_encoders:
            self.freeze_encoders()

    # --- properties ---------------------------------------------------------------------------

    @property
    def variant(self) -> str:
        return self.config.clip.variant

    @property
    def embed_dim(self) -> int:
        """Width of `embed`'s output: the vector compared across modalities."""
        return self.config.clip.clip_dim

    @property
    def has_decoders(self) -> bool:
        return self.decoders is not None

    @property
    def labels_fitted(self) -> bool:
        return bool(self.label_heads["lrs"].fitted) or bool(self.label_heads["xp"].fitted)

    # --- encoders -----------------------------------------------------------------------------

    def freeze_encoders(self, lrs: bool = True, xp: bool = True) -> None:
        """Freeze the chosen encoders (no gradient, eval mode); the others train with the heads."""
        self._frozen = {"lrs": lrs, "xp": xp}
        for name, encoder in (("lrs", self.lrs_encoder), ("xp", self.xp_encoder)):
            encoder.requires_grad_(not self._frozen[name])
        self.train(self.training)

    def unfreeze_encoders(self) -> None:
        """Let the encoders train with the heads (end-to-end fine-tuning)."""
        self.freeze_encoders(lrs=False, xp=False)

    def _is_frozen(self, modality: str) -> bool:
        return getattr(self, "_frozen", {}).get(modality, False)

    def train(self, mode: bool = True) -> SpecCLIPModel:
        super().train(mode)
        for name, encoder in (("lrs", self.lrs_encoder), ("xp", self.xp_encoder)):
            if self._is_frozen(name):
                encoder.eval()
        return self

    def load_encoders(
        self, lrs_encoder: nn.Module | None = None, xp_encoder: nn.Module | None = None
    ) -> None:
        """Copy pre-trained encoder weights in (from `factory.load_model` of a pretrain output)."""
        for name, source in (("lrs_encoder", lrs_encoder), ("xp_encoder", xp_encoder)):
            if source is None:
                continue
            target = getattr(self, name)
            if type(source) is not type(target) or source.config != target.config:
                raise ValueError(
                    f"{name}: pre-trained {type(source).__name__} config does not match the model's"
                )
            target.load_state_dict(source.state_dict())

    # --- features and embeddings --------------------------------------------------------------

    def lrs_features(
        self,
        lrs_z: torch.Tensor,
        lrs_stats: torch.Tensor,
        lrs_ivar: torch.Tensor | None = None,
        lrs_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """LRS model input -> head output (n, embed_dim); see `specsearch.grids.lrs_model_input`.

        lrs_tokens: the frozen encoder's output for these spectra, when already computed."""
        if lrs_tokens is None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self._is_frozen("lrs")):
                lrs_tokens = self.lrs_encoder(lrs_z, lrs_stats, lrs_ivar)
        return self.lrs_head(lrs_tokens.float())

    def xp_features(self, xp_x: torch.Tensor, xp_stats: torch.Tensor) -> torch.Tensor:
        """XP model input -> head output (n, embed_dim); see `specsearch.grids.xp_model_input`."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self._is_frozen("xp")):
            encoded = self.xp_encoder(xp_x, xp_stats)
        return self.xp_head(encoded)

    def clip_part(self, features: torch.Tensor) -> torch.Tensor:
        """The part of the features that the CLIP loss aligns (shared part for split)."""
        return features[:, : self.config.clip.clip_dim]

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """Features -> L2-normalised embedding (n, embed_dim) for similarity search."""
        return F.normalize(self.clip_part(features), dim=-1)

    # --- decoders -----------------------------------------------------------------------------

    def decode(
        self, lrs_features: torch.Tensor | None = None, xp_features: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Run the decoders that the given features allow (see the module docstring for units)."""
        if self.decoders is None:
            raise ValueError(f"a {self.variant!r} model has no decoders")
        out = {}
        if lrs_features is not None:
            out["lrs_recon"] = self.decoders["lrs_recon"](lrs_features)
            out["xp_from_lrs"] = self.decoders["xp_from_lrs"](self.clip_part(lrs_features))
        if xp_features is not None:
            out["xp_recon"] = self.decoders["xp_recon"](xp_features)
            out["lrs_from_xp"] = self.decoders["lrs_from_xp"](self.clip_part(xp_features))
        return out

    # --- training objective -------------------------------------------------------------------

    def alignment_loss(
        self,
        lrs_z: torch.Tensor,
        lrs_stats: torch.Tensor,
        xp_x: torch.Tensor,
        xp_stats: torch.Tensor,
        lrs_ivar: torch.Tensor | None = None,
        lrs_tokens: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The CLIP-stage loss for a batch of paired stars (``lrs_tokens``: see `lrs_features`).

        Returns {"loss", "clip", and for pr/split "recon_lrs", "recon_xp", "cross_lrs", "cross_xp"}:
        loss = clip + recon_weight * (recon_lrs + recon_xp) + cross_weight * (cross_lrs + cross_xp),
        each reconstruction term an L1 over good pixels (ivar > 0 for the LRS when given).
        """
        lrs_features = self.lrs_features(lrs_z, lrs_stats, lrs_ivar, lrs_tokens)
        xp_features = self.xp_features(xp_x, xp_stats)
        terms = {
            "clip": self.clip_loss(
                self.clip_part(lrs_features), self.clip_part(xp_features), self.logit_scale
            )
        }
        loss = terms["clip"]
        if self.decoders is not None:
            good = None if lrs_ivar is None else lrs_ivar > 0
            lrs_flux = lrs_stats[:, :1] + 10.0 ** lrs_stats[:, 1:2] * lrs_z  # continuum-normalised
            decoded = self.decode(lrs_features, xp_features)
            terms["recon_lrs"] = masked_l1(decoded["lrs_recon"], lrs_z, good)
            terms["recon_xp"] = F.l1_loss(decoded["xp_recon"], xp_x)
            terms["cross_lrs"] = masked_l1(decoded["lrs_from_xp"], lrs_flux, good)
            terms["cross_xp"] = F.l1_loss(decoded["xp_from_lrs"], xp_x)
            clip = self.config.clip
            loss = (
                loss
                + clip.recon_weight * (terms["recon_lrs"] + terms["recon_xp"])
                + clip.cross_weight * (terms["cross_lrs"] + terms["cross_xp"])
            )
        terms["loss"] = loss
        return terms
