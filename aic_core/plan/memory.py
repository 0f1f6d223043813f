"""Analytic memory and FLOP planning (`aic plan`): will a spec fit the device, and what would make it fit.

Nothing is allocated: the model is built on the `meta` device (model plugin + positional plugin [+ adapter],
as the pipeline builds it) to count its parameters exactly and to read its shape; every byte below is a
formula of that shape, the micro-batch and the dtypes the trainer will use.

Per device, in bytes (P = parameter elements, padded vocabulary rows included since they are allocated;
Pt = trainable elements; N = train.batch_size x seq_len tokens of one micro-batch; V = vocabulary,
Vp = padded vocabulary; C, H, Hkv, D, F = width, heads, KV heads, head size, MLP width; a = compute dtype
bytes, r = residual-stream bytes):

- torch trainer (one device; DDP when world_size > 1): fp32 weights 4P (with bf16 autocast they are the
  master weights), fp32 gradients 4Pt, AdamW 8Pt (exp_avg, exp_avg_sq; + a 4-byte step per tensor).
  bf16 autocast keeps a bf16 copy of every matmul weight (2 bytes each) for the backward pass.
  DDP (PyTorch's default gradient_as_bucket_view=False) adds its gradient buckets: one more fp32 copy of
  the trainable gradients (4Pt), in buckets of bucket_cap_mb = 25 MB, allocated once and kept.
- DeepSpeed ZeRO, mixed precision (ZeRO paper): 2 bytes bf16 weights + 2 bytes bf16 gradients + 12 bytes
  fp32 master weights, momentum and variance per parameter; stage 1 shards the 12, stage 2 also the
  gradients, stage 3 also the weights, over world_size. In fp32 (CPU): 4 + 4 + 8. Buffers (DeepSpeed's
  defaults): stages 1-2 a reduce bucket and an all-gather bucket of min(5e8, P) bf16 elements each;
  stage 3 the gathered ("live") bf16 parameters, min(stage3_max_live_parameters = 1e9, P) elements, plus
  a reduce bucket of min(5e8, Pt). DeepSpeed runs the model itself in bf16 (no autocast): activations
  are those of a pure-bf16 forward (r = a = 2).
- Activations: the tensors autograd saves in one micro-batch's forward, per aic block (aic_core/nn):
  norm input (LayerNorm: r*C + 8 for mean/rstd; RMSNorm: 4*C + 4 + r*C, it computes in fp32), the input
  of each linear that has a trainable weight or an adapter (a*C; under autocast a bf16 copy), qkv output
  (H + 2*Hkv)*D*a, RoPE's rotated q and k (H + Hkv)*D*a, attention (SDPA: the cuDNN, flash, memory-efficient
  and CPU flash kernels keep the output H*D*a, which the projection shares unless RoPE made q a new tensor,
  plus a float32 logsumexp 4*H, and no dropout mask; the math kernel keeps its copies of q, k, v 3*H*D*a
  instead of the qkv output, the T x T probabilities H*T*a, + with dropout the mask and the dropped
  probabilities, and the projection input is a copy), MLP (GELU: fc output and GELU output, F*a each;
  SwiGLU: fc output 2F*a, SiLU output and product F*a each), dropout masks when dropout > 0 (1 byte a
  element on CUDA, a float on the CPU). Outside the blocks: token ids and targets (8 + 8), the final
  norm and the LM head's input, RoPE's cos/sin tables, ALiBi's (1, H, T, T) bias, all once.
  With activation checkpointing (per block): only each block's input (r*C) is kept; during the backward
  pass one block's activations are recomputed at a time.
- LM head and loss (aic_core.model.nn.loss): computed a chunk of rows at a time, so the logits of the whole batch
  never exist. The forward pass keeps the gradients of the hidden states (a*N*C) and, when the head trains,
  of the head weight (fp32, 4*Vp*C); one chunk's logits (rows x Vp, in the compute dtype and in fp32) are its
  transient; the backward pass scales the two kept gradients into new tensors (twice the kept bytes).
- An op saves a tensor only when a gradient needs it: under LoRA, layers before the first adapter save
  nothing, and a frozen linear keeps its input only for its adapter.
- On CUDA, + 64 MiB of cuBLAS/cuBLASLt workspaces, which the caching allocator hands out.
- The peak is the largest of: end of forward (+ autocast's cache of bf16 copies of every trainable weight,
  + one chunk's logits), start of backward (+ twice the loss's kept gradients), the backward of the first (and, checkpointed, the last)
  block, and the optimizer step (weights + gradients + optimizer state). Gradients are not alive during
  forward/backward with one micro-batch per step (set_to_none); with more micro-steps per rank they are.
  Measured on an H100 (bench/gpu_plan.py, bench/RESULTS.md): within 0.4 % of max_memory_allocated.
- KV cache (generate stage, after training, not in the training peak): 2 x n_layer x prompts x
  (longest prompt + max_new_tokens) x n_kv_head x head_dim x 4 bytes (the fp32 model), + slot masks and
  positions; a prompt is at most one token per UTF-8 byte (an upper bound: the tokenizer may not exist yet).
- FLOPs per token (PaLM appendix B / nanoGPT's MFU): 6*N + 12*L*H*Q*T, N = the parameters in matmuls:
  all parameters but lookup-only embeddings (position embeddings, and the token embedding when the head
  is untied; a tied head counts once), as nanoGPT's get_num_params(non_embedding=True); L layers, H heads,
  Q head size, T the training context. With frozen (adapter) weights, 4*N + 2*N_trainable + 12*L*H*Q*T.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from aic_core.errors import SpecError
from aic_core.model.nn.attention import CausalSelfAttention
from aic_core.model.nn.loss import chunk_rows
from aic_core.model.nn.mlp import MLP, SwiGLU
from aic_core.model.nn.norm import RMSNorm
from aic_core.model.nn.transformer import Transformer

GiB = 2**30
ZERO_REDUCE_BUCKET = 500_000_000  # DeepSpeed reduce_bucket_size / allgather_bucket_size defaults (elements)
ZERO3_MAX_LIVE = 1_000_000_000  # DeepSpeed stage3_max_live_parameters default (elements)
DDP_BUCKET_MB = 25
CUDA_WORKSPACE = (
    64 * 2**20
)  # cuBLAS + cuBLASLt workspaces, allocated through torch's allocator (measured on an H100: 66-70 MiB all told)


# --- results ---------------------------------------------------------------------------------------


@dataclass
class Strategy:
    """Per-device memory of one way to train, in bytes."""

    name: str  # "torch", "ddp", "zero-1", "zero-2", "zero-3"
    label: str
    weights: int
    gradients: int
    optimizer: int
    weight_copies: int  # autocast's bf16 copies of the matmul weights, saved for the backward pass
    activations: int  # saved by one micro-batch's forward (checkpointed or not, as the column says)
    logits: int  # the logits/loss buffer at its peak
    buffers: int  # DDP gradient buckets; ZeRO buckets and gathered parameters
    workspace: int  # CUDA libraries' workspaces (cuBLAS, cuBLASLt) that the caching allocator hands out
    total: int  # the peak
    peak_at: str
    total_without_checkpointing: int
    total_with_checkpointing: int
    activation_checkpointing: bool
    fits: bool | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Plan:
    spec_name: str
    model: str
    parameters: int  # as Transformer.num_params(): the padded vocabulary rows are not counted
    trainable: int
    matmul_parameters: int  # N of the FLOP formula
    flops_per_token: float
    flops_formula: str
    device: str  # "cuda" or "cpu": what the trainer will run on
    device_memory: int | None  # bytes per device; None when unknown
    device_memory_source: str
    world_size: int
    batch_size: int  # train.batch_size: sequences per micro-batch per device
    grad_accum: int
    micro_steps: float  # micro-batches each rank runs per optimizer step
    seq_len: int
    global_batch: int  # sequences per optimizer step, all ranks
    tokens_per_step: int
    precision: str
    attention: str  # the SDPA kernel the training forward will use
    activation_checkpointing: bool
    activations: int  # saved activations without checkpointing (torch trainer's dtypes)
    activations_checkpointed: int
    loss_saved: int  # what the LM head + loss keeps for the backward pass (torch trainer's dtypes)
    kv_cache: int
    kv_cache_shape: str
    spec_strategy: str
    strategies: list[Strategy]
    notes: list[str] = field(default_factory=list)

    def strategy(self, name: str | None = None) -> Strategy:
        name = name or self.spec_strategy
        return next(s for s in self.strategies if s.name == name)

    @property
    def fits(self) -> bool | None:
        return self.strategy().fits

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["fits"] = self.fits
        data["units"] = "bytes"
        return data


# --- the model's shape, from a meta-device build ------------------------------------------------------


@dataclass
class _Linear:
    inputs: int
    trainable: bool  # the weight gets a gradient, so the matmul saves its input
    weight_elements: int = 0
    lora_r: int = 0
    lora_dropout: float = 0.0
    lora_elements: tuple[int, int] = (0, 0)  # A, B

    def copies(self, grad_in: bool) -> tuple[int, int]:
        """(elements of autocast copies saved for the backward pass, of them frozen): a weight's copy is saved
        when the input needs a gradient; LoRA's B always (its input, x A^T, needs one)."""
        base = self.weight_elements if grad_in else 0
        lora = (self.lora_elements[0] if grad_in else 0) + self.lora_elements[1] if self.lora_r else 0
        return base + lora, 0 if self.trainable else base


