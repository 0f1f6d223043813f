"""Causal self-attention on torch's scaled_dot_product_attention, with grouped-query heads."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from aic_core.model.nn.kv_cache import KVCache
from aic_core.model.nn.positional import Positional

if TYPE_CHECKING:
    from aic_core.model.nn.transformer import TransformerConfig


class CausalSelfAttention(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.kv_heads
        self.head_dim = config.head_dim
        # One matmul for q, k and v: [q heads | k heads | v heads].
        self.qkv = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=config.bias)
        self.proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=config.bias)
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

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
        B, T, _ = x.shape
        q_size, kv_size = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.qkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = positional.rotate(q, k, positions)
        if cache is not None:
            k, v = cache.update(layer, start, k, v)  # (B, Hkv, start+T, D)
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(q.dtype)  # an additive bias must match q's dtype under autocast
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.attn_dropout if self.training else 0.0,
            is_causal=causal,
            enable_gqa=self.n_kv_head != self.n_head,
        )  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, q_size)
        return self.resid_dropout(self.proj(y))

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
        """One token per row, x (B, 1, C), attending over the cache: the same shapes at every step.
        mask (B|1, 1|H, 1, S): additive, -inf on the slots this token must not see (padding, later slots),
        over the first S slots of the cache (all of them but for an eager caller's window); slot (1,) long
        on the device: where this token's k, v go."""
        B = x.shape[0]
        q_size, kv_size = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        qkv = self.qkv(x)  # (B, 1, q_size + 2 kv_size)
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(B, 1, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, 1, D)
        k = k.view(B, 1, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, 1, D)
        v = v.view(B, 1, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, rotated = positional.rotate(q, k, positions)
        if rotated is k:  # keys as computed (no rotation): k and v are one slice of the matmul's output
            kv = (
                qkv[..., q_size:].view(B, 1, 2, self.n_kv_head, self.head_dim).permute(2, 0, 3, 1, 4)
            )  # (2, B, Hkv, 1, D)
        else:
            kv = torch.stack((rotated, v))
        k, v = cache.update_at(layer, slot, kv)  # (B, Hkv, max_len, D)
        S = mask.shape[-1]
        k, v = k[:, :, :S], v[:, :, :S]  # (B, Hkv, S, D)
        # The G query heads that share a KV head attend as G queries of that head: grouped-query attention
        # without enable_gqa (the masked SDPA kernels do not take it) and without repeating K and V.
        G = self.n_head // self.n_kv_head
        q = q.reshape(B, self.n_kv_head, G, self.head_dim)  # (B, Hkv, G, D)
        if mask.shape[1] > 1:  # one bias per query head (ALiBi): (B, H, 1, S) -> (B, Hkv, G, S)
            mask = mask.reshape(mask.shape[0], self.n_kv_head, G, mask.shape[-1])
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, Hkv, G, D)
        return self.proj(y.reshape(B, 1, q_size))
