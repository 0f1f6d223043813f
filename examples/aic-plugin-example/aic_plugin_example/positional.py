"""Sinusoidal position encodings (Vaswani et al., 2017, section 3.5), added to the token embeddings:

    PE[pos, 2i] = sin(pos / base^(2i / n_embd)),   PE[pos, 2i + 1] = cos(pos / base^(2i / n_embd))

Nothing is learned. The encoding is computed from the absolute positions it is given, so it works with
the KV cache, with left-padded batches and at any position (max_positions = None).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from aic_core.errors import SpecError
from aic_core.hookspecs import hookimpl
from aic_core.kinds import PluginOptions, Positional, PositionalPlugin
from aic_core.nn.transformer import TransformerConfig


class SinusoidalOptions(PluginOptions):
    """Fixed sine/cosine positions added to the token embeddings; no weights, no length limit."""

    base: float = Field(10000.0, gt=1, description="The wavelengths run from 2*pi to base*2*pi (the paper: 10000).")


class SinusoidalPositions(Positional):
    max_positions = None  # defined for every position

    def __init__(self, n_embd: int, base: float) -> None:
        super().__init__()
        self.base = base
        inv_freq = 1.0 / base ** (torch.arange(0, n_embd, 2, dtype=torch.float64) / n_embd)  # (n_embd/2,)
        # Not persistent: it follows from the options, so checkpoints hold no tensor for it.
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def embed(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        angles = positions[..., None].float() * self.inv_freq  # (B, T, n_embd/2)
        pe = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)  # (B, T, n_embd): sin, cos interleaved
        return x + pe.to(x.dtype)

    def extra_repr(self) -> str:
        return f"base={self.base}"


def _check_even(n_embd: int) -> None:
    if n_embd % 2:
        raise SpecError(
            f"model.n_embd: sinusoidal positions pair a sine and a cosine per frequency, so n_embd must be even (got {n_embd}). "
            f"Set model.n_embd to {n_embd + 1} or {n_embd - 1}, or use another positional encoding."
        )


class Sinusoidal(PositionalPlugin):
    """The original Transformer's fixed sinusoidal positions."""

    name = "sinusoidal"
    Options = SinusoidalOptions
    extrapolates = True  # defined at any position (how well a model generalises past its training length is another matter)
    supports_kv_cache = True

    def check(self, options: SinusoidalOptions, spec: Any) -> None:
        n_embd = getattr(spec.model, "n_embd", None)  # the model plugin owns the width; most call it n_embd
        if isinstance(n_embd, int):
            _check_even(n_embd)

    def build(self, options: SinusoidalOptions, config: TransformerConfig) -> Positional:
        _check_even(config.n_embd)
        return SinusoidalPositions(config.n_embd, options.base)


@hookimpl
def aic_register_positional_encodings(register):
    register(Sinusoidal)
