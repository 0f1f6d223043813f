"""Training step time and peak memory per positional encoding, same model and batch.

One step = forward + backward + AdamW step with the torch trainer's settings on CUDA (bf16 autocast,
fused AdamW). The model is GPT-2 small's shape (12 layers, 12 heads, 768 wide) with `learned`, `rope` or
`alibi` positions, plus llama-style blocks with `rope` and `alibi`. `learned` and `rope` take SDPA's
causal fast path (flash attention); `alibi` passes an additive bias, which SDPA runs with its
memory-efficient kernel. Each configuration runs in its own process so that its peak memory
(torch.cuda.max_memory_allocated) is its own.

    python bench/gpu_positional.py                     # CUDA, context 1024, batch 8
    python bench/gpu_positional.py --device cpu --context 128 --batch 2 --layers 2 --steps 2   # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time

import torch

CONFIGS = [("gpt2", "learned"), ("gpt2", "rope"), ("gpt2", "alibi"), ("llama", "rope"), ("llama", "alibi")]
VOCAB = 50304


def run_one(model_type: str, positional: str, args: argparse.Namespace) -> dict:
    from aic_core.plugins.registry import Registry
    from aic_core.train.common import param_groups

    device = torch.device(args.device)
    torch.manual_seed(0)
    registry = Registry(strict=False)
    plugin, pos = registry.get("model", model_type), registry.get("positional", positional)
    shape = dict(n_layer=args.layers, n_head=12, n_embd=768, block_size=args.context, vocab_size=VOCAB)
    if model_type == "llama":
        shape.update(n_kv_head=4, mlp_hidden=2048)
    options = plugin.Options(**shape)
    config = plugin.config(options, VOCAB)
    model = plugin.build(options, config, pos.build(pos.Options(), config)).to(device)
    model.train()
    cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, fused=cuda)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    x = torch.randint(0, VOCAB, (args.batch, args.context), device=device)
    y = torch.randint(0, VOCAB, (args.batch, args.context), device=device)
    times = []
    for i in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast:
            loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return {
        "model": model_type,
        "positional": positional,
        "params": model.num_params(),
        "ms": statistics.median(times) * 1000,
        "peak": torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan"),
        "loss": float(loss),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--only", help="one configuration, MODEL+POSITIONAL (e.g. gpt2+alibi)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    configs = [tuple(args.only.split("+"))] if args.only else CONFIGS
    if args.child:
        print(json.dumps(run_one(*configs[0], args)))
        return
    rows = []
    for model_type, positional in configs:
        cmd = [sys.executable, __file__, "--child", "--only", f"{model_type}+{positional}"]
        for key in ("device", "layers", "context", "batch", "steps", "warmup"):
            cmd += [f"--{key}", str(getattr(args, key))]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    precision = "bf16 autocast" if args.device == "cuda" else "fp32"
    print(
        f"{name}, {precision}; {args.layers} layers, 12 heads (llama: 4 KV heads), width 768, context {args.context}, "
        f"batch {args.batch}, vocab {VOCAB}; median of {args.steps} steps after {args.warmup} warm-up, "
        f"torch {torch.__version__}\n"
    )
    print("| model | positional | params | ms/step | tokens/s | peak memory MiB |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['model']} | {r['positional']} | {r['params']:,} | {r['ms']:.1f} | "
            f"{args.batch * args.context / r['ms'] * 1000:,.0f} | {r['peak']:,.0f} |"
        )


if __name__ == "__main__":
    main()
