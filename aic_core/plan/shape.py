"""The model's shape for `aic plan`, counted from its config: one block built on the meta device, times n_layer.

Nothing is allocated, and the count costs the same for 4 layers as for 100,000: the model plugin builds the model
with one block (its config with n_layer = 1) on the meta device, the positional plugin its encoding, and since every
block of an aic Transformer is `Block(config)`, the full model is the parts outside the blocks plus n_layer times
that block. The model plugin's own `build` is used, so a plugin whose `build` ignores the config's n_layer and builds
every block is read block by block instead.

An adapter is not applied to anything: its plugin says, through `AdapterPlugin.plan_layers`, which linear layers of
the full model it would wrap and what it adds to each (an `AdapterLayer`); the base is frozen, as `apply` freezes it.
What the positional encoding does is asked on meta tensors (does `rotate` make new tensors, does `attn_bias` return
one); what it keeps for the backward pass, through `PositionalPlugin.plan_cache_bytes`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from aic_core.errors import SpecError
from aic_core.model.nn.attention import CausalSelfAttention
from aic_core.model.nn.mlp import MLP, SwiGLU
from aic_core.model.nn.norm import RMSNorm
from aic_core.model.nn.transformer import Transformer, TransformerConfig

# --- what an adapter tells the plan (AdapterPlugin.plan_layers) ------------------------------------------


@dataclass(frozen=True)
class LayerInput:
    """A wrapped linear layer's input as the plan sees it, per token: what `AdapterLayer.saved` is told."""

    features: int  # the layer's in_features
    bytes: int  # bytes per element of the input as it arrives (the fp32 residual stream under autocast, ...)
    compute_bytes: int  # bytes per element of the matmul's dtype
    cast: bool  # autocast casts the input to the compute dtype (a new tensor for each layer that uses it)
    mask_bytes: int  # bytes per element of a dropout mask of this input (a bool on CUDA, the input's float on the CPU)
    saved: bool  # the input is already saved for the backward pass (by the base layer, or by whoever made it)
    requires_grad: bool  # the input needs a gradient


@dataclass(frozen=True)
class AdapterLayer:
    """What an adapter adds to one linear layer it wraps, for `aic plan` (`AdapterPlugin.plan_layers` returns one
    per wrapped layer). `tensors`: the elements of each trainable tensor it adds; they go through matmuls, so
    autocast keeps bf16 copies of them. Subclass and override `saved` and `weight_copies` where the defaults (the
    input saved once; every tensor's copy kept for the backward pass) are not what the adapter's forward does."""

    tensors: tuple[int, ...]

    @property
    def elements(self) -> int:
        return sum(self.tensors)

    def saved(self, x: LayerInput) -> int:
        """Bytes per token the adapter's branch saves for the backward pass (default: its input, once)."""
        if x.cast:
            return x.compute_bytes * x.features
        return 0 if x.saved else x.bytes * x.features

    def weight_copies(self, requires_grad: bool) -> int:
        """Elements of its tensors whose autocast copies the backward pass keeps; `requires_grad`: the layer's
        input needs a gradient (default: all of them)."""
        return self.elements


# --- the counted shape -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Linear:
    inputs: int
    trainable: bool  # the weight gets a gradient, so the matmul saves its input
    weight_elements: int = 0
    adapter: AdapterLayer | None = None

    def copies(self, grad_in: bool) -> tuple[int, int]:
        """(elements of autocast copies saved for the backward pass, of them frozen): a weight's copy is saved
        when the input needs a gradient; the adapter says which of its own it keeps."""
        base = self.weight_elements if grad_in else 0
        extra = self.adapter.weight_copies(grad_in) if self.adapter is not None else 0
        return base + extra, 0 if self.trainable else base


