"""SpecFormer: the masked transformer that encodes LAMOST low-resolution spectra (LRS).

Input: the continuum-normalised spectrum on the canonical 1462-pixel grid, z-scored per star with
`specsearch.grids.lrs_model_input`, which gives ``lrs_z`` (n, 1462) and ``lrs_stats`` (n, 2) =
[mean, log10 std].

Tokens: sliding windows of 20 pixels with stride 10 give 145 tokens; a stats token goes first, so
the sequence has 146 tokens of 21 channels (max length 150). Channel 0 is empty on window tokens;
channels 1..20 hold the window's z values. The stats token holds log10(std) in channel 0 (as
published) and the mean in channel 1 (added here; ``stats_mean=False`` gives the published token).
With ``ivar_channel=True`` 20 more channels carry each pixel's noise as sqrt(q / (1 + q)), q the
inverse variance in z units, so 0 marks a bad pixel and 1 a noiseless one.

The last two pixels (1460, 1461) fall in no window, as in the published model.

Masked pre-training hides 6 chunks of 10 tokens (41%) and regresses the hidden tokens' 21 channels
with `layers.masked_mse`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..grids import N_LRS
from .layers import MaskedTransformer


@dataclass
class SpecFormerConfig:
    n_pixels: int = N_LRS
    window: int = 20
    stride: int = 10
    max_len: int = 150
    width: int = 768
    depth: int = 6
    n_heads: int = 6
    mlp_ratio: int = 4
    dropout: float = 0.0
    mask_chunks: int = 6
    mask_chunk_width: int = 10
    stats_mean: bool = True  # stats token also carries the mean (published: log10 std only)
    ivar_channel: bool = False  # per-pixel noise as extra input channels
    attention_scale: str = "sqrt"  # "linear" reproduces the published attention (see layers)

    @property
    def n_windows(self) -> int:
        return (self.n_pixels - self.window) // self.stride + 1

    @property
    def seq_len(self) -> int:
        return self.n_windows + 1

    @property
    def token_channels(self) -> int:
        """Channels the head predicts: 1 + window."""
        return 1 + self.window

    @property
    def in_channels(self) -> int:
        return self.token_channels + (self.window if self.ivar_channel else 0)


class SpecFormer(MaskedTransformer):
    """LRS windows as tokens: 145 windows of 20 pixels (stride 10) plus one stats token.
    ``forward``, ``embed`` and ``masked_loss`` take (lrs_z, lrs_stats, lrs_ivar=None)."""

    kind = "specformer"

    def __init__(self, config: SpecFormerConfig):
        super().__init__(config, config.in_channels, config.token_channels)

    # --- tokens -------------------------------------------------------------------------------

    def tokenize(
        self,
        lrs_z: torch.Tensor,
        lrs_stats: torch.Tensor,
        lrs_ivar: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Spectra -> (tokens (n, 146, in_channels), weight (n, 146, 21)).

        lrs_z: (n, 1462) z-scored flux; lrs_stats: (n, 2) [mean, log10 std]; lrs_ivar: (n, 1462)
        inverse variance of the continuum-normalised flux, optional. ``weight`` is 1 on the
        elements that carry data (the loss target), 0 elsewhere and on bad pixels.
        """
        cfg = self.config
        n = lrs_z.shape[0]
        windows = lrs_z[:, : cfg.n_pixels].unfold(1, cfg.window, cfg.stride)  # (n, 145, 20)
        spectrum = torch.cat([windows.new_zeros(n, cfg.n_windows, 1), windows], dim=2)
        stats = lrs_z.new_zeros(n, 1, cfg.token_channels)
        stats[:, 0, 0] = lrs_stats[:, 1]
        if cfg.stats_mean:
            stats[:, 0, 1] = lrs_stats[:, 0]
        tokens = torch.cat([stats, spectrum], dim=1)  # (n, 146, 21)

        weight = torch.zeros_like(tokens)
        weight[:, 0, 0] = 1.0
        if cfg.stats_mean:
            weight[:, 0, 1] = 1.0
        if lrs_ivar is None:
            weight[:, 1:, 1:] = 1.0
        else:
            good = (lrs_ivar > 0).to(lrs_z.dtype).unfold(1, cfg.window, cfg.stride)
            weight[:, 1:, 1:] = good

        if cfg.ivar_channel:
            noise = torch.zeros(n, cfg.seq_len, cfg.window, dtype=lrs_z.dtype, device=lrs_z.device)
            if lrs_ivar is not None:
                std = 10.0 ** lrs_stats[:, 1:2]
                q = lrs_ivar.clamp_min(0) * std**2  # inverse variance in z units
                noise[:, 1:] = torch.sqrt(q / (1.0 + q)).unfold(1, cfg.window, cfg.stride)
            tokens = torch.cat([tokens, noise], dim=2)
        return tokens, weight

    def untokenize(self, tokens: torch.Tensor) -> torch.Tensor:
        """Window tokens (n, 146, >=21) -> z spectrum (n, 1462), averaging the overlaps.

        Pixels that no window covers (the last two) come back NaN.
        """
        cfg = self.config
        n = tokens.shape[0]
        values = tokens[:, 1:, 1 : 1 + cfg.window].reshape(n, -1)
        index = (
            torch.arange(cfg.n_windows, device=tokens.device)[:, None] * cfg.stride
            + torch.arange(cfg.window, device=tokens.device)
        ).reshape(-1)
        total = values.new_zeros(n, cfg.n_pixels).index_add_(1, index, values)
        count = values.new_zeros(cfg.n_pixels).index_add_(
            0, index, torch.ones_like(index, dtype=values.dtype)
        )
        return total / count  # 0/0 -> NaN where no window reaches
