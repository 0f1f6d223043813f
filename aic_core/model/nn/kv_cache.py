"""A preallocated per-layer KV cache.

Slot s of every sequence holds token s of the (left-padded) batch, so one write index serves the whole
batch; `valid` marks which slots hold real tokens and `positions` their absolute positions. Only the KV
heads are stored (grouped-query attention keeps n_kv_head <= n_head).

Two ways to write: `append` + `update` take a Python start slot and return the filled prefix (the prompt,
and any forward pass); `update_at` takes the slot as a tensor on the device and returns the whole buffer,
so a one-token decode step has the same shapes at every step and a CUDA graph can capture it.
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
        # Keys and values in one buffer, so that a decode step writes a token's k and v in one kernel;
        # k and v are views of it (layers, batch, n_kv_head, max_len, head_dim), made where they are used.
        self.kv = torch.zeros((n_layer, 2, batch_size, n_kv_head, max_len, head_dim), dtype=dtype, device=device)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.positions = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.slots = torch.arange(max_len, device=device)  # (max_len,): slot numbers, for masks built on the device
        self.max_len = max_len
        self.length = 0  # slots filled so far
        self.has_padding = False  # some slot is left padding, so attention needs an explicit mask

    # Views made on each use, not kept as attributes: under torch.compile a kept view would be a second graph
    # input aliasing `kv`, and AOTAutograd then writes a mutated `kv` through a copy of the whole buffer at
    # every write (two passes over the whole cache a layer: a decode step as slow as the eager one at batch 16).
    @property
    def k(self) -> torch.Tensor:
        return self.kv[:, 0]

    @property
    def v(self) -> torch.Tensor:
        return self.kv[:, 1]

    def reset(self) -> None:
        """Start over, empty: the buffers keep their old values, which later writes overwrite before any read."""
        self.length = 0
        self.has_padding = False

    def append(self, positions: torch.Tensor, valid: torch.Tensor) -> int:
        """Reserve slots for T new tokens (positions, valid: (B, T)); return the first slot."""
        start, T = self.length, positions.shape[1]
        if start + T > self.max_len:
            raise ValueError(f"KV cache full: {start} + {T} tokens > max_len {self.max_len}")
        self.positions[:, start : start + T] = positions
        self.valid[:, start : start + T] = valid
        self.length = start + T
        return start

    def append_at(self, slot: torch.Tensor, positions: torch.Tensor) -> None:
        """Record one real token per row at `slot` ((1,) long, on the cache's device); positions (B, 1)."""
        self.positions.index_copy_(1, slot, positions)
        self.valid.index_fill_(1, slot, True)

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, Hkv, T, D) at `start`; return all keys and values so far (B, Hkv, start+T, D)."""
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def update_at(self, layer: int, slot: torch.Tensor, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one token's keys and values kv (2, B, Hkv, 1, D) at `slot` ((1,) long, on the cache's device);
        return the whole buffers k, v (B, Hkv, max_len, D). Slots past `slot` hold stale values: the caller
        masks them out."""
        if torch.compiler.is_compiling():
            write_kv(self.kv, layer, slot, kv)
        else:
            self.kv[layer].index_copy_(3, slot, kv)
        return self.kv[layer, 0], self.kv[layer, 1]


# Under torch.compile the write is one opaque op that mutates the whole buffer, which inductor does in place.
# Written as `kv[layer].index_copy_`, functionalization turned it into a copy of the layer's cache into a fresh
# buffer, the one-token write there, and copies of its k and v for the attention kernel: three passes over
# the layer's cache per layer and step. Outside torch.compile the plain `index_copy_` is used: called eagerly,
# the custom op costs several times the write itself (bench/RESULTS.md has the figures).
@torch.library.custom_op("aic::write_kv", mutates_args=("kv",))
def write_kv(kv: torch.Tensor, layer: int, slot: torch.Tensor, new: torch.Tensor) -> None:
    """kv[layer][:, :, :, slot] = new, in place: kv (layers, 2, B, Hkv, max_len, D), new (2, B, Hkv, 1, D)."""
    kv[layer].index_copy_(3, slot, new)


@write_kv.register_fake
def _(kv: torch.Tensor, layer: int, slot: torch.Tensor, new: torch.Tensor) -> None:
    return None
