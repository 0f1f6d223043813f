"""The columns of `aic plan`: what one way of training keeps per device, and its peak.

Each trainer plugin gives its columns through `TrainerPlugin.plan_memory(options, inputs)`: `inputs` is what the
core counted (the model's shape, the micro-batch, the device, the precision, the world size), and a column is a
`Strategy`. A trainer that keeps weights, gradients, optimizer state and buffers per device and runs the model in
the precision's dtype builds its column with `inputs.column(...)`, which adds the activations, the loss buffer and
the CUDA workspaces and finds the peak. The core's own column is plain PyTorch (one process) or DDP (several), the
torch trainer's and the default of `plan_memory`, counted phase by phase (`data_parallel_column`):

- fp32 weights 4P (with bf16 autocast they are the master weights), fp32 gradients 4Pt, AdamW 8Pt (exp_avg,
  exp_avg_sq; + a 4-byte step per tensor). bf16 autocast keeps a bf16 copy of every matmul weight (2 bytes each)
  for the backward pass. DDP (PyTorch's default gradient_as_bucket_view=False) adds its gradient buckets: one more
  fp32 copy of the trainable gradients (4Pt), in buckets of bucket_cap_mb = 25 MB, allocated once and kept.
- The peak is the largest of: end of forward (+ autocast's cache of bf16 copies of every trainable weight, + one
  chunk's logits), start of backward (+ twice the loss's kept gradients), the backward of the first (and,
  checkpointed, the last) block, and the optimizer step (weights + gradients + optimizer state). Gradients are not
  alive during forward/backward with one micro-batch per step (set_to_none); with more micro-steps per rank they
  are. Measured on an H100 (bench/gpu_plan.py, bench/RESULTS.md): within 0.4 % of max_memory_allocated.
- On CUDA, + 64 MiB of cuBLAS/cuBLASLt workspaces, which the caching allocator hands out.

(P = parameter elements, padded vocabulary rows included since they are allocated; Pt = trainable elements.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aic_core.plan.activations import Activations, Mode, activations, loss_bytes
from aic_core.plan.shape import ModelShape

DDP_BUCKET_MB = 25
# cuBLAS + cuBLASLt workspaces, allocated through torch's allocator (measured on an H100: 66-70 MiB all told)
CUDA_WORKSPACE = 64 * 2**20


@dataclass
class Strategy:
    """One column of `aic plan`: the per-device memory of one way to train, in bytes."""

    name: str  # "torch", "ddp", "zero-1", ...: what `TrainerPlugin.plan_column` names
    label: str  # the column's heading
    weights: int
    gradients: int
    optimizer: int
    weight_copies: int  # autocast's bf16 copies of the matmul weights, saved for the backward pass
    activations: int  # saved by one micro-batch's forward (checkpointed or not, as the column says)
    logits: int  # the logits/loss buffer at its peak
    buffers: int  # a trainer's own buffers: DDP gradient buckets; ZeRO buckets and gathered parameters
    workspace: int  # CUDA libraries' workspaces (cuBLAS, cuBLASLt) that the caching allocator hands out
    total: int  # the peak
    peak_at: str
    total_without_checkpointing: int
    total_with_checkpointing: int
    activation_checkpointing: bool
    fits: bool | None = None
    notes: list[str] = field(default_factory=list)
    # Not in `aic plan --json`: how the fit advice names this choice ("the xyz trainer with ...": empty, never
    # offered), whether it is a last resort the advice offers but the table does not show, and a footnote of the
    # table (shown once however many columns give it).
    advice: str = ""
    fallback: bool = False
    footnote: str = ""


def data_parallel_name(world_size: int) -> str:
    """The name of the core's column: plain PyTorch on one process, DDP on several."""
    return "ddp" if world_size > 1 else "torch"