@dataclass(frozen=True)
class BlockShape:
    norm1: str
    norm2: str
    norm1_trainable: bool
    norm2_trainable: bool
    mlp: str  # "gelu", "swiglu" or "other" (treated as GELU-like: two F-wide tensors)
    qkv: Linear
    proj: Linear
    fc: Linear
    fc_out: int
    mlp_proj: Linear


@dataclass
class ModelShape:
    """The model as `aic plan` counts it. Element counts include the rows that pad the vocabulary (they are
    allocated); `parameters` and `trainable` do not (as Transformer.num_params)."""

    config: TransformerConfig
    n_layer: int  # blocks in the model
    blocks: list[tuple[BlockShape, int]]  # runs of equal consecutive blocks: (block, how many)
    elements: int  # every parameter element, as allocated
    trainable_elements: int
    trainable_tensors: int
    outside_trainable_elements: int  # trainable elements outside the blocks (embeddings, final norm, head)
    buffer_bytes: int
    trainable_matmul_elements: int  # trainable weights that go through a matmul (autocast caches their copies)
    linear_bias_elements: int
    rotates: bool  # the positional encoding rotates q and k into new tensors
    has_bias: bool  # it adds an attention bias
    documents: bool  # rows pack several documents (chat data): a (B, 1, T, T) block-diagonal mask, positions per row
    cache_bytes: Callable[[int, int], int]  # (batch_size, seq_len) -> bytes it keeps for the backward pass
    norm_f: str
    norm_f_trainable: bool
    head: Linear
    wte_trainable: bool
    wpe_trainable: bool
    parameters: int
    trainable: int
    matmul_parameters: int  # N of the FLOP formula: all parameters but lookup-only embeddings
    trainable_matmul_parameters: int
    notes: list[str] = dataclasses.field(default_factory=list)


class VocabularyUnknown(SpecError):
    """The vocabulary size cannot be known before the tokenizer exists (its options do not state it)."""


def vocab_size_of(spec: Any, vocab_size: int | None) -> int:
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
    """The spec's whole model (model plugin + positional plugin + adapter) on the meta device: shapes, no storage.
    Its cost grows with n_layer; the plan itself counts one block (`count_model`)."""
    model_plugin = registry.get("model", spec.model.type)
    positional_plugin = registry.get("positional", spec.model.positional.type)
    with torch.device("meta"):
        config = model_plugin.config(spec.model, vocab_size_of(spec, vocab_size))
        positional = positional_plugin.build(spec.model.positional, config)
        model = model_plugin.build(spec.model, config, positional)
        if getattr(spec, "adapter", None) is not None:
            registry.get("adapter", spec.adapter.type).apply(model, spec.adapter)
    return model


def _norm_kind(module: nn.Module) -> str:
    return "rmsnorm" if isinstance(module, RMSNorm) else "layernorm"


def _numel(params: list[nn.Parameter], trainable: bool | None = None) -> int:
    return sum(p.numel() for p in params if trainable is None or p.requires_grad == trainable)


def _probe(positional: nn.Module, c: TransformerConfig) -> tuple[bool, bool]:
    """(rotates, has_bias): what the positional encoding does, asked on meta tensors."""
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
    return rotates, has_bias


