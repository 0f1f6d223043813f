"""gpt-relu2: a GPT whose MLP uses the squared ReLU, relu(x)^2 (Primer, So et al., 2021), with RMSNorm
and no biases. It is aic's core Transformer with each block's MLP swapped for ReLU2MLP, so generation,
the KV cache, checkpoints and trainers work with it unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from aic_core.hookspecs import hookimpl
from aic_core.kinds import ModelPlugin, PluginOptions, Positional
from aic_core.nn.transformer import Transformer, TransformerConfig


class ReLU2MLP(nn.Module):
    """fc -> relu(x)^2 -> proj. The layer names match the core MLP's, so adapters target it as 'mlp.fc' / 'mlp.proj'."""

    def __init__(self, n_embd: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, hidden, bias=False)
        self.proj = nn.Linear(hidden, n_embd, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.relu(self.fc(x)).square()))


class GPTReLU2Options(PluginOptions):
    """A GPT with RMSNorm and a squared-ReLU MLP. Every field has a small default."""

    n_layer: int = Field(4, gt=0)
    n_head: int = Field(4, gt=0)
    n_embd: int = Field(128, gt=0)
    block_size: int = Field(128, gt=1, description="Context length.")
    mlp_ratio: float = Field(4.0, gt=0, description="Width of the MLP as a multiple of n_embd.")
    vocab_size: int | None = Field(None, gt=0, description="Default: the tokenizer's vocabulary size.")
    dropout: float = Field(0.0, ge=0, lt=1)
    tie_embeddings: bool = True

    @model_validator(mode="after")
    def _heads_divide_width(self) -> GPTReLU2Options:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); pick an n_head that divides it")
        return self


class GPTReLU2(ModelPlugin):
    """GPT with RMSNorm and a squared-ReLU MLP (Primer's MLP)."""

    name = "gpt-relu2"
    Options = GPTReLU2Options
    default_positional = "sinusoidal"

    def config(self, options: GPTReLU2Options, vocab_size: int) -> TransformerConfig:
        return TransformerConfig(
            vocab_size=options.vocab_size or vocab_size,
            block_size=options.block_size,
            n_layer=options.n_layer,
            n_head=options.n_head,
            n_embd=options.n_embd,
            mlp_hidden=round(options.mlp_ratio * options.n_embd),
            norm="rmsnorm",
            bias=False,
            dropout=options.dropout,
            tie_embeddings=options.tie_embeddings,
        )

    def build(self, options: GPTReLU2Options, config: TransformerConfig, positional: Positional) -> Transformer:
        model = Transformer(config, positional)
        for block in model.blocks:
            block.mlp = ReLU2MLP(config.n_embd, config.hidden, config.dropout)
            # The core's initialisation: N(0, 0.02), the residual projection scaled by 1/sqrt(2 * n_layer).
            nn.init.normal_(block.mlp.fc.weight, mean=0.0, std=0.02)
            nn.init.normal_(block.mlp.proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        return model


@hookimpl
def aic_register_models(register):
    register(GPTReLU2)
