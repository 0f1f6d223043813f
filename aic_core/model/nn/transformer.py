"""The decoder-only Transformer: token embedding, positional plugin, blocks, final norm, LM head."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from aic_core.model.nn.block import Block
from aic_core.model.nn.kv_cache import KVCache
from aic_core.model.nn.loss import lm_head_loss
from aic_core.model.nn.norm import make_norm
from aic_core.model.nn.positional import Positional


@dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    n_kv_head: int | None = None  # None: as many as n_head (multi-head attention)
    mlp_hidden: int | None = None  # None: 4 * n_embd
    mlp: str = "gelu"
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    bias: bool = True
    dropout: float = 0.0
    tie_embeddings: bool = True
    pad_vocab_multiple: int = 64  # the embedding and LM head are padded for faster matmuls

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def hidden(self) -> int:
        return self.mlp_hidden or 4 * self.n_embd

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return (self.vocab_size + m - 1) // m * m

    def to_dict(self) -> dict:
        return asdict(self)


class Transformer(nn.Module):
    """The decoder-only language model.

    `activation_checkpointing` (default False): when True, each block's activations are not kept for the
    backward pass but recomputed from the block's input during it (torch.utils.checkpoint, non-reentrant,
    so it works under DDP, torch.compile and DeepSpeed ZeRO; the RNG state is restored on recompute, so
    dropout masks are the same and gradients equal a run without it). It trades about one more forward
    pass per step for activation memory of one block instead of all of them. Only the training forward
    checkpoints (training mode, gradients enabled, no KV cache), never evaluation or generation.
    The training loop sets it from `train.activation_checkpointing` (aic_core.train.loop).
    """

    def __init__(self, config: TransformerConfig, positional: Positional) -> None:
        super().__init__()
        self.config = config
        self.activation_checkpointing = False
        self.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.positional = positional
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = make_norm(config.norm, config.n_embd, config.bias, config.norm_eps)
        # Tied embeddings use wte.weight directly, so the state dict holds no shared tensors.
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.init_weights()

    def init_weights(self, writing: Callable[[list[nn.Parameter]], AbstractContextManager] | None = None) -> None:
        """Fresh weights (as GPT-2). `writing(params)` wraps each step that writes parameters: a trainer whose
        parameters are sharded while the model is built (`TrainerPlugin.build_model`) passes a context that makes
        them whole for the step and shards the result again, so no process holds the whole model at once. The
        random numbers are drawn in the same order either way, so a seed gives the same weights."""
        writing = writing or (lambda params: nullcontext())
        for module in _apply_order(self):  # nn.Module.apply's order: children first
            own = list(module.parameters(recurse=False))
            if own and isinstance(module, nn.Linear | nn.Embedding):
                with writing(own):
                    self._init_weights(module)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
                with writing([p]):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))
        # The rows padding the vocabulary are never used: zeros stay zeros, so converted weights round-trip exactly.
        with torch.no_grad():
            for weight in (self.wte.weight, None if self.lm_head is None else self.lm_head.weight):
                if weight is not None:
                    with writing([weight]):
                        weight[self.config.vocab_size :].zero_()

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @staticmethod
    def param_numel(p: nn.Parameter) -> int:
        """How many numbers parameter `p` holds in all (what `num_params` counts). A trainer that shards parameters
        while the model is built (`TrainerPlugin.build_model`), so that `p.numel()` is only this process's share,
        sets the model's `param_numel` to a function that gives the whole size."""
        return p.numel()

    def num_params(self, trainable_only: bool = False) -> int:
        """Parameters, not counting the rows that pad the vocabulary (they never receive a gradient)."""
        total = sum(self.param_numel(p) for p in self.parameters() if p.requires_grad or not trainable_only)
        c = self.config
        padding = (c.padded_vocab_size - c.vocab_size) * c.n_embd
        for weight in (self.wte.weight, None if self.lm_head is None else self.lm_head.weight):
            if weight is not None and (weight.requires_grad or not trainable_only):
                total -= padding
        return total

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        c = self.config
        weight = self.wte.weight
        return KVCache(c.n_layer, batch_size, c.kv_heads, max_len, c.head_dim, dtype or weight.dtype, weight.device)

    def decode(
        self, idx: torch.Tensor, positions: torch.Tensor, cache: KVCache, slot: torch.Tensor, window: int | None = None
    ) -> torch.Tensor:
        """The one-token decode step: idx, positions (B, 1) -> logits (B, vocab_size) of the next token.

        The token goes to cache slot `slot`, a (1,) long tensor on the device, and attends over the whole
        preallocated cache with a mask of the real slots up to its own. Every shape is the same at every
        step and nothing goes back to the host, so a CUDA graph can capture the step and replay it. The
        cache holds the slots before `slot` already (a prefill through `forward`, then earlier steps);
        `cache.length` is not advanced. A caller that runs the step eagerly and knows the slot may pass
        `window` (> slot) to attend over the first `window` slots only: on the CPU, attention over
        empty slots costs as much as over full ones.
        """
        cache.append_at(slot, positions)
        S = cache.max_len if window is None else window
        allowed = (cache.valid[:, :S] & (cache.slots[:S] <= slot))[:, None, None, :]  # (B, 1, 1, S)
        # Built once per step in the dtype attention computes in, as `_mask` does for the prefill; the bias
        # is masked in float32 first, so its values equal those of the forward pass.
        bias = self.positional.attn_bias(positions, cache.positions[:, :S])  # (B, H, 1, S) or None
        mask = torch.where(allowed, 0.0 if bias is None else bias, float("-inf")).to(self._compute_dtype(idx.device))
        x = self.positional.embed(self.wte(idx), positions)  # (B, 1, C)
        for i, block in enumerate(self.blocks):
            x = block.decode(x, positions, self.positional, mask, cache, i, slot)
        weight = self.wte.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(self.norm_f(x[:, 0]), weight)[:, : self.config.vocab_size]

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        documents: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """idx (B, T) token ids. Returns the mean cross-entropy if `targets` (B, T) is given (-1 is
        ignored), else logits (B, T, vocab_size) (B, 1, vocab_size with `last_only`).

        documents (B, T): for rows that pack several documents (chat data), each token's document number,
        nondecreasing along a row. A token attends only to earlier tokens of its own document (a block-diagonal
        causal mask), and positions restart at 0 where each document starts, so every document computes what it
        would alone. A batch is (inputs, targets) or (inputs, targets, documents): trainers call `model(*batch)`.
        positions (B, T): absolute positions (default: consecutive, after what the cache holds).
        attention_mask (B, T): 1 for real tokens, 0 for left padding.
        """
        B, T = idx.shape
        if documents is not None and (cache is not None or attention_mask is not None):
            raise ValueError("documents (packed rows) cannot be combined with a KV cache or an attention_mask")
        start = cache.length if cache is not None else 0
        # Every row has the same positions and nothing is padded (training, evaluation): the mask
        # and any positional bias are built for one row and broadcast over the batch.
        shared = positions is None and attention_mask is None and cache is None and documents is None
        if documents is not None and positions is None:
            positions = document_positions(documents)
        if positions is None:
            positions = torch.arange(start, start + T, device=idx.device).expand(B, T)
        valid = attention_mask.bool() if attention_mask is not None else None
        if cache is not None:
            cache.has_padding = cache.has_padding or valid is not None
            if valid is None:
                valid = torch.ones(B, T, dtype=torch.bool, device=idx.device)
            start = cache.append(positions, valid)
            k_positions, k_valid = cache.positions[:, : start + T], cache.valid[:, : start + T]
            padded = cache.has_padding
        else:
            k_positions, k_valid, padded = positions, valid, valid is not None
        if shared:
            mask, causal = self._mask(positions[:1], k_positions[:1], None, False, start)
        else:
            mask, causal = self._mask(positions, k_positions, k_valid, padded, start, documents)

        x = self.drop(self.positional.embed(self.wte(idx), positions))
        # The mask (and any ALiBi bias in it) is built once above and passed to every block as an
        # input, so checkpointed blocks share it rather than recompute or store it per layer.
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for i, block in enumerate(self.blocks):
            if recompute:
                x = checkpoint(
                    block,
                    x,
                    positions,
                    self.positional,
                    mask,
                    causal,
                    None,
                    i,
                    start,
                    use_reentrant=False,
                    preserve_rng_state=True,
                )
            else:
                x = block(x, positions, self.positional, mask, causal, cache, i, start)
        if last_only:
            x = x[:, -1:, :]
        x = self.norm_f(x)
        weight = self.wte.weight if self.lm_head is None else self.lm_head.weight
        if targets is None:
            return F.linear(x, weight)[..., : self.config.vocab_size]
        # Head and cross-entropy chunk by chunk: the logits of the whole batch never exist (aic_core.model.nn.loss).
        return lm_head_loss(x, weight, targets, self.config.vocab_size)

    def _mask(
        self,
        q_positions: torch.Tensor,
        k_positions: torch.Tensor,
        k_valid: torch.Tensor | None,
        padded: bool,
        start: int,
        documents: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, bool]:
        """The attention mask shared by all layers: (B, 1|H, Tq, Tk) bool or additive float, or None
        with `causal` telling SDPA to apply the causal mask itself (the fast path). B is 1 when the
        positions are passed for one row only, and SDPA broadcasts it. With `documents` (B, T), a key
        is allowed only if it is in the query's document (block-diagonal)."""
        bias = self.positional.attn_bias(q_positions, k_positions)  # (B, H, Tq, Tk) or None
        T, Tk = q_positions.shape[1], k_positions.shape[1]
        if bias is None and not padded and documents is None and (start == 0 or T == 1):
            return None, start == 0 and T > 1
        device = q_positions.device
        q_slot = torch.arange(start, start + T, device=device)[:, None]  # (Tq, 1)
        k_slot = torch.arange(Tk, device=device)[None, :]  # (1, Tk)
        allowed = (k_slot <= q_slot)[None]  # (1, Tq, Tk)
        if k_valid is not None:
            # A padding query still sees itself, so no row is all -inf (which would give NaN).
            allowed = (allowed & k_valid[:, None, :]) | (k_slot == q_slot)[None]
        if documents is not None:
            allowed = allowed & (documents[:, :, None] == documents[:, None, :])  # (B, Tq, Tk)
        allowed = allowed[:, None]  # (B, 1, Tq, Tk)
        if bias is None:
            return allowed, False
        # Cast once to the dtype attention computes in (bf16 under autocast), here rather than in
        # each layer: a per-layer cast is one more (B, H, Tq, Tk) tensor per layer, which the
        # backward pass keeps.
        return bias.masked_fill(~allowed, float("-inf")).to(self._compute_dtype(device)), False

    def _compute_dtype(self, device: torch.device) -> torch.dtype:
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return self.wte.weight.dtype


def document_positions(documents: torch.Tensor) -> torch.Tensor:
    """documents (B, T), nondecreasing along each row -> each token's position in its document (B, T): 0 where a
    document starts. Computed on the device without a host sync (the start of a token's document is the running
    maximum of the indices where a document starts)."""
    T = documents.shape[1]
    index = torch.arange(T, device=documents.device).expand_as(documents)
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    first = torch.where(starts, index, 0).cummax(dim=1).values
    return index - first


def _apply_order(module: nn.Module) -> Iterator[nn.Module]:
    for child in module.children():
        yield from _apply_order(child)
    yield module
