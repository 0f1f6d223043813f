"""The `torch` trainer against the `deepspeed` trainer (ZeRO stages 1, 2, 3) on one GPU: tokens/s, peak memory and
`aic plan`'s prediction of that peak.

Each configuration runs in its own process through the trainers' own `train` (the code `aic run` calls), on
synthetic tokens (random ids, uniform over the vocabulary) with random initial weights: train.steps steps, the
tokens/s that the trainer logs every `log_every` steps (the median after the first interval, which holds the
warm-up), and torch.cuda.max_memory_allocated over the run (what the caching allocator handed out). Checkpoint
writes are skipped (they do not touch the step, and tinyllama's would write 17 GB per configuration). Under
DeepSpeed the process is a world of 1 (the trainer starts a group of one, as a plain `aic run` does).

    python bench/gpu_deepspeed.py                         # gpt2-small 16x1024 and tinyllama-1.1b 4x2048
    python bench/gpu_deepspeed.py --models gpt2-small --variants   # + DeepSpeed knobs for ZeRO-1/2
    python bench/gpu_deepspeed.py --world-size 2          # + DDP and ZeRO-1/2/3 on 2 GPUs (torchrun), against 1 GPU
    python bench/gpu_deepspeed.py --device cpu --quick     # smoke test on the CPU (tiny shapes, fp32)
    # host cost per step:
    python bench/gpu_deepspeed.py --device cpu --models narrow --steps 200 --log-every 20 --stages 0 1 2 3
    python bench/gpu_deepspeed.py --models gpt2-small --host-reads    # where each trainer makes the host wait for GPUs
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np
import torch

GiB = 2**30
MODELS = {
    "gpt2-small": ({"type": "gpt2", "preset": "gpt2-small", "vocab_size": 50257}, 16, 1024),
    "tinyllama-1.1b": ({"type": "llama", "preset": "tinyllama-1.1b", "vocab_size": 32000}, 4, 2048),
    "tiny": ({"type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64, "vocab_size": 512}, 4, 64),
    # GPT-2 small's 12 layers (its 148 parameter tensors) at a width where the arithmetic is nothing: the step time is
    # the trainer's own host work (Python, hooks, per-tensor ops). On the CPU it shows the fixed cost a trainer adds.
    "narrow": ({"type": "gpt2", "n_layer": 12, "n_head": 2, "n_embd": 64, "block_size": 64, "vocab_size": 512}, 2, 64),
}
# DeepSpeed settings tried beside the defaults (train.trainer.config), for the ZeRO-1/2 overhead at one GPU.
VARIANTS = {
    "overlap": {"zero_optimization": {"overlap_comm": True}},
    "big-buckets": {
        "zero_optimization": {
            "reduce_bucket_size": 500_000_000,
            "allgather_bucket_size": 500_000_000,
            "overlap_comm": True,
        }
    },
}


def make_spec(model: dict, batch: int, seq_len: int, trainer: dict, steps: int, log_every: int, world: int = 1):
    from aic_core.plugins.registry import get_registry
    from aic_core.spec import parse_spec

    raw = {
        "name": "gpu-deepspeed",
        "seed": 0,
        "data": {"train": ["unused.txt"]},
        "tokenizer": {"type": "sentencepiece", "vocab_size": model["vocab_size"]},
        "model": {**model, "dropout": 0.0},
        # grad_accum = world: each process runs one micro-batch of `batch` a step, as the one-GPU run does.
        "train": {
            "trainer": trainer,
            "steps": steps,
            "batch_size": batch,
            "seq_len": seq_len,
            "grad_accum": world,
            "lr": 3e-4,
            "warmup_steps": 2,
            "log_every": log_every,
            "checkpoint_every": 0,
        },
        "eval": {"batches": 1, "every": 0},
    }
    return parse_spec(raw, get_registry(), check=False)


HOST_READS = ("item", "__bool__", "tolist", "__float__", "__int__")  # each waits for the GPU on CUDA


def count_host_reads(trainer_module: str, warmup: int) -> tuple[collections.Counter, list[int]]:
    """Count, by caller, the reads of a tensor's value by the host (on CUDA each one waits until the GPU has caught
    up, so the host cannot queue the next kernels meanwhile) in the training steps after `warmup`; the steps are
    counted through the trainer's train_batch calls (one per micro-batch)."""
    counts: collections.Counter = collections.Counter()
    calls = [0]
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def read(self, *args, _original=original, _name=name, **kwargs):
            if calls[0] > warmup:
                frames = traceback.extract_stack(limit=16)[:-1]
                caller = next(
                    (f for f in reversed(frames) if "/torch/" not in f.filename or "/torch/optim/" in f.filename),
                    frames[-1],
                )
                where = caller.filename.split("site-packages/")[-1].replace(
                    str(Path(__file__).resolve().parents[1]) + "/", ""
                )
                counts[f"{_name} in {caller.name} ({where}:{caller.lineno})"] += 1
            return _original(self, *args, **kwargs)

        setattr(torch.Tensor, name, read)
    module = importlib.import_module(trainer_module)
    train_batch = module.train_batch

    def counted(*args, **kwargs):
        calls[0] += 1
        return train_batch(*args, **kwargs)

    module.train_batch = counted
    return counts, calls


