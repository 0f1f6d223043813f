"""A pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from aic_core.model.nn.attention import CausalSelfAttention
from aic_core.model.nn.kv_cache import KVCache
from aic_core.model.nn.mlp import make_mlp
from aic_core.model.nn.norm import make_norm
from aic_core.model.nn.positional import Positional

if TYPE_CHECKING:
    from aic_core.model.nn.transformer import TransformerConfig


class Block(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.norm1 = make_norm(config.norm, config.n_embd, config.bias, config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.norm2 = make_norm(config.norm, config.n_embd, config.bias, config.norm_eps)
        self.mlp = make_mlp(config.mlp, config.n_embd, config.hidden, config.bias, config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        positional: Positional,
        mask: torch.Tensor | None,
        causal: bool,
        cache: KVCache | None = None,
        layer: int = 0,
        start: int = 0,
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), positions, positional, mask, causal, cache, layer, start)
        return x + self.mlp(self.norm2(x))

    def decode(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        positional: Positional,
        mask: torch.Tensor,
        cache: KVCache,
        layer: int,
        slot: torch.Tensor,
    ) -> torch.Tensor:
        """`forward` for one token per row against the whole cache (see CausalSelfAttention.decode)."""
        x = x + self.attn.decode(self.norm1(x), positions, positional, mask, cache, layer, slot)
        return x + self.mlp(self.norm2(x))