@dataclass
class _Block:
    norm1: str
    norm2: str
    norm1_trainable: bool
    norm2_trainable: bool
    mlp: str  # "gelu", "swiglu" or "other" (treated as GELU-like: two F-wide tensors)
    qkv: _Linear
    proj: _Linear
    fc: _Linear
    fc_out: int
    mlp_proj: _Linear


@dataclass
class _Shape:
    model: Transformer
    elements: int  # every parameter element (padding included) + buffers, as allocated
    trainable_elements: int
    trainable_tensors: int
    outside_trainable_elements: int  # trainable elements outside the blocks (embeddings, final norm, head)
    buffer_bytes: int
    trainable_matmul_elements: int  # trainable weights that go through a matmul (autocast caches their copies)
    linear_bias_elements: int
    blocks: list[_Block]
    rotates: bool
    rotary_dim: int
    has_bias: bool
    norm_f: str
    norm_f_trainable: bool
    head: _Linear
    wte_trainable: bool
    wpe_trainable: bool


class VocabularyUnknown(SpecError):
    """The vocabulary size cannot be known before the tokenizer exists (its options do not state it)."""


def _vocab_size(spec: Any, vocab_size: int | None) -> int:
    if vocab_size:
        return vocab_size
    for value in (
        getattr(spec.model, "vocab_size", None),
        getattr(getattr(spec, "tokenizer", None), "vocab_size", None),
    ):
        if isinstance(value, int) and value > 0:
            return value
    raise VocabularyUnknown(
        "aic plan: the vocabulary size is not known before the tokenizer is trained: this tokenizer's options do not "
        "state it. Set model.vocab_size in the spec (at least the tokenizer's vocabulary)."
    )


