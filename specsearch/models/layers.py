"""Building blocks shared by the SpecCLIP model families.

Pre-LayerNorm transformer pieces (`Attention`, `MLP`, `Block`), the learned-query `AttentionPool`,
and the two helpers of masked pre-training: `chunk_mask` (which tokens to hide) and `masked_mse`
(the published loss on the hidden tokens).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_SCALES = ("sqrt", "linear")


def attention_scale(head_dim: int, kind: str) -> float:
    """Logit scale of dot-product attention.

    "sqrt" is the usual 1/sqrt(head_dim). "linear" is 1/head_dim: what the published SpecCLIP
    attention computes, because it scales q by 1/sqrt(head_dim) and then calls
    scaled_dot_product_attention, which scales again. Only `compat` asks for it.
    """
    if kind == "sqrt":
        return 1.0 / math.sqrt(head_dim)
    if kind == "linear":
        return 1.0 / head_dim
    raise ValueError(f"attention_scale must be one of {ATTENTION_SCALES}, got {kind!r}")


class Attention(nn.Module):
    """Multi-head self-attention with one fused q/k/v projection."""

    def __init__(self, width: int, n_heads: int, dropout: float = 0.0, scale: str = "sqrt"):
        super().__init__()
        if width % n_heads:
            raise ValueError(f"width {width} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.dropout = dropout
        self.scale = attention_scale(width // n_heads, scale)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (a.view(n, t, self.n_heads, c // self.n_heads).transpose(1, 2) for a in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, scale=self.scale
        )
        y = y.transpose(1, 2).reshape(n, t, c)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    """width -> hidden -> width with GELU; the transformer's feed-forward and the heads' residual MLP."""

    def __init__(self, width: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc = nn.Linear(width, hidden)
        self.gelu = nn.GELU()
        self.proj = nn.Linear(hidden, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(self.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(
        self,
        width: int,
        n_heads: int,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
        scale: str = "sqrt",
    ):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, n_heads, dropout, scale)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_ratio * width, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class AttentionPool(nn.Module):
    """One learned query attends over a token sequence: (n, t, token_width) -> (n, width).

    Multi-head, with separate q/k/v projections so the tokens may be wider or narrower than the
    output (this is what torch's MultiheadAttention with kdim/vdim computes).
    """

    def __init__(self, token_width: int, width: int, n_heads: int):
        super().__init__()
        if width % n_heads:
            raise ValueError(f"width {width} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.query = nn.Parameter(torch.randn(1, 1, width))
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(token_width, width)
        self.v_proj = nn.Linear(token_width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n, t, _ = tokens.shape
        width = self.query.shape[-1]
        head_dim = width // self.n_heads
        q = self.q_proj(self.query).view(1, 1, self.n_heads, head_dim).transpose(1, 2)
        q = q.expand(n, -1, -1, -1)
        k = self.k_proj(tokens).view(n, t, self.n_heads, head_dim).transpose(1, 2)
        v = self.v_proj(tokens).view(n, t, self.n_heads, head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)  # (n, heads, 1, head_dim)
        return self.out_proj(y.transpose(1, 2).reshape(n, width))


class MaskedTransformer(nn.Module):
    """A pre-LayerNorm transformer over the tokens of a spectrum, pre-trained by masked-token
    modelling: SpecFormer (LRS windows) and the XP transformer (one token per sample).

    A subclass says how spectra become tokens: ``tokenize(*spectra) -> (tokens (n, t, in), weight
    (n, t, out))``, ``weight`` marking the elements of the first ``out`` channels that carry data
    (the loss target). Its config has width, depth, n_heads, mlp_ratio, dropout, attention_scale,
    max_len, seq_len, mask_chunks and mask_chunk_width.
    """

    def __init__(self, config: Any, in_channels: int, out_channels: int):
        super().__init__()
        if config.seq_len > config.max_len:
            raise ValueError(f"{config.seq_len} tokens exceed max_len {config.max_len}")
        self.config = config
        self.token_embed = nn.Linear(in_channels, config.width)
        self.pos_embed = nn.Embedding(config.max_len, config.width)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(
                config.width,
                config.n_heads,
                config.mlp_ratio,
                config.dropout,
                config.attention_scale,
            )
            for _ in range(config.depth)
        )
        self.ln_f = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, out_channels)
        init_transformer_weights(self, config.depth)

    def tokenize(self, *spectra: Any) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(n, t, in_channels) -> hidden states (n, t, width) after the final LayerNorm."""
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.drop(self.token_embed(tokens) + self.pos_embed(pos))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def forward(self, *spectra: Any) -> torch.Tensor:
        """Spectra -> token hidden states (n, t, width): what a CLIP head pools."""
        tokens, _ = self.tokenize(*spectra)
        return self.forward_tokens(tokens)

    def embed(self, *spectra: Any) -> torch.Tensor:
        """Mean over the token hidden states: (n, width). (Attention pooling is the CLIP head's.)"""
        return self.forward(*spectra).mean(dim=1)

    def masked_loss(
        self, *spectra: Any, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Hide mask_chunks x mask_chunk_width tokens (all channels set to 0), predict them, MSE
        on the hidden data elements.

        Returns {"loss", "mask" (n, t) bool, "prediction" (n, t, out), "target"}.
        """
        cfg = self.config
        tokens, weight = self.tokenize(*spectra)
        mask = chunk_mask(
            tokens.shape[0],
            cfg.seq_len,
            cfg.mask_chunks,
            cfg.mask_chunk_width,
            generator,
            tokens.device,
        )
        prediction = self.head(self.forward_tokens(tokens.masked_fill(mask[..., None], 0.0)))
        target = tokens[..., : self.head.out_features]
        loss = masked_mse(prediction, target, mask, weight)
        return {"loss": loss, "mask": mask, "prediction": prediction, "target": target}


def init_transformer_weights(module: nn.Module, depth: int) -> None:
    """GPT-style init: N(0, 0.02) weights, zero biases, residual projections scaled by depth."""
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear):
            std = 0.02
            if name.endswith("attn.proj") or name.endswith("mlp.proj"):
                std = 0.02 / math.sqrt(2 * depth)
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)


def chunk_mask(
    n: int,
    length: int,
    n_chunks: int,
    chunk_width: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Which tokens to hide: (n, length) bool with exactly n_chunks * chunk_width True per row.

    As published: the sequence is cut into n_chunks equal segments and one contiguous chunk of
    chunk_width tokens is hidden at a uniformly random offset inside each segment, so chunks never
    overlap. 6 x 10 of the LRS's 146 tokens is 41%.
    """
    segment = length // n_chunks
    if segment <= chunk_width:
        raise ValueError(
            f"cannot place {n_chunks} chunks of {chunk_width} tokens in a sequence of {length}"
        )
    offsets = torch.randint(0, segment - chunk_width, (n, n_chunks), generator=generator)
    starts = offsets + segment * torch.arange(n_chunks)
    positions = (starts[:, :, None] + torch.arange(chunk_width)).reshape(n, -1)
    mask = torch.zeros(n, length, dtype=torch.bool)
    mask.scatter_(1, positions, True)
    return mask.to(device) if device is not None else mask


def masked_mse(
    prediction: torch.Tensor, target: torch.Tensor, token_mask: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """The published masked-modelling loss.

    SpecCLIP computes ``mse_loss(pred * locs, target * locs, reduction="mean") / locs.mean()``,
    with locs the hidden elements: the mean squared error over the hidden elements only. Here
    locs = token_mask (n, t) x weight (n, t, c), where weight marks the elements that carry data
    (window values of a spectrum token, the statistics of the stats token, and no bad pixels).
    The published code found locs as ``input != target``, which also drops hidden elements whose
    value happens to be exactly 0; with an explicit weight that accident is gone.
    """
    locs = token_mask[..., None].to(prediction.dtype) * weight.to(prediction.dtype)
    mse = F.mse_loss(prediction * locs, target * locs, reduction="mean")
    return mse / locs.mean().clamp_min(1e-12)
