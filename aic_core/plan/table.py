"""The table `aic plan` prints: one column per way to train (`Plan.strategies`), one row per part of the peak."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aic_core.plan.memory import Plan

GiB = 2**30


def size_text(n: float) -> str:
    """Bytes as people read them: GiB from a tenth of one, else MiB."""
    return f"{n / GiB:.1f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"


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
            f"  batch            micro-batch {p.batch_size} x {p.seq_len} tokens per device (train.batch_size); "
            f"global batch {p.global_batch} sequences = batch_size {p.batch_size} x grad_accum {p.grad_accum} "
            f"({p.tokens_per_step:,} tokens per step); {p.world_size} process(es), {p.micro_steps:g} micro-batch(es) "
            "each per step"
        ),
        f"  device           {p.device}: "
        + (f"{size_text(p.device_memory)} ({p.device_memory_source})" if p.device_memory else p.device_memory_source),
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
        ["  fits " + (size_text(p.device_memory) if p.device_memory else "(unknown)")]
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
            f"  KV cache for generate: {size_text(p.kv_cache)} ({p.kv_cache_shape}); the generate stage runs "
            "after training, so it is not part of the training peak"
        ),
        "  * the spec's trainer. Gradients are counted in the peak only where they are alive (optimizer step; "
        "grad_accum micro-steps; ZeRO keeps its own)."
        + "".join(f" {f}" for f in dict.fromkeys(s.footnote for s in p.strategies if s.footnote)),
    ]
    lines += [f"  note: {n}" for n in p.notes]
    return "\n".join(lines)
