"""Stellar-label heads: one multi-output network per modality on the CLIP features.

Each head predicts, for teff, logg, fe_h and alpha_m (`specsearch.schema.LABELS`), a mean and a
log-variance in standardised units; the scaler (per-label mean and std of the training labels)
lives in buffers, so it is saved with the weights. The loss is the Gaussian negative
log-likelihood, and a missing label (NaN) contributes neither loss nor gradient.
(The published model had one MLP regressor per label and no uncertainty.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..schema import LABELS

LOGVAR_RANGE = (-14.0, 8.0)  # sigma from 1e-3 to 55 standardised units


@dataclass
class LabelHeadConfig:
    labels: tuple[str, ...] = LABELS
    hidden: tuple[int, ...] = (1024, 512)
    dropout: float = 0.1


class LabelHead(nn.Module):
    """features (n, d) -> per-label mean and log-variance (standardised)."""

    def __init__(self, in_dim: int, config: LabelHeadConfig):
        super().__init__()
        self.config = config
        n_labels = len(config.labels)
        layers: list[nn.Module] = []
        width = in_dim
        for hidden in config.hidden:
            layers += [
                nn.Linear(width, hidden),
                nn.LayerNorm(hidden),
                nn.GELU(),
                nn.Dropout(config.dropout),
            ]
            width = hidden
        self.mlp = nn.Sequential(*layers)
        self.out = nn.Linear(width, 2 * n_labels)
        self.register_buffer("label_mean", torch.zeros(n_labels))
        self.register_buffer("label_std", torch.ones(n_labels))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        # per-label factor on the predicted sigma, set on validation data (`calibrate_sigma`)
        self.register_buffer("sigma_scale", torch.ones(n_labels))

    def set_scaler(self, mean, std) -> None:
        """Store the training labels' per-label mean and std (physical units) and mark fitted."""
        mean = torch.as_tensor(mean, dtype=self.label_mean.dtype)
        std = torch.as_tensor(std, dtype=self.label_std.dtype)
        if mean.shape != self.label_mean.shape or std.shape != self.label_std.shape:
            raise ValueError(f"scaler needs {len(self.config.labels)} values per label")
        if not torch.all(std > 0):
            raise ValueError("label std must be positive")
        self.label_mean.copy_(mean)
        self.label_std.copy_(std)
        self.fitted.fill_(True)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (mean, logvar), each (n, n_labels), in standardised units."""
        mean, logvar = self.out(self.mlp(features)).chunk(2, dim=-1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def predict(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (mean, sigma), each (n, n_labels), in the labels' physical units."""
        mean, logvar = self.forward(features)
        sigma = torch.exp(0.5 * logvar) * self.label_std * self.sigma_scale
        return mean * self.label_std + self.label_mean, sigma

    @torch.no_grad()
    def calibrate_sigma(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Scale each label's sigma so that |pred - ref| / sigma has the spread of a unit Gaussian
        on held-out stars (1.4826 x median |z| = 1). labels: (n, n_labels), NaN = unknown.
        Returns the factors (n_labels,)."""
        self.sigma_scale.fill_(1.0)
        mean, sigma = self.predict(features)
        z = (mean - labels).abs() / sigma
        factors = torch.ones_like(self.sigma_scale)
        for j in range(z.shape[1]):
            known = torch.isfinite(z[:, j])
            if known.sum() >= 20:
                factors[j] = 1.4826 * z[known, j].median()
        self.sigma_scale.copy_(factors)
        return factors

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Gaussian NLL averaged over the known labels. labels: (n, n_labels), NaN = unknown."""
        mean, logvar = self.forward(features)
        return gaussian_nll(mean, logvar, (labels - self.label_mean) / self.label_std)


def gaussian_nll(mean: torch.Tensor, logvar: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0.5 * (log(2 pi) + logvar + (target - mean)^2 / var), averaged over non-NaN targets.

    NaN targets are replaced before any arithmetic (not multiplied by 0 afterwards, which would
    give NaN gradients), so they contribute exactly zero gradient.
    """
    known = torch.isfinite(target)
    safe_target = torch.where(known, target, mean.detach())
    nll = 0.5 * (math.log(2 * math.pi) + logvar + (safe_target - mean) ** 2 * torch.exp(-logvar))
    nll = torch.where(known, nll, torch.zeros_like(nll))
    return nll.sum() / known.sum().clamp_min(1)
