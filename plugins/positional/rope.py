"""Rotary position embeddings (RoPE, Su et al. 2021), in Hugging Face Llama's layout.

Each pair of dims (i, i + rotary_dim/2) of q and k is rotated by the angle position * inv_freq[i], so
q·k depends only on the distance between the two positions. The pairs are the first and second halves of
the rotary dims ("rotate_half", not interleaved), as in transformers' Llama and GPT-NeoX: their q/k weights
load without any permutation. Partial rotary (GPT-NeoX, Phi) rotates only the first rotary_dim dims of a
head; linear scaling (position interpolation) divides the positions by a factor.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from pydantic import Field

from aic_core.errors import SpecError
from aic_core.hookspecs import hookimpl
from aic_core.kinds import PluginOptions, Positional, PositionalPlugin
from aic_core.nn.transformer import TransformerConfig

if TYPE_CHECKING:
    from aic_core.spec import RunSpec


class RopeOptions(PluginOptions):
    """Rotary position embeddings: q and k are rotated by their absolute position; no weights, no length limit."""

    theta: float = Field(
        10000.0, gt=0, description="The base of the rotation frequencies (Llama 2: 10000, Llama 3: 500000)."
    )
    rotary_fraction: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Fraction of each head's dims that rotate (GPT-NeoX 0.25, Phi 0.4): "
        "the first int(head_dim * fraction), which must be even.",
    )
    scaling_factor: float = Field(
        1.0,
        ge=1,
        description="Linear position scaling (position interpolation): positions are divided by this, "
        "to stretch the trained context.",
    )


class RotaryPositions(Positional):
    max_positions = None  # any position: angles are computed from the positions

    def __init__(self, head_dim: int, rotary_dim: int, theta: float, scaling_factor: float) -> None:
        super().__init__()
        self.head_dim, self.rotary_dim = head_dim, rotary_dim
        self.theta, self.scaling_factor = theta, scaling_factor
        # inv_freq exactly as transformers computes it (float32 pow, then / factor for "linear"), so the angles
        # match bit for bit.
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device="cpu").float() / rotary_dim
        self.inv_freq = 1.0 / (theta**exponents) / scaling_factor  # (rotary_dim/2,)
        self._cached: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (positions, cos, sin)

    def _angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) -> cos, sin (B, 1, T, rotary_dim/2) in float32, broadcasting over heads.

        Computed from the positions themselves (no table to outgrow, no host sync), and cached for the
        positions tensor at hand: every layer of one forward receives the same one."""
        cached = self._cached
        if cached is not None and cached[0] is positions and not torch.compiler.is_compiling():
            return cached[1], cached[2]
        if (
            self.inv_freq.device != positions.device
        ):  # moved once, not copied from the host at every call (which a CUDA graph cannot capture)
            self.inv_freq = self.inv_freq.to(positions.device)
        angles = positions[..., None].float() * self.inv_freq  # (B, T, rotary_dim/2)
        cos, sin = angles.cos()[:, None], angles.sin()[:, None]
        if not torch.compiler.is_compiling():
            self._cached = (positions, cos, sin)
        return cos, sin

    def rotate(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self._angles(positions)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (B, H, T, D): rotate the first rotary_dim dims in float32; the rest pass through unchanged."""
        r = self.rotary_dim
        x1, x2 = x[..., : r // 2].float(), x[..., r // 2 : r].float()  # (B, H, T, r/2) each: the pairs' two halves
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)  # (B, H, T, r)
        return rotated if r == x.shape[-1] else torch.cat((rotated, x[..., r:]), dim=-1)

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, theta={self.theta}, "
            f"scaling_factor={self.scaling_factor}"
        )


def rotary_dim(n_embd: int, n_head: int, fraction: float) -> int:
    """The number of rotating dims per head; a SpecError saying what to change when it is odd or zero."""
    head_dim = n_embd // n_head
    r = int(head_dim * fraction)
    if r >= 2 and r % 2 == 0:
        return r
    fixes = []
    if fraction < 1 and head_dim >= 2:
        below, above = max(2, r - r % 2), r + r % 2  # the even dim counts either side of r
        for e in sorted({below, above} & set(range(2, head_dim + 1, 2))):
            fixes.append(f"model.positional.rotary_fraction = {_fraction_for(e, head_dim)!r} ({e} dims)")
    if head_dim % 2:
        heads = [h for h in range(1, n_embd + 1) if n_embd % h == 0 and (n_embd // h) % 2 == 0]
        if heads:
            best = min(heads, key=lambda h: abs(h - n_head))
            fixes.append(f"model.n_head = {best} (head size {n_embd // best})")
        else:
            fixes.append("an even model.n_embd")
        if fraction == 1 and head_dim >= 3:
            fixes.append(
                f"model.positional.rotary_fraction = {_fraction_for(head_dim - 1, head_dim)!r} ({head_dim - 1} dims)"
            )
    where = "model.positional.rotary_fraction" if fraction < 1 and head_dim >= 2 else "model.n_embd / model.n_head"
    raise SpecError(
        f"{where}: RoPE rotates pairs of dims, so the rotary dims per head, int(head size * rotary_fraction) = "
        f"int({head_dim} * {fraction}) = {r}, must be even and at least 2 (head size = model.n_embd / model.n_head "
        f"= {n_embd} / {n_head}). To fix, set {' or '.join(fixes)}."
    )


def _fraction_for(dims: int, head_dim: int) -> float:
    """A rotary_fraction f with int(head_dim * f) == dims (dims / head_dim, nudged up past float rounding)."""
    f = dims / head_dim
    while int(head_dim * f) < dims:
        f = math.nextafter(f, 2.0)
    return f


class Rope(PositionalPlugin):
    """Rotary position embeddings (Llama, GPT-NeoX): q and k rotated by position; extrapolates past block_size."""

    name = "rope"
    Options = RopeOptions
    extrapolates = True
    supports_kv_cache = True

    def check(self, options: RopeOptions, spec: RunSpec) -> None:
        # The model plugin owns the head size; read it where the model's options have it (gpt2: n_embd, n_head).
        n_embd, n_head = getattr(spec.model, "n_embd", None), getattr(spec.model, "n_head", None)
        if isinstance(n_embd, int) and isinstance(n_head, int) and n_head > 0:
            rotary_dim(n_embd, n_head, options.rotary_fraction)

    def build(self, options: RopeOptions, config: TransformerConfig) -> Positional:
        r = rotary_dim(config.n_embd, config.n_head, options.rotary_fraction)
        return RotaryPositions(config.head_dim, r, options.theta, options.scaling_factor)

    def plan_cache_bytes(self, options: RopeOptions, config: TransformerConfig, batch_size: int, seq_len: int) -> int:
        """cos and sin, (B, 1, T, rotary_dim/2) float32 each: computed once per forward, kept by every layer."""
        return 2 * (rotary_dim(config.n_embd, config.n_head, options.rotary_fraction) // 2) * 4 * batch_size * seq_len


@hookimpl
def aic_register_positional_encodings(register):
    register(Rope)
