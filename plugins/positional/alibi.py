"""ALiBi (Press et al., "Train Short, Test Long", 2021): no position embedding; each head adds
-slope_h * distance to its attention scores, so attention fades linearly with how far back a key is.
Nothing is learned and nothing depends on a maximum length, so it extrapolates past block_size.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from aic_core.hookspecs import hookimpl
from aic_core.kinds import PluginOptions, Positional, PositionalPlugin
from aic_core.nn.transformer import TransformerConfig


def alibi_slopes(n_head: int, max_bias: float = 8.0) -> list[float]:
    """The paper's head slopes. For n a power of two: the geometric sequence 2^(-max_bias/n * i),
    i = 1..n. Otherwise (as the paper's code and BLOOM do): the n' = 2^floor(log2 n) slopes of n',
    then every other slope of 2n' (the ones between them) until there are n."""

    def geometric(n: int) -> list[float]:
        return [2.0 ** (-max_bias / n * i) for i in range(1, n + 1)]

    closest = 2 ** math.floor(math.log2(n_head))
    return geometric(closest) + geometric(2 * closest)[0::2][: n_head - closest]


class ALiBi(Positional):
    max_positions = None  # the bias is defined for any distance

    def __init__(self, n_head: int, max_bias: float) -> None:
        super().__init__()
        # Python floats rounded once to float32: the same slopes on every device. Not persistent:
        # they follow from n_head, so checkpoints hold no alibi tensors.
        self.register_buffer(
            "slopes", torch.tensor(alibi_slopes(n_head, max_bias), dtype=torch.float32), persistent=False
        )  # (H,)

    def attn_bias(self, q_positions: torch.Tensor, k_positions: torch.Tensor) -> torch.Tensor:
        # How far back each key is. Future keys (negative distance) are masked by the core anyway;
        # clamping keeps their bias finite and <= 0 before that.
        distance = (q_positions[:, :, None] - k_positions[:, None, :]).clamp(min=0).float()  # (B, Tq, Tk)
        # float32 even if the module was cast: the core casts the bias to q's dtype itself.
        return -self.slopes.float()[None, :, None, None] * distance[:, None]  # (B, H, Tq, Tk)


class Alibi(PositionalPlugin):
    """Attention with linear biases: a fixed per-head penalty proportional to the query-key distance."""

    name = "alibi"
    extrapolates = True

    class Options(PluginOptions):
        max_bias: float = Field(
            8.0,
            gt=0,
            description="The 8 in the paper's slopes 2^(-8/n_head * i): larger means steeper biases, "
            "so heads attend more locally.",
        )

    def build(self, options: PluginOptions, config: TransformerConfig) -> Positional:
        return ALiBi(config.n_head, options.max_bias)


@hookimpl
def aic_register_positional_encodings(register):
    register(Alibi)
