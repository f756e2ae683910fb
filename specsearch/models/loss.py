"""The contrastive loss of the CLIP stage: symmetric InfoNCE on L2-normalised features.

The temperature is a learnable log-scale parameter owned by the model (``SpecCLIPModel.logit_scale``,
initialised at log(1/0.07); the published model fixed the scale at 15.5). Its exponential is
clamped at 100. With torch.distributed initialised, negatives are gathered from every process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def gather_features(features: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All features of every process (rank order) and this process's offset into them.

    The local slice keeps its gradient; the others are constants. Without an initialised
    process group (or with one process) this is the identity and offset 0.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features, 0
    world, rank = dist.get_world_size(), dist.get_rank()
    gathered = [torch.zeros_like(features) for _ in range(world)]
    dist.all_gather(gathered, features.detach().contiguous())
    gathered[rank] = features
    return torch.cat(gathered, dim=0), rank * features.shape[0]


def clip_logits(
    lrs_features: torch.Tensor,
    xp_features: torch.Tensor,
    logit_scale: torch.Tensor,
    max_scale: float = 100.0,
) -> torch.Tensor:
    """(n, d), (n, d) -> (n, n) scaled cosine similarities, rows LRS, columns XP."""
    scale = logit_scale.exp().clamp(max=max_scale)
    return scale * F.normalize(lrs_features, dim=-1) @ F.normalize(xp_features, dim=-1).T


class ClipLoss(nn.Module):
    """Symmetric cross-entropy of matching each LRS to its own star's XP, and the reverse."""

    def __init__(self, gather: bool = True, max_scale: float = 100.0):
        super().__init__()
        self.gather = gather
        self.max_scale = max_scale

    def forward(
        self, lrs_features: torch.Tensor, xp_features: torch.Tensor, logit_scale: torch.Tensor
    ) -> torch.Tensor:
        """lrs_features, xp_features: (n, d) paired rows; logit_scale: log of the inverse temperature."""
        lrs = F.normalize(lrs_features, dim=-1)
        xp = F.normalize(xp_features, dim=-1)
        offset = 0
        if self.gather:
            all_lrs, offset = gather_features(lrs)
            all_xp, _ = gather_features(xp)
        else:
            all_lrs, all_xp = lrs, xp
        scale = logit_scale.exp().clamp(max=self.max_scale)
        logits_lrs = scale * lrs @ all_xp.T  # local LRS against every XP
        logits_xp = scale * xp @ all_lrs.T
        labels = torch.arange(lrs.shape[0], device=lrs.device) + offset
        return 0.5 * (F.cross_entropy(logits_lrs, labels) + F.cross_entropy(logits_xp, labels))
