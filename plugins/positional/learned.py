"""Learned absolute position embeddings (GPT-2's wpe)."""

from __future__ import annotations

import torch
from torch import nn

from aic_core.hookspecs import hookimpl
from aic_core.kinds import PluginOptions, Positional, PositionalPlugin
from aic_core.nn.transformer import TransformerConfig


class LearnedPositions(Positional):
    def __init__(self, max_positions: int, n_embd: int) -> None:
        super().__init__()
        self.max_positions = max_positions
        self.wpe = nn.Embedding(max_positions, n_embd)

    def embed(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return x + self.wpe(positions)  # (B, T, C) + (B, T, C)


class Learned(PositionalPlugin):
    """A learned embedding per position, added to the token embeddings; cannot go past block_size."""

    name = "learned"
    extrapolates = False

    class Options(PluginOptions):
        """Learned positions take no options: one embedding per position up to the model's block_size."""

    def build(self, options: PluginOptions, config: TransformerConfig) -> Positional:
        return LearnedPositions(config.block_size, config.n_embd)


@hookimpl
def aic_register_positional_encodings(register):
    register(Learned)
