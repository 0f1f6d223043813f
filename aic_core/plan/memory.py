"""Analytic memory and FLOP planning (`aic plan`): will a spec fit the device, and what would make it fit.

Nothing is allocated. The plan reads in stages, one module each:

- `shape.py`: the model's shape, counted from its config (one block on the meta device, times n_layer), with what
  the adapter plugin adds to each layer it wraps (`AdapterPlugin.plan_layers`);
- `activations.py`: what one micro-batch's forward keeps for the backward pass, and the LM head and loss buffer,
  with what the positional plugin keeps for every layer (`PositionalPlugin.plan_cache_bytes`);
- `columns.py`: one column per way to train: the core's plain-PyTorch / DDP column, and each trainer plugin's own
  (`TrainerPlugin.plan_memory`: the DeepSpeed plugin gives ZeRO 1-3), what each keeps per device and its peak;
- this module: the plan of a spec (`plan`), refusing what cannot fit with what would (`check_fits`, `fit_advice`);
- `table.py`: the table `aic plan` prints.

Also here:

- KV cache (generate stage, after training, not in the training peak): 2 x n_layer x prompts x
  (longest prompt + max_new_tokens) x n_kv_head x head_dim x 4 bytes (the fp32 model), + slot masks and
  positions; a prompt is at most one token per UTF-8 byte (an upper bound: the tokenizer may not exist yet).
- FLOPs per token (PaLM appendix B / nanoGPT's MFU): 6*N + 12*L*H*Q*T, N = the parameters in matmuls:
  all parameters but lookup-only embeddings (position embeddings, and the token embedding when the head
  is untied; a tied head counts once), as nanoGPT's get_num_params(non_embedding=True); L layers, H heads,
  Q head size, T the training context. With frozen (adapter) weights, 4*N + 2*N_trainable + 12*L*H*Q*T.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from aic_core.errors import PluginError, SpecError
from aic_core.plan.activations import attention_kernel
from aic_core.plan.columns import (
    CUDA_WORKSPACE,
    DDP_BUCKET_MB,
    MemoryInputs,
    Strategy,
    data_parallel_column,
)
from aic_core.plan.shape import ModelShape, VocabularyUnknown, build_meta_model, count_model
from aic_core.plan.table import GiB, format_plan, size_text

__all__ = [
    "CUDA_WORKSPACE",
    "DDP_BUCKET_MB",
    "GiB",
    "MemoryInputs",
    "Plan",
    "Strategy",
    "VocabularyUnknown",
    "attention_kernel",
    "build_meta_model",
    "check_fits",
    "count_model",
    "device_capacity",
    "fit_advice",
    "format_plan",
    "plan",
]


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
    fallbacks: list[Strategy] = field(default_factory=list)  # what the fit advice offers when no column fits

    def strategy(self, name: str | None = None) -> Strategy:
        name = name or self.spec_strategy
        return next(s for s in self.strategies if s.name == name)

    @property
    def fits(self) -> bool | None:
        return self.strategy().fits

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["fallbacks"]
        for column in data["strategies"]:
            for key in ("advice", "fallback", "footnote"):
                del column[key]
        data["fits"] = self.fits
        data["units"] = "bytes"
        return data


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


def _trainer_settings(spec: Any, device: str | torch.device | None) -> tuple[str, str]:
    """(device type, precision) from the trainer section."""
    name = _device_name(spec, device)
    kind = torch.device(name).type
    if kind not in ("cuda", "cpu"):
        raise SpecError(f"aic plan: device {name!r}: plans are made for cuda or cpu.")
    precision = getattr(spec.train.trainer, "precision", "auto")
    bf16 = precision == "bf16" or (precision in ("auto", None) and kind == "cuda")
    return kind, "bf16" if bf16 else "fp32"


def _device_name(spec: Any, device: str | torch.device | None) -> str:
    """The device a run of `spec` trains on here: `device` if given, else train.trainer.device ("auto": CUDA if
    any)."""
    name = str(getattr(spec.train.trainer, "device", "auto") if device is None else device)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(name)
    except RuntimeError:
        raise SpecError(f"aic plan: device {name!r}: plan for cpu or cuda (cuda:N).") from None
    return name


# --- the columns ------------------------------------------------------------------------------------


def _columns(spec: Any, registry: Any, inputs: MemoryInputs) -> tuple[list[Strategy], str, list[str]]:
    """(the columns: the core's first, then each trainer plugin's in the registry's order, a name once; the
    name of the spec's; notes)."""
    from aic_core.plugins.kinds import TrainerPlugin
    from aic_core.plugins.registry import BUILTIN_DISTRIBUTION

    section = spec.train.trainer
    columns = [data_parallel_column(inputs)]
    own: list[Strategy] = []
    for name, plugin in registry.plugins("trainer").items():
        mine = name == section.type
        for column in plugin.plan_memory(section if mine else None, inputs):
            if mine:
                own.append(column)
            if all(c.name != column.name for c in columns):
                columns.append(column)
    trainer = registry.get("trainer", section.type)
    chosen = trainer.plan_column(section, inputs.world_size)
    if chosen is None:
        chosen = next((c.name for c in own if not c.fallback), columns[0].name)
    if not any(c.name == chosen and not c.fallback for c in columns):
        raise PluginError(
            f"trainer '{section.type}': plan_column named the column {chosen!r}, which is none of the plan's "
            f"({', '.join(c.name for c in columns if not c.fallback)})."
        )
    notes = []
    builtin = any(
        r.kind == "trainer" and r.name == section.type and r.distribution == BUILTIN_DISTRIBUTION
        for r in getattr(registry, "records", [])
    )
    if type(trainer).plan_memory is TrainerPlugin.plan_memory and not builtin:
        notes.append(f"trainer '{section.type}' is planned as the torch trainer.")
    return columns, chosen, notes


# --- the plan ---------------------------------------------------------------------------------------


def plan(
    spec: Any,
    registry: Any,
    world_size: int = 1,
    device_memory: float | None = None,
    device: str | torch.device | None = None,
    vocab_size: int | None = None,
    shape: ModelShape | None = None,
) -> Plan:
    """Parameters, FLOPs and per-device memory of `spec` for each installed trainer's ways to train at
    `world_size` (the core's torch/DDP column, the DeepSpeed plugin's ZeRO 1-3, any other trainer's).

    device_memory: bytes per device (None: what this machine has for `device`). device: "cuda" or "cpu"
    (None: the trainer's device setting, "auto" as the trainer resolves it). shape: the model as
    `count_model(spec, registry, vocab_size)` counts it, when the caller has it already."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise SpecError(
            f"--world-size: {world_size!r} processes; a run needs at least 1 (the number of processes torchrun or "
            f"deepspeed would start, e.g. --world-size 8 for one node of 8 GPUs). Leave it out for one process."
        )
    if device_memory is not None and not device_memory > 0:
        raise SpecError(
            f"--device-memory: {device_memory!r}; give the memory of one device in GiB, e.g. 80 for an 80 GB H100."
        )
    kind, precision = _trainer_settings(spec, device)
    s = shape if shape is not None else count_model(spec, registry, vocab_size)
    c = s.config
    t = spec.train
    T = t.seq_len or c.block_size
    B = t.batch_size
    ckpt = bool(getattr(t, "activation_checkpointing", False))
    micro_steps = t.grad_accum / world_size
    notes = [
        (
            f"train.batch_size ({B}) is the micro-batch of one device; the global batch is train.batch_size x "
            f"train.grad_accum = {B * t.grad_accum} sequences per step, whatever the number of processes (each runs "
            "grad_accum / processes micro-batches)."
        )
    ]
    if t.grad_accum % world_size:
        notes.append(
            f"train.grad_accum ({t.grad_accum}) is not a multiple of --world-size ({world_size}): `aic run` refuses "
            "that; planned as if it were."
        )

    # FLOPs
    n_matmul = s.matmul_parameters
    attention_flops = 12 * c.n_layer * c.n_head * c.head_dim * T
    shape_of = f"12 x {c.n_layer} x {c.n_head} x {c.head_dim} x {T}"
    if s.parameters != s.trainable:
        n_trainable = s.trainable_matmul_parameters
        flops = 4 * n_matmul + 2 * n_trainable + attention_flops
        formula = f"4N + 2N_trainable + 12LHQT = 4 x {n_matmul:,} + 2 x {n_trainable:,} + {shape_of}"
    else:
        flops = 6 * n_matmul + attention_flops
        formula = f"6N + 12LHQT = 6 x {n_matmul:,} + {shape_of}"

    inputs = MemoryInputs(s, kind, precision, world_size, B, T, micro_steps, ckpt)
    columns, spec_strategy, trainer_notes = _columns(spec, registry, inputs)
    notes += s.notes + trainer_notes
    strategies = [column for column in columns if not column.fallback]
    fallbacks = [column for column in columns if column.fallback]

    if device_memory is not None:
        capacity, source = int(device_memory * GiB), "--device-memory"
    else:
        capacity, source = device_capacity(_device_name(spec, device))
        if kind == "cpu" and world_size > 1 and capacity is not None:  # CPU processes share this machine's memory
            capacity //= world_size
            source += f", shared by {world_size} processes"
    for strategy in columns:
        strategy.fits = None if capacity is None else strategy.total <= capacity

    # Generation's KV cache: the prompts at once, each at most one token per UTF-8 byte (an upper bound).
    g = spec.generate
    prompts = len(g.prompts)
    if prompts and g.use_cache:
        longest = max(max(len(p.encode("utf-8")), 1) for p in g.prompts) + g.max_new_tokens
        kv = 2 * c.n_layer * prompts * c.kv_heads * longest * c.head_dim * 4 + prompts * longest * (1 + 8)
        kv_shape = (
            f"2 x {c.n_layer} layers x {prompts} prompts x {c.kv_heads} KV heads x {longest} tokens x "
            f"{c.head_dim} x 4 bytes"
        )
    else:
        kv, kv_shape = 0, "no prompts" if not prompts else "generate.use_cache is off"

    acts = inputs.activations(autocast=True)  # the torch trainer's dtypes
    return Plan(
        spec_name=spec.name,
        model=f"{spec.model.type} + {spec.model.positional.type}"
        + (f" + {spec.adapter.type}" if getattr(spec, "adapter", None) else ""),
        parameters=s.parameters,
        trainable=s.trainable,
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
        loss_saved=inputs.loss(inputs.mode(autocast=True).a)[0],
        kv_cache=kv,
        kv_cache_shape=kv_shape,
        spec_strategy=spec_strategy,
        strategies=strategies,
        notes=notes,
        fallbacks=fallbacks,
    )


# --- refusing what cannot fit -----------------------------------------------------------------------


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
        shape = count_model(spec, registry, vocab_size)
    except VocabularyUnknown:
        return None
    p = plan(spec, registry, world_size, device_memory, device, vocab_size, shape=shape)
    if p.fits is False:
        raise SpecError(fit_advice(spec, registry, p, device, vocab_size, shape=shape))
    return p


def fit_advice(
    spec: Any,
    registry: Any,
    p: Plan,
    device: str | torch.device | None = None,
    vocab_size: int | None = None,
    shape: ModelShape | None = None,
) -> str:
    """One paragraph: why the spec's strategy does not fit `p.device_memory`, and what would (each checked
    with the same plan): a smaller micro-batch for the same global batch, activation checkpointing, another
    trainer's column (a ZeRO stage), else a trainer's last resort (ZeRO-3 with the optimizer state offloaded)."""
    s = p.strategy()
    capacity = p.device_memory or 0
    world_size = p.world_size
    t = spec.train
    if shape is None:
        shape = count_model(spec, registry, vocab_size)
    fixes = []
    # 1. A smaller micro-batch, the same global batch (grad_accum a multiple of the processes).
    global_batch = t.batch_size * t.grad_accum
    for b in range(t.batch_size - 1, 0, -1):
        if global_batch % b or (global_batch // b) % world_size:
            continue
        changed = _with_train(spec, batch_size=b, grad_accum=global_batch // b)
        q = plan(changed, registry, world_size, capacity / GiB, device, vocab_size, shape=shape)
        if q.strategy(s.name).fits:
            fixes.append(
                f"train.batch_size {b} with train.grad_accum {global_batch // b} (the same global batch; "
                f"{size_text(q.strategy(s.name).total)})"
            )
            break
    # 2. Activation checkpointing.
    if not s.activation_checkpointing and s.total_with_checkpointing <= capacity:
        fixes.append(
            f'"train.activation_checkpointing": true ({size_text(s.total_with_checkpointing)}; '
            "about one more forward pass per step)"
        )
    # 3. Another trainer's column (the deepspeed trainer's ZeRO stages), else a trainer's last resort.
    for z in (z for z in p.strategies if z.advice and z.name != s.name):
        if z.total <= capacity or (not z.activation_checkpointing and z.total_with_checkpointing <= capacity):
            how = "" if z.total <= capacity else " with activation checkpointing"
            size = z.total if z.total <= capacity else z.total_with_checkpointing
            fixes.append(f"{z.advice} over {world_size} device(s){how} ({size_text(size)})")
            break
    else:
        for f in p.fallbacks:
            if f.total <= capacity:
                fixes.append(f"{f.advice} ({size_text(f.total)} on the device)")
                break
    if not fixes:
        fixes.append("more devices (--world-size, torchrun --nproc_per_node) with a ZeRO stage, or a smaller model")
    parts = (
        f"weights {size_text(s.weights)}, gradients {size_text(s.gradients)}, "
        f"optimizer state {size_text(s.optimizer)}, "
        f"activations {size_text(s.activations)} for a micro-batch of {t.batch_size} x {p.seq_len} tokens, "
        f"logits/loss {size_text(s.logits)}"
        + (f", autocast weight copies {size_text(s.weight_copies)}" if s.weight_copies else "")
        + (f", buffers {size_text(s.buffers)}" if s.buffers else "")
    )
    return (
        f"{p.spec_name}: this run does not fit: training {p.model} ({p.parameters:,} parameters) with {s.label} "
        f"needs about {size_text(s.total)} per device at its peak ({s.peak_at}; {parts}), "
        f"but the {p.device} device has {size_text(capacity)} ({p.device_memory_source}). "
        "To make it fit, change one of: " + "; or ".join(fixes) + ". `aic plan` shows the whole table."
    )
