"""What the model plugins share: filling a shape from a named preset, with fields overriding it."""

from __future__ import annotations

from typing import Any


def fill_from_preset(options: Any, presets: dict[str, dict[str, int]], fields: tuple[str, ...]) -> None:
    """Set every unset (None) field in `fields` from the chosen preset; refuse a shape left incomplete."""
    preset = presets.get(options.preset or "", {})
    for key in fields:
        if getattr(options, key) is None:
            if key not in preset:
                raise ValueError(f"'{key}' is not set: set it, or choose a preset ({', '.join(presets)})")
            setattr(options, key, preset[key])
    if options.n_embd % options.n_head:
        raise ValueError(
            f"n_embd ({options.n_embd}) must be divisible by n_head ({options.n_head}); "
            f"for example n_head={divisor_near(options.n_embd, options.n_head)}"
        )


def divisor_near(n: int, d: int) -> int:
    return min((k for k in range(1, n + 1) if n % k == 0), key=lambda k: abs(k - d))


def pad_vocab(state: dict, padded_vocab_size: int) -> dict:
    """Pad the embedding (and an untied head) to padded_vocab_size rows with zeros."""
    import torch

    for key in ("wte.weight", "lm_head.weight"):
        t = state.get(key)
        if t is not None and t.shape[0] < padded_vocab_size:
            state[key] = torch.cat([t, t.new_zeros(padded_vocab_size - t.shape[0], t.shape[1])])
    return state
