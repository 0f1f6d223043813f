"""Where a compiled training step's time goes: GPU time per kind of kernel, and how fast the matmuls run.

aic's model and step exactly as bench/gpu_train.py builds them (bf16 autocast, torch.compile(model),
backward, clipping at 1.0, fused AdamW, zero_grad), at its gpt2 and tinyllama shapes. After warm-up,
torch.profiler records a few steps; every GPU kernel is put in one class by its name:

  matmul     cuBLAS / CUTLASS / nvjet GEMMs (the forward and backward linear layers, the head)
  attention  SDPA's flash / cuDNN / efficient kernels, forward and backward
  fused      inductor's Triton kernels (norms, activations, residuals, the chunked loss's softmax parts)
  optimizer  the fused AdamW and the gradient-norm / clipping kernels (multi_tensor, foreach, fused_adam)
  other      copies, fills and the rest

It prints, per class: kernels per step, GPU ms per step and share of the step's wall time. "matmul at"
is the model's matmul FLOPs (6N per token, without attention) over the matmul class's GPU time, against
the matmul peak measured as gpu_train.py measures it: how close the GEMMs themselves come to the card.
"idle" is the wall time no kernel covers (launch gaps, host work).

    python bench/train_profile.py                  # both workloads on CUDA
    python bench/train_profile.py --only gpt2 --top 20
    python bench/train_profile.py --smoke          # tiny shape on the CPU: checks the script runs
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import time

import torch
from gpu_train import (  # bench/ on the path
    SHAPES,
    SMOKE,
    TRAIN,
    aic_loss,
    aic_model,
    flops_per_token,
    hf_model,
    make_step,
    matmul_peak,
    sync,
)
from torch.profiler import ProfilerActivity, profile

from aic_core.train.common import adamw

CLASSES = (
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa", "efficient")),
    ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "cublas", "sm90_", "sm80_", "ampere_", "hopper")),
    ("optimizer", ("multi_tensor", "foreach", "fused_adam", "adam", "lpnorm")),
)


def kind(name: str) -> str:
    low = name.lower()
    if low.startswith("triton_tem"):  # an inductor matmul template
        return "matmul"
    if low.startswith("triton_"):  # inductor's fused kernels, whatever ops their names list
        return "fused"
    for label, keys in CLASSES:
        if any(k in low for k in keys):
            return label
    return "other"


def profile_one(workload: str, s, args, device, peak: float) -> None:
    hf = hf_model(s)
    fpt = flops_per_token(s, hf)
    matmul_fpt = fpt - 12 * s.n_layer * s.n_head * (s.n_embd // s.n_head) * s.context  # 6N: the linear layers
    del hf
    model = aic_model(s).to(device).train()
    optimizer = adamw(model, TRAIN, device)
    forward = torch.compile(model)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, s.vocab, (s.batch, s.context + 1), generator=g)
    x, y = tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)

    step = make_step(model, optimizer, forward, aic_loss, x, y, autocast)
    for _ in range(args.warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    wall = (time.perf_counter() - t0) / args.steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        sync(device)
    gpu = torch.autograd.DeviceType.CUDA if device.type == "cuda" else torch.autograd.DeviceType.CPU
    # Kernels only: a record_function range (as "Optimizer.step#AdamW.step") also shows on the GPU's timeline,
    # over kernels counted on their own, and would count them twice.
    events = [e for e in prof.events() if e.device_type == gpu and not getattr(e, "is_user_annotation", False)]
    if device.type == "cpu":  # no kernels on the CPU: top-level ops stand in, so the script's path is checked
        events = [e for e in events if e.cpu_parent is None]
    per_class: dict[str, list[float]] = collections.defaultdict(list)
    per_name: dict[str, list[float]] = collections.defaultdict(list)
    for e in events:
        us = e.time_range.elapsed_us()
        per_class[kind(e.name)].append(us)
        per_name[e.name].append(us)
    n = args.steps
    busy_ms = sum(sum(v) for v in per_class.values()) / n / 1e3
    tokens_step = s.batch * s.context
    print(
        f"### {workload}: {tokens_step / wall:,.0f} tok/s, {wall * 1e3:.1f} ms/step wall, "
        f"MFU {100 * tokens_step / wall * fpt / peak:.1f} %, {len(events) / n:.0f} kernels/step, "
        f"GPU busy {busy_ms:.1f} ms/step\n"
    )
    print("| class | kernels/step | GPU ms/step | share of wall |")
    print("|---|---:|---:|---:|")
    for label in ("matmul", "attention", "fused", "optimizer", "other"):
        times = per_class.get(label, [])
        print(
            f"| {label} | {len(times) / n:.0f} | {sum(times) / n / 1e3:.2f} | "
            f"{100 * sum(times) / n / 1e3 / (wall * 1e3):.1f} % |"
        )
    idle = wall * 1e3 - busy_ms
    print(f"| idle (no kernel running) | | {idle:.2f} | {100 * idle / (wall * 1e3):.1f} % |")
    matmul_ms = sum(per_class.get("matmul", [])) / n / 1e3
    if matmul_ms > 0:
        rate = tokens_step * matmul_fpt / (matmul_ms / 1e3)
        print(
            f"\nmatmul at {rate / 1e12:.0f} TFLOP/s = {100 * rate / peak:.1f} % of the measured peak "
            f"({tokens_step * matmul_fpt / 1e12:.2f} TFLOP of linear layers per step)"
        )
    print("\n| top kernels | class | per step | GPU ms/step |")
    print("|---|---|---:|---:|")
    for name, times in sorted(per_name.items(), key=lambda kv: -sum(kv[1]))[: args.top]:
        print(f"| {name[:90]} | {kind(name)} | {len(times) / n:.0f} | {sum(times) / n / 1e3:.3f} |")
    print()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", nargs="+", choices=["gpt2", "gpt2-nobias", "tinyllama"], default=["gpt2", "tinyllama"]
    )
    parser.add_argument("--steps", type=int, default=5, help="profiled steps (and timed steps before them)")
    parser.add_argument("--warmup", type=int, default=3, help="steps before timing (the first compiles)")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--smoke", action="store_true", help="tiny shape on the CPU in fp32, 1 step")
    args = parser.parse_args()
    if args.smoke:
        device, shapes, dtype = torch.device("cpu"), SMOKE, torch.float32
        args.steps, args.warmup = 1, 1
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run with --smoke on the CPU")
        device, shapes, dtype = torch.device("cuda"), SHAPES, torch.bfloat16
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    peak = matmul_peak(device, dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"{name}; torch {torch.__version__}; matmul peak measured {peak / 1e12:.1f} TFLOP/s; "
        f"{args.steps} profiled steps after {args.warmup} warm-up\n"
    )
    for workload in args.only:
        profile_one(workload, shapes[workload], args, device, peak)


if __name__ == "__main__":
    main()
