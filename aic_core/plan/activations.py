"""What one micro-batch's forward keeps for the backward pass, counted from the model's shape (`aic plan`).

Per aic block (aic_core/model/nn), in bytes per token (a = compute dtype bytes, r = residual-stream bytes; C, H,
Hkv, D, F = width, heads, KV heads, head size, MLP width): norm input (LayerNorm: r*C + 8 for mean/rstd; RMSNorm:
4*C + 4 + r*C, it computes in fp32), the input of each linear that has a trainable weight (a*C; under autocast a
bf16 copy) and what an adapter's branch keeps (`AdapterLayer.saved`), qkv output (H + 2*Hkv)*D*a, rotated q and k
(H + Hkv)*D*a when the positional encoding rotates them, attention (SDPA: the cuDNN, flash, memory-efficient and CPU
flash kernels keep the output H*D*a, which the projection shares unless a rotated q made it a new tensor, plus a
float32 logsumexp 4*H, and no dropout mask; the math kernel keeps its copies of q, k, v 3*H*D*a instead of the qkv
output, the T x T probabilities H*T*a, + with dropout the mask and the dropped probabilities, and the projection
input is a copy), MLP (GELU: fc output and GELU output, F*a each; SwiGLU: fc output 2F*a, SiLU output and product
F*a each), dropout masks when dropout > 0 (1 byte an element on CUDA, a float on the CPU). Outside the blocks:
token ids and targets (8 + 8), the final norm and the LM head's input, what the positional encoding keeps for every
layer (`PositionalPlugin.plan_cache_bytes`: RoPE's cos/sin tables), an attention bias's (1, H, T, T), all once;
with rows that pack documents (chat data) a mask per row, (B, 1, T, T) bool or (B, H, T, T) with a bias,
and positions (B, T).
With activation checkpointing (per block) only each block's input (r*C) is kept; during the backward pass one
block's activations are recomputed at a time.

An op saves a tensor only when a gradient needs it: under an adapter, layers before the first wrapped one save
nothing, and a frozen linear keeps its input only for its adapter.

LM head and loss (aic_core.model.nn.loss): computed a chunk of rows at a time, so the logits of the whole batch
never exist. The forward pass keeps the gradients of the hidden states (a*N*C) and, when the head trains, of the
head weight (fp32, 4*Vp*C); one chunk's logits (rows x Vp, in the compute dtype and in fp32) are its transient;
the backward pass scales the two kept gradients into new tensors (twice the kept bytes).

Equal consecutive blocks are counted once and multiplied, so the count does not grow with n_layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from aic_core.model.nn.loss import chunk_rows
from aic_core.plan.shape import BlockShape, LayerInput, Linear, ModelShape


@dataclass(frozen=True)
class Mode:
    """The dtypes a trainer runs the model in."""

    device: str  # "cuda" or "cpu"
    a: int  # compute dtype bytes (matmul inputs and outputs)
    r: int  # residual stream bytes (the parameters' dtype under autocast)
    autocast: bool

    @property
    def mask(self) -> int:  # a dropout mask element: bool on CUDA (native_dropout), the input's float on the CPU
        return 1 if self.device == "cuda" else self.a


def attention_kernel(
    device: str,
    a: int,
    has_bias: bool,
    dropout: float,
    gqa: bool,
    head_dim: int,
    capability: tuple[int, int] | None = None,
) -> str:
    """The SDPA kernel torch picks for the training forward. On the CPU: its flash kernel, or the math one
    with attention dropout. On CUDA, in torch's priority order: cuDNN attention on Hopper and newer for bf16
    (torch 2.9 and later; seen on an H100 with torch 2.11, also with ALiBi's bias, grouped-query heads and
    dropout), flash (bf16, no bias), memory-efficient (a bias or fp32; not grouped-query), else math."""
    if device != "cuda":
        return "cpu-flash" if dropout == 0 else "math"
    if capability is None:
        capability = _cuda_capability()
    version = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2] if x.isdigit())
    if a == 2 and head_dim % 8 == 0 and head_dim <= 128 and capability >= (9, 0) and version >= (2, 9):
        return "cudnn"
    if a == 2 and not has_bias and head_dim % 8 == 0 and head_dim <= 256:
        return "flash"
    if not gqa and head_dim % (8 if a == 2 else 4) == 0:
        return "efficient"
    return "math"


def _cuda_capability() -> tuple[int, int]:
    """This machine's GPU's compute capability; an H100's (9, 0) when there is none to ask (planning for a GPU
    elsewhere). get_device_capability reads the device's properties without creating a CUDA context."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_capability()
    return (9, 0)


