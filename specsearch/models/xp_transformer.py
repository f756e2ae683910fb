"""The XP masked transformer: one token per wavelength point of a Gaia XP sampled spectrum.

Released with SpecCLIP but not used by its final models; here it can replace the OAE in the CLIP
stage (``SpecCLIPConfig.xp_encoder = "transformer"``).

Input as for the OAE: ``xp_x`` (n, 343) = flux / norm and ``xp_stats`` (n, 1) = log10 norm, from
`specsearch.grids.xp_model_input`. Each spectrum is z-scored inside the model. Tokens have 3
channels: point tokens carry their z value in channel 2; the stats token, first in the sequence,
carries [mean, std] in channels 0, 1 (as published) and log10 norm in channel 2
(``norm_stat_input``). 344 tokens; masking hides 6 chunks of 20 tokens (35%).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..grids import N_XP
from .layers import MaskedTransformer


@dataclass
class XPTransformerConfig:
    n_pixels: int = N_XP
    max_len: int = 350
    width: int = 768
    depth: int = 6
    n_heads: int = 6
    mlp_ratio: int = 4
    dropout: float = 0.0
    mask_chunks: int = 6
    mask_chunk_width: int = 20
    norm_stat_input: bool = True
    attention_scale: str = "sqrt"
    channels: int = 3  # [stat, stat, value]

    @property
    def seq_len(self) -> int:
        return self.n_pixels + 1


class XPTransformer(MaskedTransformer):
    """One token per XP sample plus one stats token. ``forward``, ``embed`` and ``masked_loss``
    take (xp_x, xp_stats)."""

    kind = "xp_transformer"

    def __init__(self, config: XPTransformerConfig):
        super().__init__(config, config.channels, config.channels)

    def tokenize(
        self, xp_x: torch.Tensor, xp_stats: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, 343), (n, 1) -> (tokens (n, 344, 3), weight (n, 344, 3) marking data elements)."""
        n = xp_x.shape[0]
        mean = xp_x.mean(dim=1)
        std = xp_x.std(dim=1).clamp_min(1e-6)
        z = (xp_x - mean[:, None]) / std[:, None]
        tokens = xp_x.new_zeros(n, self.config.seq_len, 3)
        tokens[:, 1:, 2] = z
        tokens[:, 0, 0] = mean
        tokens[:, 0, 1] = std
        weight = torch.zeros_like(tokens)
        weight[:, 1:, 2] = 1.0
        weight[:, 0, :2] = 1.0
        if self.config.norm_stat_input:
            tokens[:, 0, 2] = xp_stats[:, 0]
            weight[:, 0, 2] = 1.0
        return tokens, weight