def build_meta_model(spec: Any, registry: Any, vocab_size: int | None = None) -> Transformer:
    """The spec's model (model plugin + positional plugin + adapter) on the meta device: shapes, no storage."""
    model_plugin = registry.get("model", spec.model.type)
    positional_plugin = registry.get("positional", spec.model.positional.type)
    with torch.device("meta"):
        config = model_plugin.config(spec.model, _vocab_size(spec, vocab_size))
        positional = positional_plugin.build(spec.model.positional, config)
        model = model_plugin.build(spec.model, config, positional)
        if getattr(spec, "adapter", None) is not None:
            registry.get("adapter", spec.adapter.type).apply(model, spec.adapter)
    return model


def _norm_kind(module: nn.Module) -> str:
    return "rmsnorm" if isinstance(module, RMSNorm) else "layernorm"


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _linear(module: nn.Module) -> _Linear:
    lora_a = getattr(module, "lora_A", None)
    dropout = getattr(module, "lora_dropout", None)
    lora = isinstance(lora_a, torch.Tensor) and lora_a.requires_grad
    return _Linear(
        inputs=module.in_features,
        trainable=bool(module.weight.requires_grad),
        weight_elements=module.weight.numel(),
        lora_r=int(lora_a.shape[0]) if lora else 0,
        lora_dropout=float(getattr(dropout, "p", 0.0)),
        lora_elements=(lora_a.numel(), module.lora_B.numel()) if lora else (0, 0),
    )


def _shape(model: Transformer) -> _Shape:
    c = model.config
    params = list(model.parameters())
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    matmul = [m.weight for m in linears] + ([model.wte.weight] if model.lm_head is None else [])
    matmul += [
        getattr(m, n) for m in linears for n in ("lora_A", "lora_B") if isinstance(getattr(m, n, None), torch.Tensor)
    ]
    blocks = []
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        if not isinstance(attn, CausalSelfAttention):
            raise SpecError(
                f"aic plan: the model's attention ({type(attn).__name__}) is not aic's; its memory cannot be planned."
            )
        kind = "swiglu" if isinstance(mlp, SwiGLU) else "gelu" if isinstance(mlp, MLP) else "other"
        blocks.append(
            _Block(
                norm1=_norm_kind(block.norm1),
                norm2=_norm_kind(block.norm2),
                mlp=kind,
                norm1_trainable=_trainable(block.norm1),
                norm2_trainable=_trainable(block.norm2),
                qkv=_linear(attn.qkv),
                proj=_linear(attn.proj),
                fc=_linear(mlp.fc),
                fc_out=mlp.fc.out_features,
                mlp_proj=_linear(mlp.proj),
            )
        )
    # What the positional encoding does, asked on meta tensors: rotate q and k (new tensors), add a bias.
    positional = model.positional
    with torch.device("meta"):
        q = torch.empty(1, c.n_head, 2, c.head_dim)
        k = torch.empty(1, c.kv_heads, 2, c.head_dim)
        pos = torch.zeros(1, 2, dtype=torch.long)
        try:
            q2, _ = positional.rotate(q, k, pos)
            rotates = q2 is not q
        except Exception:  # noqa: BLE001 - a plugin that cannot run on meta: assume the costlier case
            rotates = True
        try:
            has_bias = positional.attn_bias(pos, pos) is not None
        except Exception:  # noqa: BLE001
            has_bias = False
        if hasattr(positional, "_cached"):
            positional._cached = None
    head = model.lm_head if model.lm_head is not None else None
    wte_trainable = bool(model.wte.weight.requires_grad)
    head_info = (
        _linear(head)
        if head is not None
        else _Linear(inputs=c.n_embd, trainable=wte_trainable, weight_elements=model.wte.weight.numel())
    )
    return _Shape(
        model=model,
        elements=sum(p.numel() for p in params),
        trainable_elements=sum(p.numel() for p in params if p.requires_grad),
        trainable_tensors=sum(1 for p in params if p.requires_grad),
        outside_trainable_elements=sum(p.numel() for p in params if p.requires_grad)
        - sum(p.numel() for p in model.blocks.parameters() if p.requires_grad),
        buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
        trainable_matmul_elements=sum(w.numel() for w in matmul if w.requires_grad),
        linear_bias_elements=sum(m.bias.numel() for m in linears if m.bias is not None and m.bias.requires_grad),
        blocks=blocks,
        rotates=rotates,
        rotary_dim=int(getattr(positional, "rotary_dim", c.head_dim)) if rotates else 0,
        has_bias=has_bias,
        norm_f=_norm_kind(model.norm_f),
        norm_f_trainable=_trainable(model.norm_f),
        head=head_info,
        wte_trainable=wte_trainable,
        wpe_trainable=any(p.requires_grad for p in positional.parameters()),
    )


# --- activations ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Mode:
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


def _norm_saved(kind: str, C: int, m: _Mode, grad_in: bool, trainable: bool) -> tuple[int, int]:
    """(bytes saved per token, bytes per element of the output). grad_in: the input requires grad;
    trainable: the norm's weight does. An op saves a tensor only when a gradient will need it."""
    if kind == "rmsnorm":
        # x.float() and rsqrt(mean(x^2)) for the input's gradient; x * rsqrt (cast back) for the weight's.
        return (4 * C + 4 if grad_in else 0) + (m.r * C if trainable else 0), m.r
    saved = m.r * C + 8 if grad_in or trainable else 0  # input + fp32 mean and rstd
    return saved, 4 if m.autocast else m.r  # autocast runs layer_norm in fp32