def _norm_saved(kind: str, C: int, m: Mode, grad_in: bool, trainable: bool) -> tuple[int, int]:
    """(bytes saved per token, bytes per element of the output). grad_in: the input requires grad;
    trainable: the norm's weight does. An op saves a tensor only when a gradient will need it."""
    if kind == "rmsnorm":
        # x.float() and rsqrt(mean(x^2)) for the input's gradient; x * rsqrt (cast back) for the weight's.
        return (4 * C + 4 if grad_in else 0) + (m.r * C if trainable else 0), m.r
    saved = m.r * C + 8 if grad_in or trainable else 0  # input + fp32 mean and rstd
    return saved, 4 if m.autocast else m.r  # autocast runs layer_norm in fp32


def _linear_inputs(lin: Linear, x_bytes: int, counted: bool, m: Mode, grad_in: bool) -> int:
    """Bytes per token a linear layer (and its adapter's branch) saves for its input; `counted`: the input
    tensor is already counted by whoever produced it (a view of a saved tensor)."""
    cast = m.autocast and x_bytes != m.a
    saved = 0
    if lin.trainable:
        if cast:
            saved += m.a * lin.inputs  # autocast's copy (activations are not cached: one per consumer)
        elif not counted:
            saved += x_bytes * lin.inputs
            counted = True
    if lin.adapter is not None:
        mask = 1 if m.device == "cuda" else x_bytes
        saved += lin.adapter.saved(LayerInput(lin.inputs, x_bytes, m.a, cast, mask, counted, grad_in))
    return saved


def _grad_out(lin: Linear, grad_in: bool) -> bool:
    return grad_in or lin.trainable or lin.adapter is not None


def _block_bytes(
    b: BlockShape, s: ModelShape, m: Mode, T: int, kernel: str, dropout: float, grad: bool
) -> tuple[int, int, bool, tuple[int, int]]:
    """(bytes saved per token by one block, its largest per-token tensors, whether its output requires grad,
    the autocast weight copies it saves (elements; of them frozen)). grad: the block's input requires grad
    (false before the first trainable weight, e.g. under an adapter)."""
    copies = [0, 0]

    def note(lin: Linear, g: bool) -> None:
        saved, frozen = lin.copies(g)
        copies[0] += saved
        copies[1] += frozen

    c = s.config
    C, H, Hkv, D = c.n_embd, c.n_head, c.kv_heads, c.head_dim
    total = 0
    saved, out = _norm_saved(b.norm1, C, m, grad, b.norm1_trainable)
    g = grad or b.norm1_trainable
    total += saved + _linear_inputs(b.qkv, out, False, m, g)
    note(b.qkv, g)
    g = _grad_out(b.qkv, g)
    if g and kernel == "math":
        # The math kernel saves its own (B*H, T, D) copies of scaled q, k and v (k and v repeated for grouped
        # heads), not the qkv output, and the T x T probabilities; its output is transposed into a copy.
        total += 3 * H * D * m.a + H * T * m.a
        if dropout > 0:
            total += H * T * (m.mask + m.a)  # the dropout mask and the dropped probabilities
    elif g:
        total += (H + 2 * Hkv) * D * m.a  # q, k, v: views of the qkv output, saved by the kernel
        if s.rotates:
            total += (H + Hkv) * D * m.a  # rotated q and k are new tensors
        lse = 4 * H * (math.ceil(T / 32) * 32 / T if kernel == "efficient" else 1)
        total += H * D * m.a + int(lse)  # the output and its float32 logsumexp (dropout: a seed, no mask)
    # The flash and cuDNN kernels' output takes q's memory layout: with q a view of the qkv output that is
    # (B, T, H, D), so the projection's input is a view of it; a rotated q is a new (B, H, T, D) tensor, and then
    # the transposed output is copied, as the math kernel's always is. The memory-efficient kernel writes
    # (B, T, H, D).
    shared = g and (kernel == "efficient" or (kernel != "math" and not s.rotates))
    total += _linear_inputs(b.proj, m.a, shared, m, g)
    note(b.proj, g)
    g = _grad_out(b.proj, g)
    if dropout > 0 and g:
        total += m.mask * C  # residual dropout mask
    grad = grad or g
    saved, out = _norm_saved(b.norm2, C, m, grad, b.norm2_trainable)
    g = grad or b.norm2_trainable
    total += saved + _linear_inputs(b.fc, out, False, m, g)
    note(b.fc, g)
    g = _grad_out(b.fc, g)
    hidden = b.fc_out // 2 if b.mlp == "swiglu" else b.fc_out
    if g:
        total += b.fc_out * m.a  # fc output, saved by the activation (SwiGLU: gate and up)
        if b.mlp == "swiglu":
            total += hidden * m.a  # silu(gate), saved by the product
    total += _linear_inputs(b.mlp_proj, m.a, False, m, g)  # the activation's output (SwiGLU: the product)
    note(b.mlp_proj, g)
    g = _grad_out(b.mlp_proj, g)
    if dropout > 0 and g:
        total += m.mask * C
    largest = max(b.fc_out, hidden, (H + 2 * Hkv) * D, C) * m.a + hidden * m.a
    return total, largest, grad or g, (copies[0], copies[1])


