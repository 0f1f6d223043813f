"""Where a decode step's time goes: kernels per step, GPU time per kernel, and replayed ms per step.

aic's one-token decode step (aic_core.generate._CachedSteps: Transformer.decode and the greedy sampler)
on GPT-2 small's shape (12 layers, 12 heads, 768 wide, vocab 50,257), random weights, bf16, a prompt of
128 tokens and a cache of 384 slots, run as `aic generate` runs it (decode_step graph or compile).

Per mode and batch size it prints:
  replay ms/step  wall time of 200 steps queued back to back, one sync at the end (what decoding pays)
  kernels/step    GPU kernels a step launches (torch.profiler over 20 steps)
  GPU us/step     the sum of their durations (the rest of replay ms/step is gaps between kernels)
and the kernels that take the most time.

    python bench/decode_profile.py                          # graph and compile, batch 1
    python bench/decode_profile.py --modes graph --batches 1 16 --top 25
"""

from __future__ import annotations

import argparse
import collections
import time

import torch
from gpu_train import SHAPES, aic_model  # bench/ is on the path when this script runs
from torch.profiler import ProfilerActivity, profile

from aic_core.generate import decode as generation
from aic_core.spec import SamplerSpec

GREEDY = SamplerSpec(temperature=0)


def fresh_steps(model, batch: int, mode: str, prompt: int, new: int):
    ids = [[(17 * b + 3 * i) % (model.config.vocab_size - 10) + 5 for i in range(prompt)] for b in range(batch)]
    generation._CAPTURED.pop(model, None)  # a new capture for each mode
    steps = generation._CachedSteps.for_call(model, ids, new, GREEDY, (mode,))
    steps.batch.fill(ids, model.positional.max_positions)
    return steps


@torch.inference_mode()  # as aic_core.generate runs the steps: no autograd state to trace or record
def measure(model, batch: int, mode: str, top: int) -> dict:
    prompt, new = 128, 256
    generator = torch.Generator("cuda").manual_seed(0)
    steps = fresh_steps(model, batch, mode, prompt, new)
    t0 = time.perf_counter()
    steps.first(model, generator)
    steps.run(model, 1)  # builds: capture (and compile)
    torch.cuda.synchronize()
    build_s = time.perf_counter() - t0

    best = float("inf")
    for _ in range(3):
        steps.first(model, generator)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        steps.run(model, 200)
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / 200)

    steps.first(model, generator)
    torch.cuda.synchronize()
    n = 20
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        steps.run(model, n)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    per_name: dict[str, list[float]] = collections.defaultdict(list)
    for e in kernels:
        per_name[e.name].append(e.time_range.elapsed_us())
    busy = sum(sum(v) for v in per_name.values()) / n
    print(
        f"\n{mode}, batch {batch}: replay {best * 1e3:.3f} ms/step ({batch / best:,.0f} tok/s), "
        f"{len(kernels) / n:.0f} kernels/step, GPU {busy:.1f} us/step, build {build_s:.1f} s"
    )
    print("| kernel | per step | us/step | us each |")
    print("|---|---:|---:|---:|")
    rows = sorted(per_name.items(), key=lambda kv: -sum(kv[1]))
    for name, times in rows[:top]:
        print(f"| {name[:90]} | {len(times) / n:.0f} | {sum(times) / n:.1f} | {sum(times) / len(times):.2f} |")
    return {"mode": mode, "batch": batch, "ms_step": best * 1e3, "kernels": len(kernels) / n, "gpu_us": busy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=["graph", "compile"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1])
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = aic_model(SHAPES["gpt2"]).to("cuda", torch.bfloat16).eval()
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}")
    results = [measure(model, b, m, args.top) for b in args.batches for m in args.modes]
    print("\n| mode | batch | ms/step | tok/s | kernels/step | GPU us/step |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['mode']} | {r['batch']} | {r['ms_step']:.3f} | {r['batch'] / r['ms_step'] * 1e3:,.0f} | "
            f"{r['kernels']:.0f} | {r['gpu_us']:.1f} |"
        )


if __name__ == "__main__":
    main()