def _linear_inputs(lin: _Linear, x_bytes: int, counted: bool, m: _Mode, grad_in: bool) -> int:
    """Bytes per token a linear layer (and its LoRA branch) saves for its input; `counted`: the input
    tensor is already counted by whoever produced it (a view of a saved tensor)."""
    cast = m.autocast and x_bytes != m.a
    saved = 0
    if lin.trainable:
        if cast:
            saved += m.a * lin.inputs  # autocast's copy (activations are not cached: one per consumer)
        elif not counted:
            saved += x_bytes * lin.inputs
            counted = True
    if lin.lora_r:
        if lin.lora_dropout > 0:
            if grad_in:
                saved += (1 if m.device == "cuda" else x_bytes) * lin.inputs  # the mask
            saved += (m.a if cast else x_bytes) * lin.inputs  # the dropped input, or its bf16 copy
        elif cast or not counted:
            saved += (m.a if cast else x_bytes) * lin.inputs
        saved += m.a * lin.lora_r  # x @ A^T, saved by B's matmul
    return saved


def _grad_out(lin: _Linear, grad_in: bool) -> bool:
    return grad_in or lin.trainable or lin.lora_r > 0


def _block_bytes(
    b: _Block, s: _Shape, m: _Mode, T: int, kernel: str, dropout: float, grad: bool
) -> tuple[int, int, bool, tuple[int, int]]:
    """(bytes saved per token by one block, its largest per-token tensors, whether its output requires grad,
    the autocast weight copies it saves (elements; of them frozen)). grad: the block's input requires grad
    (false before the first trainable weight, e.g. under LoRA)."""
    copies = [0, 0]

    def note(lin: _Linear, g: bool) -> None:
        saved, frozen = lin.copies(g)
        copies[0] += saved
        copies[1] += frozen

    c = s.model.config
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
    # the transposed output is copied, as the math kernel's always is. The memory-efficient kernel writes (B, T, H, D).
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
class _Acts:
    blocks: list[int]  # bytes per block (whole micro-batch)
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
        return sum(self.blocks) + self.outside

    @property
    def checkpointed(self) -> int:
        return self.inputs + self.outside


