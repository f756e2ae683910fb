"""The XP "OAE": a plain MLP autoencoder of Gaia XP sampled spectra, used by every CLIP model.

Input: `specsearch.grids.xp_model_input` gives ``xp_x`` (n, 343) = flux / norm, norm the mean flux
over 500-600 nm, and ``xp_stats`` (n, 1) = log10(norm / (W m^-2 nm^-1)). Inside the model each
spectrum is z-scored again and the vector [mean, std, z (343)] (+ log10 norm, ``norm_stat_input``)
is encoded: Linear 346->1290, 2 MLP blocks (LayerNorm, 1290->3870->1290, GELU), bottleneck
1290->768 with LayerNorm (the latent), and a mirrored decoder back to the whole input vector;
the loss is the MSE on that vector.

The published model (compat) differs in three switches: the blocks have no residual connection,
there is no norm input (345), and the spectrum was divided by the flux at 550 nm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..grids import N_XP


@dataclass
class XPAutoencoderConfig:
    n_pixels: int = N_XP
    hidden: int = 1290
    expansion: int = 3
    n_blocks: int = 2
    latent: int = 768
    dropout: float = 0.0
    residual: bool = True  # published: False
    norm_stat_input: bool = True  # log10(norm) as one more input (published: absent)
    # asinh(mean) and log10(std) instead of mean and std (published: raw). Red or reddened stars
    # have flux / norm up to ~1e3 in the far red, and raw moments then dominate the MSE.
    log_moments: bool = True

    @property
    def input_dim(self) -> int:
        return 2 + self.n_pixels + (1 if self.norm_stat_input else 0)


class MLPBlock(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear, with an optional residual connection."""

    def __init__(self, width: int, hidden: int, dropout: float, residual: bool):
        super().__init__()
        self.residual = residual
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, hidden)
        self.gelu = nn.GELU()
        self.proj = nn.Linear(hidden, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop(self.proj(self.drop(self.gelu(self.fc(self.norm(x))))))
        return x + y if self.residual else y


class XPAutoencoder(nn.Module):
    kind = "xp_oae"

    def __init__(self, config: XPAutoencoderConfig):
        super().__init__()
        self.config = config
        c = config
        self.input_proj = nn.Linear(c.input_dim, c.hidden)
        self.encoder_blocks = nn.ModuleList(
            MLPBlock(c.hidden, c.expansion * c.hidden, c.dropout, c.residual)
            for _ in range(c.n_blocks)
        )
        self.to_latent = nn.Linear(c.hidden, c.latent)
        self.latent_norm = nn.LayerNorm(c.latent)
        self.from_latent = nn.Linear(c.latent, c.hidden)
        self.decoder_blocks = nn.ModuleList(
            MLPBlock(c.hidden, c.expansion * c.hidden, c.dropout, c.residual)
            for _ in range(c.n_blocks)
        )
        self.output_proj = nn.Linear(c.hidden, c.input_dim)
        for m in self.modules():
            if isinstance(m, nn.Linear):  # He init, as published: the blocks may be non-residual
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def input_vector(self, xp_x: torch.Tensor, xp_stats: torch.Tensor) -> torch.Tensor:
        """(n, 343) normalised flux + (n, 1) log10 norm -> (n, input_dim) [mean, std, z, (log norm)].

        With ``log_moments`` the first two are asinh(mean) and log10(std).
        """
        mean = xp_x.mean(dim=1, keepdim=True)
        std = xp_x.std(dim=1, keepdim=True).clamp_min(1e-6)  # unbiased, as published
        moments = [torch.asinh(mean), torch.log10(std)] if self.config.log_moments else [mean, std]
        parts = [*moments, (xp_x - mean) / std]
        if self.config.norm_stat_input:
            parts.append(xp_stats[:, :1])
        return torch.cat(parts, dim=1)

    def flux_from_vector(self, vector: torch.Tensor) -> torch.Tensor:
        """Inverse of `input_vector` for the spectrum: (n, input_dim) -> (n, 343) flux / norm."""
        n_pix = self.config.n_pixels
        mean, std = vector[:, 0:1], vector[:, 1:2]
        if self.config.log_moments:
            mean, std = torch.sinh(mean), 10.0**std
        return vector[:, 2 : 2 + n_pix] * std + mean

    def encode_vector(self, vector: torch.Tensor) -> torch.Tensor:
        h = self.input_proj(vector)
        for block in self.encoder_blocks:
            h = block(h)
        return self.latent_norm(self.to_latent(h))

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Latent (n, latent) -> reconstructed input vector (n, input_dim)."""
        h = self.from_latent(latent)
        for block in self.decoder_blocks:
            h = block(h)
        return self.output_proj(h)

    def forward(self, xp_x: torch.Tensor, xp_stats: torch.Tensor) -> torch.Tensor:
        """Spectra -> latent (n, latent): what the CLIP head reads."""
        return self.encode_vector(self.input_vector(xp_x, xp_stats))

    def embed(self, xp_x: torch.Tensor, xp_stats: torch.Tensor) -> torch.Tensor:
        return self.forward(xp_x, xp_stats)

    def reconstruction_loss(
        self, xp_x: torch.Tensor, xp_stats: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """MSE on the whole input vector. Returns {"loss", "latent", "reconstruction", "target"}."""
        target = self.input_vector(xp_x, xp_stats)
        latent = self.encode_vector(target)
        reconstruction = self.decode(latent)
        loss = F.mse_loss(reconstruction, target)
        return {"loss": loss, "latent": latent, "reconstruction": reconstruction, "target": target}