class MemoryInputs:
    """What the core counted for one plan, handed to `TrainerPlugin.plan_memory`.

    parameter_elements (P: every parameter element as allocated, vocabulary padding included), trainable_elements
    (Pt), trainable_tensors, buffer_bytes (the model's registered buffers), world_size, batch_size (sequences per
    micro-batch per device), seq_len, micro_steps (micro-batches per rank per optimizer step), device ("cuda" or
    "cpu"), precision ("bf16" or "fp32"), activation_checkpointing, workspace (CUDA libraries' bytes), and `shape`,
    the model as counted (aic_core.plan.shape.ModelShape)."""

    def __init__(
        self,
        shape: ModelShape,
        device: str,
        precision: str,
        world_size: int,
        batch_size: int,
        seq_len: int,
        micro_steps: float,
        activation_checkpointing: bool,
    ) -> None:
        self.shape = shape
        self.device, self.precision, self.world_size = device, precision, world_size
        self.batch_size, self.seq_len, self.micro_steps = batch_size, seq_len, micro_steps
        self.activation_checkpointing = activation_checkpointing
        self.parameter_elements = shape.elements
        self.trainable_elements = shape.trainable_elements
        self.trainable_tensors = shape.trainable_tensors
        self.buffer_bytes = shape.buffer_bytes
        self.workspace = CUDA_WORKSPACE if device == "cuda" else 0
        self._activations: dict[bool, Activations] = {}

    @property
    def tokens(self) -> int:
        """Tokens of one micro-batch."""
        return self.batch_size * self.seq_len

    def mode(self, autocast: bool) -> Mode:
        """The dtypes of a forward: bf16 autocast over fp32 weights (autocast=True), or the whole model in the
        precision's dtype (autocast=False). In fp32 both are fp32."""
        a = 2 if self.precision == "bf16" else 4
        return Mode(self.device, a, 4 if autocast else a, autocast and self.precision == "bf16")

    def activations(self, autocast: bool) -> Activations:
        """What one micro-batch's forward keeps for the backward pass, in `mode(autocast)`'s dtypes."""
        if autocast not in self._activations:
            self._activations[autocast] = activations(self.shape, self.mode(autocast), self.batch_size, self.seq_len)
        return self._activations[autocast]

    def loss(self, compute_bytes: int) -> tuple[int, int, int]:
        """(kept, peak in the forward pass, peak at the start of the backward pass) of the LM head and loss."""
        return loss_bytes(self.shape, self.tokens, compute_bytes, self.device)

    def column(
        self,
        name: str,
        label: str,
        *,
        weights: int,
        gradients: int,
        optimizer: int,
        buffers: int = 0,
        in_forward: int | None = None,
        activation_checkpointing: bool | None = None,
        advice: str = "",
        fallback: bool = False,
        footnote: str = "",
        notes: list[str] | None = None,
    ) -> Strategy:
        """A column for a trainer that runs the model in the precision's dtype (no autocast) and keeps these states
        per device: the peak is the larger of the states alive during the forward and backward passes (`in_forward`,
        default all of them) plus the activations and the loss buffer, and all the states at the optimizer step;
        the CUDA workspaces are added to both. `activation_checkpointing` (default the spec's) picks the total the
        column shows."""
        ckpt = self.activation_checkpointing if activation_checkpointing is None else activation_checkpointing
        acts = self.activations(autocast=False)
        _, loss_fwd, loss_bwd = self.loss(self.mode(autocast=False).a)
        states = weights + gradients + optimizer + buffers + self.workspace
        early = (states - self.workspace if in_forward is None else in_forward) + self.workspace
        without = max(early + acts.full + max(loss_fwd, loss_bwd), states)
        with_ckpt = max(early + acts.checkpointed + max(loss_bwd, acts.largest_block + acts.transient), states)
        return Strategy(
            name=name,
            label=label,
            weights=weights,
            gradients=gradients,
            optimizer=optimizer,
            weight_copies=0,
            activations=acts.checkpointed if ckpt else acts.full,
            logits=loss_bwd,
            buffers=buffers,
            workspace=self.workspace,
            total=with_ckpt if ckpt else without,
            peak_at="start of backward",
            total_without_checkpointing=without,
            total_with_checkpointing=with_ckpt,
            activation_checkpointing=ckpt,
            notes=list(notes or []),
            advice=advice,
            fallback=fallback,
            footnote=footnote,
        )


def data_parallel_column(inputs: MemoryInputs) -> Strategy:
    """The core's column: plain PyTorch on one device, DDP over several (the torch trainer's), phase by phase."""
    s, world, micro_steps, ckpt = inputs.shape, inputs.world_size, inputs.micro_steps, inputs.activation_checkpointing
    m = inputs.mode(autocast=True)
    acts = inputs.activations(autocast=True)
    weights = 4 * s.elements + s.buffer_bytes
    grads = 4 * s.trainable_elements
    optimizer = 8 * s.trainable_elements + 4 * s.trainable_tensors
    # Autocast caches a bf16 copy of every trainable matmul weight and bias until the forward ends; the backward
    # pass keeps those it needs (and frozen weights' copies, cast where used) until it has used them.
    copies_saved = 2 * acts.copies_saved if m.autocast else 0
    copies_fwd = 2 * (s.trainable_matmul_elements + s.linear_bias_elements + acts.copies_frozen) if m.autocast else 0
    buckets = grads if world > 1 else 0
    workspace = inputs.workspace
    accumulating = grads if micro_steps > 1 else 0
    _, loss_fwd, loss_bwd = inputs.loss(m.a)
    base = weights + optimizer + buckets + workspace + accumulating
    head_copy = 2 * acts.head_copies if m.autocast else 0
    L = max(1, s.n_layer)
    block_copy = (copies_saved - head_copy) // L
    outside_grads = 4 * s.outside_trainable_elements  # embeddings, final norm, head: their gradients come first
    # The optimizer step: fused AdamW (CUDA) updates in place; the CPU's foreach AdamW holds one temporary list.
    step = weights + optimizer + buckets + workspace + grads + (0 if m.device == "cuda" else 4 * s.trainable_elements)
    largest_block = acts.largest_block
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
    notes = []
    if world > 1:
        notes.append(
            f"DDP: + one fp32 copy of the gradients in its buckets ({DDP_BUCKET_MB} MB each; "
            "gradient_as_bucket_view=False)"
        )
    return Strategy(
        name=data_parallel_name(world),
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
