"""Feed-forward layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """GPT-2's MLP: fc -> GELU (tanh approximation, as GPT-2 was trained) -> proj."""

    def __init__(self, n_embd: int, hidden: int, bias: bool, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, hidden, bias=bias)
        self.proj = nn.Linear(hidden, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class SwiGLU(nn.Module):
    """Llama's gated MLP: proj(silu(gate(x)) * up(x)); gate and up share one matmul."""

    def __init__(self, n_embd: int, hidden: int, bias: bool, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, 2 * hidden, bias=bias)  # rows [gate | up]
        self.proj = nn.Linear(hidden, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc(x).chunk(2, dim=-1)
        return self.dropout(self.proj(F.silu(gate) * up))


def make_mlp(kind: str, n_embd: int, hidden: int, bias: bool, dropout: float) -> nn.Module:
    if kind == "gelu":
        return MLP(n_embd, hidden, bias, dropout)
    if kind == "swiglu":
        return SwiGLU(n_embd, hidden, bias, dropout)
    raise ValueError(f"unknown mlp '{kind}'; expected 'gelu' or 'swiglu'")