def run_one(cfg: dict) -> dict:
    from aic_core.data.tokens import TokenData
    from aic_core.model.loading import build_model
    from aic_core.plan.memory import plan
    from aic_core.plugins.kinds import TrainJob
    from aic_core.plugins.registry import get_registry
    from aic_core.train.distributed import launcher_world, setup, teardown

    model, batch, seq_len = MODELS[cfg["model"]]
    device = cfg["device"]
    trainer_section = {"type": cfg["trainer"], "device": device}
    if cfg["trainer"] == "deepspeed":
        trainer_section.update(stage=cfg["stage"], config=VARIANTS.get(cfg.get("variant"), {}))
    if device == "cpu":
        trainer_section["precision"] = "fp32"
    world = launcher_world()  # (rank, world size, local rank, local world): one process unless under torchrun
    spec = make_spec(model, batch, seq_len, trainer_section, cfg["steps"], cfg["log_every"], world[1])
    registry = get_registry()
    predicted = plan(spec, registry, world_size=world[1], device=device).strategy()
    trainer = registry.get("trainer", cfg["trainer"])
    options = spec.train.trainer
    dist = setup(trainer.device(options, world[2]), world)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(dist.device if dist.device.type == "cuda" and dist.device.index is not None else 0)
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    net = trainer.build_model(options, spec, dist, lambda: build_model(spec, registry, model["vocab_size"]))
    host_reads = count_host_reads(f"aic_plugins.trainers.{cfg['trainer']}", 3) if cfg.get("host_reads") else None
    rng = np.random.default_rng(0)
    tokens = TokenData(
        rng.integers(
            0, model["vocab_size"], size=4_000_000, dtype=np.uint32 if model["vocab_size"] > 65535 else np.uint16
        ),
        4_000_000 * 4,
    )
    with tempfile.TemporaryDirectory(prefix="aic-bench-") as tmp:
        run_dir = Path(tmp)
        (run_dir / "tokenizer.model").write_bytes(b"unused")
        job = TrainJob(spec, {}, net, tokens, tokens, run_dir, run_dir / "tokenizer.model", "0" * 64, dist=dist)
        job.save_checkpoint = lambda *args, **kwargs: None  # no disk writes: see the module docstring
        if cfg["trainer"] == "deepspeed":
            import deepspeed

            deepspeed.DeepSpeedEngine.save_checkpoint = lambda self, *args, **kwargs: True
        if cfg.get("profile"):  # where the host's time goes (the GPU waits on it when the step is launch-bound)
            import cProfile
            import pstats

            profiler = cProfile.Profile()
            profiler.enable()
            trainer.train(options, job)
            profiler.disable()
            if dist.is_main:
                pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        else:
            trainer.train(options, job)
        log = run_dir / "metrics.jsonl"  # rank 0 writes it
        records = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]  # the first interval holds the warm-up
    peaks = dist.gather(torch.cuda.max_memory_allocated() if cuda else 0)  # every process's own peak
    teardown()
    if not dist.is_main:
        return None
    name = ("ddp" if world[1] > 1 else "torch") if cfg["trainer"] == "torch" else f"zero-{cfg['stage']}"
    name += f" {cfg['variant']}" if cfg.get("variant") else ""
    return {
        "model": cfg["model"],
        "name": name,
        "world": world[1],
        "tokens_per_s": statistics.median(rates) if rates else None,
        "peak": max(peaks),
        "planned": predicted.total,
        "planned_strategy": predicted.name,
        "losses": [r["loss"] for r in records if "loss" in r],
        "host_reads": None
        if host_reads is None
        else {"steps": host_reads[1][0] - 3, "by_caller": dict(host_reads[0].most_common())},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gpt2-small", "tinyllama-1.1b"], choices=sorted(MODELS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--stages", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--variants", action="store_true", help="also ZeRO-1/2 with the DeepSpeed settings in VARIANTS")
    parser.add_argument("--quick", action="store_true", help="tiny model, 6 steps (a smoke test)")
    parser.add_argument(
        "--world-size", type=int, default=1, help="processes (GPUs) per configuration, launched by torchrun"
    )
    parser.add_argument(
        "--profile", action="store_true", help="print cProfile's top functions (host time) for each configuration"
    )
    parser.add_argument(
        "--host-reads",
        action="store_true",
        help="count the host's reads of tensor values (GPU syncs) per step, by caller",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a configuration, as JSON: run it in this process
    args = parser.parse_args()
    if args.one:
        result = run_one(json.loads(args.one))
        if result is not None:
            print("RESULT " + json.dumps(result), flush=True)
        sys.stdout.flush()
        os._exit(0)  # past gloo's exit-time abort (../shared/deepspeed.md): the result is out
    if args.quick:
        args.models, args.steps, args.log_every = ["tiny"], 6, 2
    configs = []
    for model in args.models:
        if args.world_size > 1:
            configs.append({"model": model, "trainer": "torch", "world": 1})  # the one-GPU baseline
        configs.append({"model": model, "trainer": "torch", "world": args.world_size})
        for stage in args.stages:
            configs.append({"model": model, "trainer": "deepspeed", "stage": stage, "world": args.world_size})
            if args.variants and stage in (1, 2):
                configs += [
                    {"model": model, "trainer": "deepspeed", "stage": stage, "variant": v, "world": args.world_size}
                    for v in VARIANTS
                ]
    rows = []
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    for cfg in configs:
        cfg.update(
            device=args.device,
            steps=args.steps,
            log_every=args.log_every,
            profile=args.profile,
            host_reads=args.host_reads,
        )
        launch = [sys.executable]
        if cfg["world"] > 1:
            launch += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(cfg["world"])]
        proc = subprocess.run(
            [*launch, __file__, "--one", json.dumps(cfg)], capture_output=True, text=True, env=env, check=False
        )
        if args.profile:
            print(
                f"## {cfg}\n" + "\n".join(x for x in proc.stdout.splitlines() if not x.startswith("RESULT ")),
                flush=True,
            )
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"{cfg}: failed (exit {proc.returncode})\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(line[len("RESULT ") :]))
        print(f"# {rows[-1]}", file=sys.stderr, flush=True)

    device = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") and torch.cuda.is_available() else args.device
    )
    print(
        f"\ndevice: {device}; torch {torch.__version__}; {args.steps} steps, "
        "tokens/s = median of the logged intervals after the first"
    )
    print(
        "per GPU: tokens/s divided by the processes; scaling: that over the one-process torch trainer's; peak: "
        "the largest of the processes'\n"
    )
    print("| model | trainer | processes | tokens/s | per GPU | scaling | peak GiB | plan GiB | plan / peak |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    base = {r["model"]: r["tokens_per_s"] for r in rows if r["name"] == "torch" and r["world"] == 1}
    for r in rows:
        rate = r["tokens_per_s"]
        per = rate / r["world"] if rate else None
        scaling = f"{per / base[r['model']]:.3f}" if per and base.get(r["model"]) else "-"
        peak = f"{r['peak'] / GiB:.2f}" if r["peak"] else "-"
        fit = f"{r['planned'] / r['peak']:.3f}" if r["peak"] else "-"
        print(
            f"| {r['model']} | {r['name']} | {r['world']} | {f'{rate:,.0f}' if rate else '-'} | "
            f"{f'{per:,.0f}' if per else '-'} | {scaling} | {peak} | {r['planned'] / GiB:.2f} | {fit} |"
        )
    if args.host_reads:
        print(
            f"\nhost reads of tensor values per step (each a GPU sync on CUDA), steps 4-{args.steps}, "
            "log and evaluation steps included (counting them slows every read: "
            "take tokens/s from a run without --host-reads):"
        )
        for r in rows:
            reads = r["host_reads"]
            per_step = sum(reads["by_caller"].values()) / max(reads["steps"], 1)
            print(f"  {r['model']} {r['name']}: {per_step:.1f} a step")
            for caller, n in reads["by_caller"].items():
                print(f"      {n / max(reads['steps'], 1):5.2f}  {caller}")
    print("\nlosses (first steps; same seed, same data):")
    for r in rows:
        print(f"  {r['model']:15s} {r['name']:18s} x{r['world']} {' '.join(f'{x:.4f}' for x in r['losses'][:4])}")


if __name__ == "__main__":
    main()