@dataclass
class Activations:
    blocks: list[tuple[int, int]]  # (bytes of one block for the whole micro-batch, how many such blocks)
    outside: int  # embeddings, final norm, head input, shared tables; not the loss
    inputs: int  # block inputs kept under activation checkpointing
    transient: int  # working memory of one block's backward pass (gradients of its widest tensors)
    tail: int  # the final norm's and the head's saved inputs (freed before the blocks' backward)
    copies_saved: int  # elements of matmul weights whose (autocast) copies the backward pass needs
    copies_frozen: int  # of them, frozen weights (not in autocast's cache: cast where used)
    head_copies: int
    kernel: str

    @property
    def full(self) -> int:
        return sum(b * n for b, n in self.blocks) + self.outside

    @property
    def checkpointed(self) -> int:
        return self.inputs + self.outside

    @property
    def largest_block(self) -> int:
        return max((b for b, _ in self.blocks), default=0)


def activations(s: ModelShape, m: Mode, B: int, T: int) -> Activations:
    c = s.config
    N, C = B * T, c.n_embd
    dropout = c.dropout
    masked = s.has_bias or s.documents  # SDPA gets a mask or bias
    kernel = attention_kernel(m.device, m.a, masked, dropout, c.kv_heads != c.n_head, c.head_dim)
    grad = s.wte_trainable or s.wpe_trainable
    outside = 8 * N  # targets, saved by nll_loss
    if s.wte_trainable:
        outside += 8 * N  # token ids, saved by the embedding
    if s.wpe_trainable:
        outside += 8 * (B * T if s.documents else T)  # positions: each row's, or one broadcast over the batch
    if dropout > 0 and grad:
        outside += m.mask * C * N  # embedding dropout mask
    # A run of equal blocks gives at most two different counts: its first block's input may not need a gradient
    # while the rest's does (the first trainable weight is in that first block).
    per_block: list[tuple[tuple[int, int, bool, tuple[int, int]], int]] = []
    for block, count in s.blocks:
        first = _block_bytes(block, s, m, T, kernel, dropout, grad)
        if first[2] == grad:
            per_block.append((first, count))
        else:
            per_block.append((first, 1))
            if count > 1:
                per_block.append((_block_bytes(block, s, m, T, kernel, dropout, first[2]), count - 1))
        grad = per_block[-1][0][2]
    outside += s.cache_bytes(B, T)  # what the positional encoding keeps for every layer (RoPE: cos and sin)
    if masked and kernel != "math":  # the mask, saved by the attention kernel: with packed rows, one per row
        rows = B if s.documents else 1
        outside += rows * (c.n_head * T * T * m.a if s.has_bias else T * T)  # (rows, H, T, T) bias or bool mask
    saved, out = _norm_saved(s.norm_f, C, m, grad, s.norm_f_trainable)
    tail = N * (saved + _linear_inputs(s.head, out, False, m, grad or s.norm_f_trainable))
    head_copies = s.head.copies(grad or s.norm_f_trainable)
    outside += tail
    largest = max((b[1] for b, _ in per_block), default=0)
    return Activations(
        blocks=[(N * b[0], n) for b, n in per_block],
        outside=outside,
        inputs=s.n_layer * N * m.r * C,
        transient=N * largest,
        tail=tail,
        copies_saved=sum(b[3][0] * n for b, n in per_block) + head_copies[0],
        copies_frozen=sum(b[3][1] * n for b, n in per_block) + head_copies[1],
        head_copies=head_copies[0],
        kernel=kernel,
    )


def loss_bytes(s: ModelShape, N: int, a: int, device: str) -> tuple[int, int, int]:
    """(saved, peak in the forward pass, peak at the start of the backward pass) of the LM head and the loss,
    computed a chunk of rows at a time (aic_core.model.nn.loss): the forward pass keeps the gradients of the hidden
    states (a*N*C) and, when the head trains, of the head weight (fp32, 4*Vp*C); one chunk's logits exist at a
    time, in the compute dtype and in fp32; the backward pass scales the two gradients into new tensors."""
    c = s.config
    Vp, C = c.padded_vocab_size, c.n_embd
    saved = a * N * C + (4 * Vp * C if s.head.trainable else 0)
    rows = min(N, chunk_rows(Vp, torch.device(device)))
    # A chunk: its logits (a), log-probabilities (fp32) and their gradient cast back (a); the next chunk's are
    # allocated before the last one's are freed, so two chunks at the peak. In 16 bits, the head weight and the
    # hidden states are cast once (a*Vp*C, a*N*C) and each chunk's share of the head's gradient is a*Vp*C.
    transient = 2 * rows * Vp * (2 * a + 4) + (2 * a * Vp * C + a * N * C if a < 4 else 0)
    return saved, saved + transient, 2 * saved
