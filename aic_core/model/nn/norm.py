"""Normalisation layers: torch's LayerNorm (with or without a bias), and RMSNorm as Llama computes it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm (Llama): x / rms(x) * weight, computed in float32 as Llama does."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.dtype == self.weight.dtype == torch.float32
        ):  # torch's rms_norm: one fused kernel each way on CUDA, the same math
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # bf16/fp16 input: normalise in fp32, round to the input's dtype, then scale, as Llama does.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(kind: str, dim: int, bias: bool, eps: float) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm '{kind}'; expected 'layernorm' or 'rmsnorm'")
