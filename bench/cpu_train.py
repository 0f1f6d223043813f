"""CPU training-step throughput: aic's gpt2 against nanoGPT's model.py and transformers' GPT2LMHeadModel.

One step = forward + backward + gradient clipping at 1.0 + AdamW step, fp32, each model stepped as its own
users step it: aic as its torch trainer does (aic_core.train.common.adamw: AdamW over param_groups, fused),
nanoGPT as its train.py does (its configure_optimizers: AdamW, not fused on the CPU), transformers as its
Trainer does (torch AdamW, max_grad_norm 1.0). Shape: 4 layers, 4 heads, 256 wide, context 256, batch 8,
vocab 4096 (a multiple of 64, so aic's vocab padding adds nothing), biases and tied embeddings in all three
(nanoGPT's default config is GPT-2's), dropout 0.

Protocol, for a machine that is shared: after warm-up steps, `--rounds` rounds (default 4); in each round
every model is timed twice over `--steps` steps and keeps the better mean (best of two), and the order of
the models alternates between rounds (forward, then reversed). Printed: each model's best round and the
ratios, as of the best rounds and their range over the rounds (each round's ratio, min-max).

    python bench/cpu_train.py                  # the issue's shape, 2 threads
    python bench/cpu_train.py --compile        # plus aic under torch.compile (the trainer's `compile` option)
    python bench/cpu_train.py --floor          # plus the floor: the step's GEMMs and attention timed alone
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import transformers

from aic_core.plugins.registry import Registry
from aic_core.spec import TrainSpec
from aic_core.train.common import adamw

sys.path.insert(0, str(Path(__file__).parent))
from nanogpt_model import GPT, GPTConfig

LAYERS, HEADS, WIDTH, CONTEXT, BATCH, VOCAB = 4, 4, 256, 256, 8, 4096
TRAIN = TrainSpec(
    trainer={"type": "torch"}, steps=1, lr=1e-4
)  # the spec's AdamW defaults: betas (0.9, 0.95), weight decay 0.1


def aic_gpt2() -> torch.nn.Module:
    registry = Registry(strict=False)  # the installed plugins, built-ins included
    model_plugin, pos_plugin = registry.get("model", "gpt2"), registry.get("positional", "learned")
    options = model_plugin.Options(n_layer=LAYERS, n_head=HEADS, n_embd=WIDTH, block_size=CONTEXT, vocab_size=VOCAB)
    config = model_plugin.config(options, VOCAB)
    return model_plugin.build(options, config, pos_plugin.build(pos_plugin.Options(), config))


def hf_gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(
        n_layer=LAYERS,
        n_head=HEADS,
        n_embd=WIDTH,
        n_positions=CONTEXT,
        vocab_size=VOCAB,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="sdpa",
    )
    model = transformers.GPT2LMHeadModel(config)
    assert model.config._attn_implementation == "sdpa"
    return model


def nanogpt() -> torch.nn.Module:
    return GPT(
        GPTConfig(
            block_size=CONTEXT, vocab_size=VOCAB, n_layer=LAYERS, n_head=HEADS, n_embd=WIDTH, dropout=0.0, bias=True
        )
    )


def floor(threads: int) -> None:
    """Print the time one step's matmuls and attention take when each runs alone, at the step's shapes: per
    linear layer the forward (x @ W.T), the input gradient (g @ W) and the weight gradient (g.T @ x), the
    unchunked LM head's three, and SDPA's causal forward + backward per layer. No step can be faster than this
    sum unless it moves other work into the matmuls' kernels."""
    torch.set_num_threads(threads)

    def best(fn, n: int = 10) -> float:
        for _ in range(3):
            fn()
        return min(_timed(fn, n) for _ in range(5))

    def _timed(fn, n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n

    def gemm(m: int, k: int, n: int, ta: bool = False, tb: bool = False) -> tuple[float, int]:
        a = torch.randn(k, m).t() if ta else torch.randn(m, k)
        b = torch.randn(n, k).t() if tb else torch.randn(k, n)
        out = torch.empty(m, n)
        return best(lambda: torch.mm(a, b, out=out)), 2 * m * k * n

    rows, seconds, flops = BATCH * CONTEXT, 0.0, 0
    for fan_in, fan_out, count in (
        (WIDTH, 3 * WIDTH, LAYERS),
        (WIDTH, WIDTH, LAYERS),
        (WIDTH, 4 * WIDTH, LAYERS),
        (4 * WIDTH, WIDTH, LAYERS),
        (WIDTH, VOCAB, 1),
    ):
        for t, f in (
            gemm(rows, fan_in, fan_out, tb=True),
            gemm(rows, fan_out, fan_in),
            gemm(fan_out, rows, fan_in, ta=True),
        ):
            seconds, flops = seconds + count * t, flops + count * f
    q, k, v = (torch.randn(BATCH, HEADS, CONTEXT, WIDTH // HEADS, requires_grad=True) for _ in range(3))

    def attention() -> None:
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        y.backward(torch.ones_like(y))

    attn = LAYERS * best(attention)
    big = gemm(2048, 2048, 2048)
    print(
        f"\nFloor: the step's GEMMs alone {seconds * 1e3:.1f} ms ({flops / 1e9:.1f} GFLOP at "
        f"{flops / seconds / 1e9:.0f} GFLOP/s; a 2048^3 GEMM runs at {big[1] / big[0] / 1e9:.0f}), "
        f"attention forward + backward alone {attn * 1e3:.1f} ms: {(seconds + attn) * 1e3:.1f} ms together."
    )


class Runner:
    """One model with its optimizer and its way of computing the loss; `step()` is one timed training step."""

    def __init__(self, name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss) -> None:
        self.name, self.model, self.optimizer, self.loss = name, model.train(), optimizer, loss
        self.rounds: list[float] = []

    def step(self) -> float:
        t0 = time.perf_counter()
        self.loss().backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    def measure(self, steps: int) -> None:
        self.rounds.append(min(sum(self.step() for _ in range(steps)) / steps for _ in range(2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="measurements per model, in alternating order")
    parser.add_argument(
        "--steps", type=int, default=5, help="steps per timing (each measurement is the best of two timings)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--compile", action="store_true", help="also aic under torch.compile, its compile time reported"
    )
    parser.add_argument("--floor", action="store_true", help="also time the step's matmuls and attention alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cpu = torch.device("cpu")

    x = torch.randint(0, VOCAB, (BATCH, CONTEXT + 1))
    inputs, targets = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    aic, nano, hf = aic_gpt2(), nanogpt(), hf_gpt2()
    runners = [
        Runner("aic gpt2", aic, adamw(aic, TRAIN, cpu), lambda: aic(inputs, targets)),
        Runner(
            "nanoGPT model.py",
            nano,
            nano.configure_optimizers(TRAIN.weight_decay, TRAIN.lr, (TRAIN.beta1, TRAIN.beta2), "cpu"),
            lambda: nano(inputs, targets)[1],
        ),
        Runner(
            "HF GPT2LMHeadModel (sdpa)",
            hf,
            torch.optim.AdamW(hf.parameters(), lr=TRAIN.lr),
            lambda: hf(input_ids=inputs, labels=inputs).loss,
        ),
    ]
    compile_s = None
    if args.compile:
        compiled_model = aic_gpt2()
        compiled = torch.compile(compiled_model)
        runner = Runner(
            "aic gpt2, torch.compile",
            compiled_model,
            adamw(compiled_model, TRAIN, cpu),
            lambda: compiled(inputs, targets),
        )
        first = runner.step()
        compile_s = first - min(runner.step() for _ in range(3))
        runners.append(runner)

    for runner in runners:
        for _ in range(args.warmup):
            runner.step()
    for r in range(args.rounds):
        for runner in runners if r % 2 == 0 else reversed(runners):
            runner.measure(args.steps)

    tokens = BATCH * CONTEXT
    nano_r, hf_r = runners[1], runners[2]
    print(
        f"CPU ({args.threads} threads), fp32, torch {torch.__version__}, transformers {transformers.__version__}; "
        f"{LAYERS} layers, {HEADS} heads, width {WIDTH}, context {CONTEXT}, batch {BATCH}, vocab {VOCAB}; "
        f"{args.rounds} rounds, each the best of two timings of {args.steps} steps, alternating order, "
        f"after {args.warmup} warm-up steps\n"
    )
    print(
        "| model | params | ms/step (best round) | tokens/s | vs nanoGPT | vs HF | vs nanoGPT, "
        "each round | vs HF, each round |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")

    def spread(a: Runner, b: Runner) -> str:
        ratios = [tb / ta for ta, tb in zip(a.rounds, b.rounds)]
        return f"{min(ratios):.2f}-{max(ratios):.2f}"

    for runner in runners:
        best = min(runner.rounds)
        params = sum(p.numel() for p in runner.model.parameters())  # tied weights count once
        print(
            f"| {runner.name} | {params:,} | {best * 1e3:.1f} | {tokens / best:,.0f} | {min(nano_r.rounds) / best:.2f} "
            f"| {min(hf_r.rounds) / best:.2f} | {spread(runner, nano_r)} | {spread(runner, hf_r)} |"
        )
    if compile_s is not None:
        print(f"\naic under torch.compile: first step {compile_s:.1f} s longer than a compiled step (the compile).")
    if args.floor:
        floor(args.threads)


if __name__ == "__main__":
    main()