def count_model(spec: Any, registry: Any, vocab_size: int | None = None) -> ModelShape:
    """The spec's model counted from its config: one block on the meta device, times n_layer."""
    model_plugin = registry.get("model", spec.model.type)
    positional_plugin = registry.get("positional", spec.model.positional.type)
    with torch.device("meta"):
        c = model_plugin.config(spec.model, vocab_size_of(spec, vocab_size))
        positional = positional_plugin.build(spec.model.positional, c)
        model = model_plugin.build(spec.model, dataclasses.replace(c, n_layer=min(c.n_layer, 1)), positional)
    built = list(model.blocks)
    # One built block stands for all n_layer; a plugin whose build made every block anyway is read block by block.
    L = c.n_layer if len(built) == 1 else len(built)
    templates = range(len(built))

    def template(i: int) -> int:
        return 0 if len(built) == 1 else i

    def over_blocks(per_template: Callable[[int], int]) -> int:
        return L * per_template(0) if len(built) == 1 else sum(per_template(j) for j in templates)

    in_blocks = {id(t) for t in [*model.blocks.parameters(), *model.blocks.buffers()]}
    outside = [p for p in model.parameters() if id(p) not in in_blocks]
    block_linears = [{n: m for n, m in b.named_modules() if isinstance(m, nn.Linear)} for b in built]
    outside_linears = {
        n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.startswith("blocks.")
    }

    # An adapter says which linear layers of the whole model it wraps, by their full names, and what it adds to each.
    adapter_spec = getattr(spec, "adapter", None)
    wrapped: dict[str, AdapterLayer] = {}
    notes: list[str] = []
    if adapter_spec is not None:
        adapter = registry.get("adapter", adapter_spec.type)
        shapes_of = [[(n, (m.in_features, m.out_features)) for n, m in linears.items()] for linears in block_linears]
        names = {
            prefix + n: shape for i in range(L) for prefix in (f"blocks.{i}.",) for n, shape in shapes_of[template(i)]
        }
        names.update({n: (m.in_features, m.out_features) for n, m in outside_linears.items()})
        told = adapter.plan_layers(adapter_spec, names)
        wrapped = dict(told or {})
        if told is None:
            notes.append(
                f"adapter '{adapter_spec.type}' does not tell the plan what it adds (AdapterPlugin.plan_layers): "
                "planned as the frozen base alone."
            )
    frozen = adapter_spec is not None  # an adapter freezes the base (AdapterPlugin.apply)

    def trainable(p: nn.Parameter | None) -> bool:
        return p is not None and p.requires_grad and not frozen

    def module_trainable(module: nn.Module) -> bool:
        return any(trainable(p) for p in module.parameters())

    def linear(module: nn.Module, name: str) -> Linear:
        return Linear(
            inputs=module.in_features,
            trainable=trainable(module.weight),
            weight_elements=module.weight.numel(),
            adapter=wrapped.get(name),
        )

    shapes: dict[tuple, BlockShape] = {}
    for block in built:
        if not isinstance(block.attn, CausalSelfAttention):
            raise SpecError(
                "aic plan: the model's attention "
                f"({type(block.attn).__name__}) is not aic's; its memory cannot be planned."
            )
    # The four linear layers the plan reads in each built block, by their names in the block.
    parts = [(b.attn.qkv, b.attn.proj, b.mlp.fc, b.mlp.proj) for b in built]
    part_names = [[next(n for n, m in block_linears[j].items() if m is p) for p in parts[j]] for j in templates]

    def block_shape(i: int) -> BlockShape:
        j = template(i)
        prefix = f"blocks.{i}."
        key = (j, *[wrapped.get(prefix + n) for n in part_names[j]])
        if key not in shapes:
            block = built[j]
            mlp = block.mlp
            kind = "swiglu" if isinstance(mlp, SwiGLU) else "gelu" if isinstance(mlp, MLP) else "other"
            qkv, proj, fc, mlp_proj = (linear(m, prefix + n) for m, n in zip(parts[j], part_names[j], strict=True))
            shapes[key] = BlockShape(
                norm1=_norm_kind(block.norm1),
                norm2=_norm_kind(block.norm2),
                norm1_trainable=module_trainable(block.norm1),
                norm2_trainable=module_trainable(block.norm2),
                mlp=kind,
                qkv=qkv,
                proj=proj,
                fc=fc,
                fc_out=mlp.fc.out_features,
                mlp_proj=mlp_proj,
            )
        return shapes[key]

    # Runs of equal consecutive blocks: one run of n_layer unless an adapter wraps some blocks' layers only.
    runs: list[tuple[BlockShape, int]] = []
    if len(built) == 1 and not any(n.startswith("blocks.") for n in wrapped):
        runs.append((block_shape(0), L))
    else:
        for i in range(L):
            b = block_shape(i)
            if runs and runs[-1][0] == b:
                runs[-1] = (b, runs[-1][1] + 1)
            else:
                runs.append((b, 1))

    block_params = [list(b.parameters()) for b in built]
    block_buffers = [list(b.buffers()) for b in built]
    adapter_elements = sum(a.elements for a in wrapped.values())
    elements = _numel(outside) + over_blocks(lambda j: _numel(block_params[j])) + adapter_elements
    trainable_outside = sum(p.numel() for p in outside if trainable(p))
    trainable_elements = (
        trainable_outside + over_blocks(lambda j: sum(p.numel() for p in block_params[j] if trainable(p)))
    ) + adapter_elements
    trainable_tensors = (
        sum(1 for p in outside if trainable(p))
        + over_blocks(lambda j: sum(1 for p in block_params[j] if trainable(p)))
        + sum(len(a.tensors) for a in wrapped.values())
    )

    def linear_sum(linears: list[nn.Module], part: str) -> int:
        return sum(getattr(m, part).numel() for m in linears if trainable(getattr(m, part)))

    weights = linear_sum(list(outside_linears.values()), "weight")
    weights += over_blocks(lambda j: linear_sum(list(block_linears[j].values()), "weight"))
    biases = linear_sum(list(outside_linears.values()), "bias")
    biases += over_blocks(lambda j: linear_sum(list(block_linears[j].values()), "bias"))
    head = model.lm_head
    wte_trainable = trainable(model.wte.weight)
    if head is None:
        weights += model.wte.weight.numel() if wte_trainable else 0  # the tied head's matmul uses wte
    buffer_bytes = sum(t.numel() * t.element_size() for t in model.buffers() if id(t) not in in_blocks)
    buffer_bytes += over_blocks(lambda j: sum(t.numel() * t.element_size() for t in block_buffers[j]))
    rotates, has_bias = _probe(positional, c)

    # Parameter counts as Transformer.num_params: the rows that pad the vocabulary are not counted.
    padding = (c.padded_vocab_size - c.vocab_size) * c.n_embd
    parameters = elements - padding * (2 if head is not None else 1)
    trainable_count = trainable_elements - padding * (wte_trainable + (head is not None and trainable(head.weight)))
    positional_params = list(positional.parameters())
    untied_embedding = (model.wte.weight.numel() - padding) if head is not None else 0
    options = spec.model.positional
    return ModelShape(
        config=c,
        n_layer=L,
        blocks=runs,
        elements=elements,
        trainable_elements=trainable_elements,
        trainable_tensors=trainable_tensors,
        outside_trainable_elements=trainable_outside
        + sum(a.elements for n, a in wrapped.items() if not n.startswith("blocks.")),
        buffer_bytes=buffer_bytes,
        trainable_matmul_elements=weights + adapter_elements,
        linear_bias_elements=biases,
        rotates=rotates,
        has_bias=has_bias,
        documents=getattr(spec.data, "format", None) == "chat" and getattr(spec.data, "pack", False),
        cache_bytes=lambda batch, seq_len: positional_plugin.plan_cache_bytes(options, c, batch, seq_len),
        norm_f=_norm_kind(model.norm_f),
        norm_f_trainable=module_trainable(model.norm_f),
        head=linear(head, "lm_head")
        if head is not None
        else Linear(inputs=c.n_embd, trainable=wte_trainable, weight_elements=model.wte.weight.numel()),
        wte_trainable=wte_trainable,
        wpe_trainable=any(trainable(p) for p in positional_params),
        parameters=parameters,
        trainable=trainable_count,
        matmul_parameters=parameters - _numel(positional_params) - untied_embedding,
        trainable_matmul_parameters=trainable_count
        - sum(p.numel() for p in positional_params if trainable(p))
        - (untied_embedding if wte_trainable else 0),
        notes=notes,
    )
