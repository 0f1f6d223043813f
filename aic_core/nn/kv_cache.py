"""A preallocated per-layer KV cache.

Slot s of every sequence holds token s of the (left-padded) batch, so one write index serves the whole
batch; `valid` marks which slots hold real tokens and `positions` their absolute positions. Only the KV
heads are stored (grouped-query attention keeps n_kv_head <= n_head).
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_kv_head: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.positions = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.max_len = max_len
        self.length = 0  # slots filled so far
        self.has_padding = False  # some slot is left padding, so attention needs an explicit mask

    def append(self, positions: torch.Tensor, valid: torch.Tensor) -> int:
        """Reserve slots for T new tokens (positions, valid: (B, T)); return the first slot."""
        start, T = self.length, positions.shape[1]
        if start + T > self.max_len:
            raise ValueError(f"KV cache full: {start} + {T} tokens > max_len {self.max_len}")
        self.positions[:, start : start + T] = positions
        self.valid[:, start : start + T] = valid
        self.length = start + T
        return start

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, Hkv, T, D) at `start`; return all keys and values so far (B, Hkv, start+T, D)."""
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]
