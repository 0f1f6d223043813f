"""LoRA against full fine-tuning on the CPU, same model and batch: step time and peak memory.

One step = forward + backward + AdamW step, fp32, on a llama-style model (8 layers, 12 heads / 4 KV heads,
768 wide, SwiGLU 2048, context 128, batch 4, vocab 4096: 56M parameters, a fine-tuning shape where
weights, gradients and optimizer state outweigh activations). Full fine-tuning trains every weight; LoRA
(r 8, alpha 16, all-linear) trains only the adapters. Each mode runs in its own process, so its peak
resident memory (ru_maxrss) is its own; memory is measured in a second, untimed process in which large
allocations are mmapped (MALLOC_MMAP_THRESHOLD_), so that freed memory leaves the process and the peak
tracks live tensors. "Training memory" is the peak minus the
resident memory just before the first step (model and data already in memory): gradients, optimizer
state and activations.

    python bench/cpu_lora.py --steps 5 --warmup 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

LAYERS, HEADS, KV_HEADS, WIDTH, HIDDEN, CONTEXT, BATCH, VOCAB = 8, 12, 4, 768, 2048, 128, 4, 4096


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_mode(mode: str, steps: int, warmup: int, threads: int) -> dict:
    from aic_core.plugins.registry import Registry
    from aic_core.train.common import param_groups

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    registry = Registry(strict=False)
    plugin, rope = registry.get("model", "llama"), registry.get("positional", "rope")
    options = plugin.Options(
        n_layer=LAYERS,
        n_head=HEADS,
        n_kv_head=KV_HEADS,
        n_embd=WIDTH,
        mlp_hidden=HIDDEN,
        block_size=CONTEXT,
        vocab_size=VOCAB,
    )
    config = plugin.config(options, VOCAB)
    model = plugin.build(options, config, rope.build(rope.Options(), config))
    if mode == "lora":
        lora = registry.get("adapter", "lora")
        lora.apply(model, lora.Options(r=8, alpha=16, targets=["all-linear"]))
    model.train()
    optimizer = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-4)
    x = torch.randint(0, VOCAB, (BATCH, CONTEXT))
    y = torch.randint(0, VOCAB, (BATCH, CONTEXT))
    before = rss_mib()
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return {
        "mode": mode,
        "params": model.num_params(),
        "trainable": model.num_params(trainable_only=True),
        "ms": statistics.median(times) * 1000,
        "before": before,
        "peak": peak_mib(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_mode(args.child, args.steps, args.warmup, args.threads)))
        return
    rows = []
    for mode in ("full", "lora"):

        def child(steps: int, warmup: int, env: dict, mode: str = mode) -> dict:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                mode,
                "--steps",
                str(steps),
                "--warmup",
                str(warmup),
                "--threads",
                str(args.threads),
            ]
            return json.loads(
                subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout.splitlines()[-1]
            )

        timed = child(args.steps, args.warmup, dict(os.environ))
        # Memory in a process of its own: mmapped allocations are slow, so they are not timed.
        memory = child(1, 1, {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"})
        rows.append({**timed, "before": memory["before"], "peak": memory["peak"]})
    print(
        f"CPU, {args.threads} threads, fp32; llama {LAYERS} layers, {HEADS}/{KV_HEADS} heads, width {WIDTH}, "
        f"context {CONTEXT}, batch {BATCH}, vocab {VOCAB}; median of {args.steps} steps after {args.warmup} warm-up\n"
    )
    print("| mode | trainable / total params | ms/step | tokens/s | peak RSS MiB | training memory MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['trainable']:,} / {r['params']:,} | {r['ms']:.1f} | "
            f"{BATCH * CONTEXT / r['ms'] * 1000:,.0f} | {r['peak']:,.0f} | {r['peak'] - r['before']:,.0f} |"
        )
    full, lora = rows
    print(
        f"\nLoRA / full: step time {lora['ms'] / full['ms']:.2f}x, "
        f"training memory {(lora['peak'] - lora['before']) / (full['peak'] - full['before']):.2f}x"
    )


if __name__ == "__main__":
    main()