def _activations(s: _Shape, m: _Mode, B: int, T: int) -> _Acts:
    c = s.model.config
    N, C = B * T, c.n_embd
    dropout = c.dropout
    kernel = attention_kernel(m.device, m.a, s.has_bias, dropout, c.kv_heads != c.n_head, c.head_dim)
    grad = s.wte_trainable or s.wpe_trainable
    outside = 8 * N  # targets, saved by nll_loss
    if s.wte_trainable:
        outside += 8 * N  # token ids, saved by the embedding
    if s.wpe_trainable:
        outside += 8 * T  # positions: one row broadcast over the batch
    if dropout > 0 and grad:
        outside += m.mask * C * N  # embedding dropout mask
    per_block = []
    for b in s.blocks:
        per_block.append(_block_bytes(b, s, m, T, kernel, dropout, grad))
        grad = per_block[-1][2]
    if s.rotates:
        outside += 2 * (s.rotary_dim // 2) * 4 * N  # cos and sin (float32), shared by every layer
    if s.has_bias and kernel != "math":
        outside += c.n_head * T * T * m.a  # one (1, H, T, T) bias, saved by the attention kernel
    saved, out = _norm_saved(s.norm_f, C, m, grad, s.norm_f_trainable)
    tail = N * (saved + _linear_inputs(s.head, out, False, m, grad or s.norm_f_trainable))
    head_copies = s.head.copies(grad or s.norm_f_trainable)
    outside += tail
    largest = max(b[1] for b in per_block) if per_block else 0
    return _Acts(
        blocks=[N * b[0] for b in per_block],
        outside=outside,
        inputs=len(s.blocks) * N * m.r * C,
        transient=N * largest,
        tail=tail,
        copies_saved=sum(b[3][0] for b in per_block) + head_copies[0],
        copies_frozen=sum(b[3][1] for b in per_block) + head_copies[1],
        head_copies=head_copies[0],
        kernel=kernel,
    )


# --- strategies -------------------------------------------------------------------------------------


def _loss(s: _Shape, N: int, a: int, device: str) -> tuple[int, int, int]:
    """(saved, peak in the forward pass, peak at the start of the backward pass) of the LM head and the loss,
    computed a chunk of rows at a time (aic_core.model.nn.loss): the forward pass keeps the gradients of the hidden
    states (a*N*C) and, when the head trains, of the head weight (fp32, 4*Vp*C); one chunk's logits exist at a
    time, in the compute dtype and in fp32; the backward pass scales the two gradients into new tensors."""
    c = s.model.config
    Vp, C = c.padded_vocab_size, c.n_embd
    saved = a * N * C + (4 * Vp * C if s.head.trainable else 0)
    rows = min(N, chunk_rows(Vp, torch.device(device)))
    # A chunk: its logits (a), log-probabilities (fp32) and their gradient cast back (a); the next chunk's are
    # allocated before the last one's are freed, so two chunks at the peak. In 16 bits, the head weight and the
    # hidden states are cast once (a*Vp*C, a*N*C) and each chunk's share of the head's gradient is a*Vp*C.
    transient = 2 * rows * Vp * (2 * a + 4) + (2 * a * Vp * C + a * N * C if a < 4 else 0)
    return saved, saved + transient, 2 * saved


def _torch_strategy(s: _Shape, m: _Mode, acts: _Acts, N: int, world: int, micro_steps: float, ckpt: bool) -> Strategy:
    c = s.model.config
    weights = 4 * s.elements + s.buffer_bytes
    grads = 4 * s.trainable_elements
    optimizer = 8 * s.trainable_elements + 4 * s.trainable_tensors
    # Autocast caches a bf16 copy of every trainable matmul weight and bias until the forward ends; the backward
    # pass keeps those it needs (and frozen weights' copies, cast where used) until it has used them.
    copies_saved = 2 * acts.copies_saved if m.autocast else 0
    copies_fwd = 2 * (s.trainable_matmul_elements + s.linear_bias_elements + acts.copies_frozen) if m.autocast else 0
    buckets = grads if world > 1 else 0
    workspace = CUDA_WORKSPACE if m.device == "cuda" else 0
    accumulating = grads if micro_steps > 1 else 0
    _, loss_fwd, loss_bwd = _loss(s, N, m.a, m.device)
    base = weights + optimizer + buckets + workspace + accumulating
    head_copy = 2 * acts.head_copies if m.autocast else 0
    L = max(1, len(s.blocks))
    block_copy = (copies_saved - head_copy) // L
    outside_grads = 4 * s.outside_trainable_elements  # embeddings, final norm, head: their gradients come first
    # The optimizer step: fused AdamW (CUDA) updates in place; the CPU's foreach AdamW holds one temporary list.
    step = weights + optimizer + buckets + workspace + grads + (0 if m.device == "cuda" else 4 * s.trainable_elements)
    largest_block = max(acts.blocks) if acts.blocks else 0
    # During the backward pass activations are freed block by block as gradients are allocated: the sum is
    # largest at one end or the other, with one block's backward working memory on top.
    working = block_copy + largest_block + acts.transient

    def phases(checkpointing: bool) -> dict[str, int]:
        if not checkpointing:
            return {
                "end of forward": base + copies_fwd + acts.full + loss_fwd,
                "start of backward": base + copies_saved + acts.full + loss_bwd,
                "backward of the first block": base - accumulating + grads + working,
                "optimizer step": step,
            }
        # Recomputing a block under autocast casts its weights again (a second bf16 copy of that block's).
        return {
            "end of forward": base + copies_fwd + acts.checkpointed + max(loss_fwd, largest_block),
            "start of backward": base + head_copy + acts.checkpointed + loss_bwd,
            "backward of the last block": base
            + (0 if accumulating else outside_grads)
            + acts.checkpointed
            - acts.tail
            + block_copy
            + working,
            "backward of the first block": base
            - accumulating
            + grads
            + acts.outside
            - acts.tail
            + acts.inputs // L
            + block_copy
            + working,
            "optimizer step": step,
        }

    chosen = phases(ckpt)
    peak_at = max(chosen, key=chosen.get)
    name = "ddp" if world > 1 else "torch"
    notes = []
    if world > 1:
        notes.append(
            f"DDP: + one fp32 copy of the gradients in its buckets ({DDP_BUCKET_MB} MB each; gradient_as_bucket_view=False)"
        )
    return Strategy(
        name=name,
        label=f"ddp x{world}" if world > 1 else "torch",
        weights=weights,
        gradients=grads,
        optimizer=optimizer,
        weight_copies=copies_saved,
        activations=acts.checkpointed if ckpt else acts.full,
        logits=loss_bwd,
        buffers=buckets,
        workspace=workspace,
        total=chosen[peak_at],
        peak_at=peak_at,
        total_without_checkpointing=max(phases(False).values()),
        total_with_checkpointing=max(phases(True).values()),
        activation_checkpointing=ckpt,
        notes=notes,
    )


def _zero_strategy(
    s: _Shape,
    m: _Mode,
    acts: _Acts,
    N: int,
    world: int,
    stage: int,
    ckpt: bool,
    offload: bool = False,
    micro_steps: float = 1,
) -> Strategy:
    c = s.model.config
    P, Pt = s.elements, s.trainable_elements
    mixed = m.a == 2
    w_bytes, g_bytes, o_bytes = (2, 2, 12) if mixed else (4, 4, 8)
    weights = w_bytes * P // (world if stage >= 3 else 1) + s.buffer_bytes
    grads = g_bytes * Pt // (world if stage >= 2 else 1)
    optimizer = 0 if offload else o_bytes * Pt // world
    if stage >= 3:
        buffers = w_bytes * min(P, ZERO3_MAX_LIVE) + g_bytes * min(Pt, ZERO_REDUCE_BUCKET)
    else:
        buffers = g_bytes * min(Pt, ZERO_REDUCE_BUCKET) + w_bytes * min(P, ZERO_REDUCE_BUCKET)
    _, loss_fwd, loss_bwd = _loss(s, N, m.a, m.device)
    workspace = CUDA_WORKSPACE if m.device == "cuda" else 0
    states = weights + grads + optimizer + buffers + workspace
    largest_block = max(acts.blocks) if acts.blocks else 0
    # Stages 1-2 allocate their gradient partition and reduce buckets during the backward pass (the first
    # gradient hook), after the peak at its start, and drop them after the optimizer step; with several
    # micro-batches per step the gradient partition stays from the first one on. Measured on an H100 at one
    # process (bench/gpu_deepspeed.py), the peak is exactly the states without them.
    early = states if stage >= 3 else weights + optimizer + workspace + (grads if micro_steps > 1 else 0)
    without = max(early + acts.full + max(loss_fwd, loss_bwd), states)
    with_ckpt = max(early + acts.checkpointed + max(loss_bwd, largest_block + acts.transient), states)
    name = f"zero-{stage}" + ("-offload" if offload else "")
    return Strategy(
        name=name,
        label=f"zero-{stage} x{world}" + (" + offload" if offload else ""),
        weights=weights,
        gradients=grads,
        optimizer=optimizer,
        weight_copies=0,
        activations=acts.checkpointed if ckpt else acts.full,
        logits=loss_bwd,
        buffers=buffers,
        workspace=workspace,
        total=with_ckpt if ckpt else without,
        peak_at="start of backward",
        total_without_checkpointing=without,
        total_with_checkpointing=with_ckpt,
        activation_checkpointing=ckpt,
    )


# --- the device -------------------------------------------------------------------------------------


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def device_capacity(device: str | torch.device) -> tuple[int | None, str]:
    """(bytes, where the number comes from) of the device a process would train on here."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None, "unknown: no CUDA GPU here (pass --device-memory)"
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)  # total memory, as mem_get_info's, without creating a context
        return props.total_memory, f"{props.name}, total memory"
    available = _mem_available()
    return available, "the CPU's MemAvailable (/proc/meminfo)" if available is not None else "unknown"


def _trainer_settings(spec: Any, device: str | torch.device | None) -> tuple[str, str, str | None]:
    """(device type, precision, ZeRO stage name or None) from the trainer section."""
    trainer = spec.train.trainer
    name = _device_name(spec, device)
    kind = torch.device(name).type
    if kind not in ("cuda", "cpu"):
        raise SpecError(f"aic plan: device {name!r}: plans are made for cuda or cpu.")
    precision = getattr(trainer, "precision", "auto")
    bf16 = precision == "bf16" or (precision in ("auto", None) and kind == "cuda")
    stage = getattr(trainer, "zero_stage", getattr(trainer, "stage", None))
    zero = f"zero-{stage}" if isinstance(stage, int) and 1 <= stage <= 3 else None
    return kind, "bf16" if bf16 else "fp32", zero


def _device_name(spec: Any, device: str | torch.device | None) -> str:
    """The device a run of `spec` trains on here: `device` if given, else train.trainer.device ("auto": CUDA if any)."""
    from aic_core.devices import resolve_device

    name = str(getattr(spec.train.trainer, "device", "auto") if device is None else device)
    try:
        return str(resolve_device(name))
    except ValueError:
        raise SpecError(f"aic plan: device {name!r}: plan for cpu or cuda (cuda:N).") from None


# --- the plan ---------------------------------------------------------------------------------------


def plan(
    spec: Any,
    registry: Any,
    world_size: int = 1,
    device_memory: float | None = None,
    device: str | torch.device | None = None,
    vocab_size: int | None = None,
) -> Plan:
    """Parameters, FLOPs and per-device memory of `spec` for its trainer and for ZeRO 1-3 at `world_size`.

    device_memory: bytes per device (None: what this machine has for `device`). device: "cuda" or "cpu"
    (None: the trainer's device setting, "auto" as the trainer resolves it)."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise SpecError(
            f"--world-size: {world_size!r} processes; a run needs at least 1 (the number of processes torchrun or deepspeed "
            f"would start, e.g. --world-size 8 for one node of 8 GPUs). Leave it out for one process."
        )
    if device_memory is not None and not device_memory > 0:
        raise SpecError(
            f"--device-memory: {device_memory!r}; give the memory of one device in GiB, e.g. 80 for an 80 GB H100."
        )
    kind, precision, zero = _trainer_settings(spec, device)
    model = build_meta_model(spec, registry, vocab_size)
    s = _shape(model)
    c = model.config
    t = spec.train
    T = t.seq_len or c.block_size
    B = t.batch_size
    N = B * T
    ckpt = bool(getattr(t, "activation_checkpointing", False))
    micro_steps = t.grad_accum / world_size
    notes = [
        (
            f"train.batch_size ({B}) is the micro-batch of one device; the global batch is train.batch_size x train.grad_accum "
            f"= {B * t.grad_accum} sequences per step, whatever the number of processes (each runs grad_accum / processes micro-batches)."
        )
    ]
    if t.grad_accum % world_size:
        notes.append(
            f"train.grad_accum ({t.grad_accum}) is not a multiple of --world-size ({world_size}): `aic run` refuses that; planned as if it were."
        )

    # FLOPs
    positional_params = sum(p.numel() for p in model.positional.parameters())
    padding = (c.padded_vocab_size - c.vocab_size) * c.n_embd
    untied_embedding = (model.wte.weight.numel() - padding) if model.lm_head is not None else 0
    parameters, trainable = model.num_params(), model.num_params(trainable_only=True)
    n_matmul = parameters - positional_params - untied_embedding
    frozen = parameters != trainable
    attention_flops = 12 * c.n_layer * c.n_head * c.head_dim * T
    if frozen:
        trainable_positional = sum(p.numel() for p in model.positional.parameters() if p.requires_grad)
        trainable_embedding = untied_embedding if model.wte.weight.requires_grad else 0
        n_trainable = trainable - trainable_positional - trainable_embedding
        flops = 4 * n_matmul + 2 * n_trainable + attention_flops
        formula = f"4N + 2N_trainable + 12LHQT = 4 x {n_matmul:,} + 2 x {n_trainable:,} + 12 x {c.n_layer} x {c.n_head} x {c.head_dim} x {T}"
    else:
        flops = 6 * n_matmul + attention_flops
        formula = f"6N + 12LHQT = 6 x {n_matmul:,} + 12 x {c.n_layer} x {c.n_head} x {c.head_dim} x {T}"

    # Activations: the torch trainer's dtypes (autocast keeps fp32 weights and residual stream), and DeepSpeed's (pure bf16).
    torch_mode = _Mode(kind, 2 if precision == "bf16" else 4, 4, precision == "bf16")
    ds_mode = _Mode(kind, 2 if precision == "bf16" else 4, 2 if precision == "bf16" else 4, False)
    acts = _activations(s, torch_mode, B, T)
    ds_acts = _activations(s, ds_mode, B, T)

    strategies = [_torch_strategy(s, torch_mode, acts, N, world_size, micro_steps, ckpt)]
    strategies += [
        _zero_strategy(s, ds_mode, ds_acts, N, world_size, stage, ckpt, micro_steps=micro_steps) for stage in (1, 2, 3)
    ]
    spec_strategy = zero or strategies[0].name
    if spec.train.trainer.type not in ("torch", "deepspeed"):
        notes.append(f"trainer '{spec.train.trainer.type}' is planned as the torch trainer.")

    if device_memory is not None:
        capacity, source = int(device_memory * GiB), "--device-memory"
    else:
        capacity, source = device_capacity(_device_name(spec, device))
        if kind == "cpu" and world_size > 1 and capacity is not None:  # CPU processes share this machine's memory
            capacity //= world_size
            source += f", shared by {world_size} processes"
    for strategy in strategies:
        strategy.fits = None if capacity is None else strategy.total <= capacity

    # Generation's KV cache: the prompts at once, each at most one token per UTF-8 byte (an upper bound).
    g = spec.generate
    prompts = len(g.prompts)
    if prompts and g.use_cache:
        longest = max(max(len(p.encode("utf-8")), 1) for p in g.prompts) + g.max_new_tokens
        kv = 2 * c.n_layer * prompts * c.kv_heads * longest * c.head_dim * 4 + prompts * longest * (1 + 8)
        kv_shape = f"2 x {c.n_layer} layers x {prompts} prompts x {c.kv_heads} KV heads x {longest} tokens x {c.head_dim} x 4 bytes"
    else:
        kv, kv_shape = 0, "no prompts" if not prompts else "generate.use_cache is off"

    return Plan(
        spec_name=spec.name,
        model=f"{spec.model.type} + {spec.model.positional.type}"
        + (f" + {spec.adapter.type}" if getattr(spec, "adapter", None) else ""),
        parameters=parameters,
        trainable=trainable,
        matmul_parameters=n_matmul,
        flops_per_token=float(flops),
        flops_formula=formula,
        device=kind,
        device_memory=capacity,
        device_memory_source=source,
        world_size=world_size,
        batch_size=B,
        grad_accum=t.grad_accum,
        micro_steps=micro_steps,
        seq_len=T,
        global_batch=B * t.grad_accum,
        tokens_per_step=B * t.grad_accum * T,
        precision="bf16 autocast, fp32 weights" if precision == "bf16" else "fp32",
        attention=acts.kernel,
        activation_checkpointing=ckpt,
        activations=acts.full,
        activations_checkpointed=acts.checkpointed,
        loss_saved=_loss(s, N, torch_mode.a, kind)[0],
        kv_cache=kv,
        kv_cache_shape=kv_shape,
        spec_strategy=spec_strategy,
        strategies=strategies,
        notes=notes,
    )


# --- refusing what cannot fit -----------------------------------------------------------------------


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def _with_train(spec: Any, **changes: Any) -> Any:
    return spec.model_copy(update={"train": spec.train.model_copy(update=changes)})


def check_fits(
    spec: Any,
    registry: Any,
    world_size: int = 1,
    device: str | torch.device | None = None,
    device_memory: float | None = None,
    vocab_size: int | None = None,
) -> Plan | None:
    """Refuse, with a SpecError that says what to change, a spec whose strategy cannot fit one device.
    Returns the plan when it fits or when the device's memory is unknown; None when the vocabulary size is
    not known yet (a tokenizer whose options do not state it: call again with `vocab_size` once it exists).
    Allocates nothing."""
    try:
        p = plan(spec, registry, world_size, device_memory, device, vocab_size)
    except VocabularyUnknown:
        return None
    if p.fits is False:
        raise SpecError(fit_advice(spec, registry, p, device, vocab_size))
    return p


def fit_advice(
    spec: Any, registry: Any, p: Plan, device: str | torch.device | None = None, vocab_size: int | None = None
) -> str:
    """One paragraph: why the spec's strategy does not fit `p.device_memory`, and what would (each checked
    with the same plan): a smaller micro-batch for the same global batch, activation checkpointing, a ZeRO
    stage, ZeRO-3 with the optimizer state offloaded to the CPU."""
    s = p.strategy()
    capacity = p.device_memory or 0
    world_size = p.world_size
    t = spec.train
    fixes = []
    # 1. A smaller micro-batch, the same global batch (grad_accum a multiple of the processes).
    global_batch = t.batch_size * t.grad_accum
    for b in range(t.batch_size - 1, 0, -1):
        if global_batch % b or (global_batch // b) % world_size:
            continue
        q = plan(
            _with_train(spec, batch_size=b, grad_accum=global_batch // b),
            registry,
            world_size,
            capacity / GiB,
            device,
            vocab_size,
        )
        if q.strategy(s.name).fits:
            fixes.append(
                f"train.batch_size {b} with train.grad_accum {global_batch // b} (the same global batch; "
                f"{_gib(q.strategy(s.name).total)})"
            )
            break
    # 2. Activation checkpointing.
    if not s.activation_checkpointing and s.total_with_checkpointing <= capacity:
        fixes.append(
            f'"train.activation_checkpointing": true ({_gib(s.total_with_checkpointing)}; about one more forward pass per step)'
        )
    # 3. A ZeRO stage (the deepspeed trainer), else ZeRO-3 with the optimizer state offloaded to the CPU.
    zero = [z for z in p.strategies if z.name.startswith("zero") and z.name != s.name]
    for z in zero:
        if z.total <= capacity or (not z.activation_checkpointing and z.total_with_checkpointing <= capacity):
            how = "" if z.total <= capacity else " with activation checkpointing"
            size = z.total if z.total <= capacity else z.total_with_checkpointing
            fixes.append(
                f"the deepspeed trainer with ZeRO stage {z.name[-1]} over {world_size} device(s){how} ({_gib(size)})"
            )
            break
    else:
        kind, precision, _ = _trainer_settings(spec, device)
        shape = _shape(build_meta_model(spec, registry, vocab_size))
        mode = _Mode(kind, 2 if precision == "bf16" else 4, 2 if precision == "bf16" else 4, False)
        acts = _activations(shape, mode, t.batch_size, p.seq_len)
        off = _zero_strategy(
            shape, mode, acts, t.batch_size * p.seq_len, world_size, 3, True, offload=True, micro_steps=p.micro_steps
        )
        if off.total <= capacity:
            fixes.append(
                f"ZeRO stage 3 with the optimizer state offloaded to the CPU and activation checkpointing ({_gib(off.total)} on the device)"
            )
    if not fixes:
        fixes.append("more devices (--world-size, torchrun --nproc_per_node) with a ZeRO stage, or a smaller model")
    parts = (
        f"weights {_gib(s.weights)}, gradients {_gib(s.gradients)}, optimizer state {_gib(s.optimizer)}, "
        f"activations {_gib(s.activations)} for a micro-batch of {t.batch_size} x {p.seq_len} tokens, logits/loss {_gib(s.logits)}"
        + (f", autocast weight copies {_gib(s.weight_copies)}" if s.weight_copies else "")
        + (f", buffers {_gib(s.buffers)}" if s.buffers else "")
    )
    return (
        f"{p.spec_name}: this run does not fit: training {p.model} ({p.parameters:,} parameters) with {s.label} needs about "
        f"{_gib(s.total)} per device at its peak ({s.peak_at}; {parts}), but the {p.device} device has {_gib(capacity)} "
        f"({p.device_memory_source}). To make it fit, change one of: "
        + "; or ".join(fixes)
        + ". `aic plan` shows the whole table."
    )


# --- the table for people ---------------------------------------------------------------------------


def format_plan(p: Plan) -> str:
    unit, scale = ("GiB", GiB) if max(s.total for s in p.strategies) >= GiB else ("MiB", 2**20)

    def gib(n: int) -> str:
        return f"{n / scale:,.2f}"

    lines = [
        f"aic plan: {p.spec_name} ({p.model})",
        f"  parameters       {p.parameters:,} ({p.trainable:,} trainable)",
        (
            f"  FLOPs per token  {p.flops_per_token:.3e}  ({p.flops_formula}; N = parameters in matmuls, "
            f"{p.matmul_parameters:,}); {p.flops_per_token * p.tokens_per_step:.3e} per step"
        ),
        (
            f"  batch            micro-batch {p.batch_size} x {p.seq_len} tokens per device (train.batch_size); global batch "
            f"{p.global_batch} sequences = batch_size {p.batch_size} x grad_accum {p.grad_accum} ({p.tokens_per_step:,} tokens per step); "
            f"{p.world_size} process(es), {p.micro_steps:g} micro-batch(es) each per step"
        ),
        f"  device           {p.device}: "
        + (f"{_gib(p.device_memory)} ({p.device_memory_source})" if p.device_memory else p.device_memory_source),
        f"  compute          {p.precision}; attention: SDPA {p.attention} kernel; activation checkpointing "
        + ("on" if p.activation_checkpointing else "off"),
        "",
    ]
    header = [f"per device, {unit}"] + [s.label + (" *" if s.name == p.spec_strategy else "") for s in p.strategies]
    rows = [
        ["weights"] + [gib(s.weights) for s in p.strategies],
        ["gradients"] + [gib(s.gradients) for s in p.strategies],
        ["optimizer state"] + [gib(s.optimizer) for s in p.strategies],
        ["autocast weight copies"] + [gib(s.weight_copies) for s in p.strategies],
        ["activations" + (" (checkpointed)" if p.activation_checkpointing else "")]
        + [gib(s.activations) for s in p.strategies],
        ["logits/loss buffer"] + [gib(s.logits) for s in p.strategies],
        ["DDP/ZeRO buffers"] + [gib(s.buffers) for s in p.strategies],
        ["CUDA workspaces"] + [gib(s.workspace) for s in p.strategies],
        ["peak total"] + [gib(s.total) for s in p.strategies],
        ["  peak is at"] + [s.peak_at for s in p.strategies],
        ["  fits " + (_gib(p.device_memory) if p.device_memory else "(unknown)")]
        + ["?" if s.fits is None else "yes" if s.fits else "NO" for s in p.strategies],
        ["total " + ("without" if p.activation_checkpointing else "with") + " act. checkpointing"]
        + [
            gib(s.total_without_checkpointing if p.activation_checkpointing else s.total_with_checkpointing)
            for s in p.strategies
        ],
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        lines.append("  " + "  ".join(x.ljust(widths[0]) if i == 0 else x.rjust(widths[i]) for i, x in enumerate(r)))
    lines += [
        "",
        (
            f"  KV cache for generate: {_gib(p.kv_cache)} ({p.kv_cache_shape}); the generate stage runs after training, "
            "so it is not part of the training peak"
        ),
        (
            "  * the spec's trainer. Gradients are counted in the peak only where they are alive (optimizer step; "
            "grad_accum micro-steps; ZeRO keeps its own). ZeRO columns: the ZeRO paper's 2 + 2 + 12 bytes per parameter, "
            "sharded by stage, and DeepSpeed's default buckets."
        ),
    ]
    lines += [f"  note: {n}" for n in p.notes]
    return "\n".join(lines)
