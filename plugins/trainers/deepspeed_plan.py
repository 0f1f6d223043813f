"""What the DeepSpeed trainer keeps per device, for `aic plan`: the ZeRO 1-3 columns, and ZeRO-3 with the optimizer
state offloaded, which the fit advice offers when nothing else fits (`TrainerPlugin.plan_memory`).

- Mixed precision (ZeRO paper): 2 bytes bf16 weights + 2 bytes bf16 gradients + 12 bytes fp32 master weights,
  momentum and variance per parameter; stage 1 shards the 12, stage 2 also the gradients, stage 3 also the weights,
  over world_size. In fp32 (CPU): 4 + 4 + 8. With the optimizer offloaded, its 12 (or 8) live on the CPU.
- Buffers (DeepSpeed's defaults): stages 1-2 a reduce bucket and an all-gather bucket of min(5e8, P) bf16 elements
  each; stage 3 the gathered ("live") bf16 parameters, min(stage3_max_live_parameters = 1e9, P) elements, plus a
  reduce bucket of min(5e8, Pt).
- DeepSpeed runs the model itself in bf16 (no autocast): activations are those of a pure-bf16 forward, which
  `MemoryInputs.column` counts with the loss buffer and the CUDA workspaces.
- Stages 1-2 allocate their gradient partition and reduce buckets during the backward pass (the first gradient
  hook), after the peak at its start, and drop them after the optimizer step; with several micro-batches per step
  the gradient partition stays from the first one on. Measured on an H100 at one process (bench/gpu_deepspeed.py),
  the peak is exactly the states without them. Stage 3 holds all of its states throughout.

(P = parameter elements, padded vocabulary rows included; Pt = trainable elements.)
"""

from __future__ import annotations

from typing import Any

from aic_core.plan.columns import MemoryInputs, Strategy, data_parallel_name

ZERO_REDUCE_BUCKET = 500_000_000  # DeepSpeed reduce_bucket_size / allgather_bucket_size defaults (elements)
ZERO3_MAX_LIVE = 1_000_000_000  # DeepSpeed stage3_max_live_parameters default (elements)
FOOTNOTE = (
    "ZeRO columns: the ZeRO paper's 2 + 2 + 12 bytes per parameter, sharded by stage, and DeepSpeed's default buckets."
)


def zero_column(
    inputs: MemoryInputs, stage: int, offload: bool = False, activation_checkpointing: bool | None = None
) -> Strategy:
    """ZeRO stage 1, 2 or 3 over `inputs.world_size` processes; `offload`: the optimizer state on the CPU."""
    P, Pt, world = inputs.parameter_elements, inputs.trainable_elements, inputs.world_size
    w_bytes, g_bytes, o_bytes = (2, 2, 12) if inputs.precision == "bf16" else (4, 4, 8)
    weights = w_bytes * P // (world if stage >= 3 else 1) + inputs.buffer_bytes
    grads = g_bytes * Pt // (world if stage >= 2 else 1)
    optimizer = 0 if offload else o_bytes * Pt // world
    if stage >= 3:
        buffers = w_bytes * min(P, ZERO3_MAX_LIVE) + g_bytes * min(Pt, ZERO_REDUCE_BUCKET)
        in_forward = weights + grads + optimizer + buffers
    else:
        buffers = g_bytes * min(Pt, ZERO_REDUCE_BUCKET) + w_bytes * min(P, ZERO_REDUCE_BUCKET)
        in_forward = weights + optimizer + (grads if inputs.micro_steps > 1 else 0)
    if offload:
        advice = f"ZeRO stage {stage} with the optimizer state offloaded to the CPU and activation checkpointing"
    else:
        advice = f"the deepspeed trainer with ZeRO stage {stage}"
    return inputs.column(
        f"zero-{stage}" + ("-offload" if offload else ""),
        f"zero-{stage} x{world}" + (" + offload" if offload else ""),
        weights=weights,
        gradients=grads,
        optimizer=optimizer,
        buffers=buffers,
        in_forward=in_forward,
        activation_checkpointing=activation_checkpointing,
        advice=advice,
        fallback=offload,
        footnote=FOOTNOTE,
    )


class ZeroPlan:
    """The DeepSpeed trainer's plan hooks (mixed into DeepSpeedTrainer)."""

    def plan_memory(self, options: Any, inputs: MemoryInputs) -> list[Strategy]:
        columns = [zero_column(inputs, stage) for stage in (1, 2, 3)]
        return [*columns, zero_column(inputs, 3, offload=True, activation_checkpointing=True)]

    def plan_column(self, options: Any, world_size: int) -> str | None:
        """Stage 0 is plain data parallel: the core's torch / DDP column."""
        return f"zero-{options.stage}" if options.stage >= 1 else data_parallel_name(world_size)
