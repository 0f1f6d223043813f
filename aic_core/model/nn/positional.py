"""The interface attention asks for positions; positional plugins subclass it (aic_core.plugins.kinds re-exports it)."""

from __future__ import annotations

import torch
from torch import nn


class Positional(nn.Module):
    """What attention calls. All three hooks take absolute positions (B, T), so they work with the
    KV cache and with left-padded batches. The defaults do nothing; a plugin overrides the ones it needs.
    """

    # The largest position this encoding can represent, or None if it extrapolates without limit.
    max_positions: int | None = None

    def embed(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, T, C) -> embeddings with positions added (learned, sinusoidal)."""
        return x

    def rotate(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q (B, H, T, D), k (B, Hkv, T, D) -> rotated q, k (RoPE)."""
        return q, k

    def attn_bias(self, q_positions: torch.Tensor, k_positions: torch.Tensor) -> torch.Tensor | None:
        """Additive attention-score bias (B, H, Tq, Tk) for query/key positions (B, Tq), (B, Tk) (ALiBi)."""
        return None
