"""GPU training-step throughput: aic's gpt2 and llama against transformers at identical shapes, eager and compiled.

aic's models are built as `aic run` builds them (aic_core.plugins.registry.Registry: model plugin + positional
plugin) and stepped as its torch trainer steps them: bf16 autocast, loss.backward(), gradient clipping at
1.0, AdamW over aic_core.train.common.param_groups (aic_core.train.common.adamw: fused), zero_grad(set_to_none).
transformers' GPT2LMHeadModel and LlamaForCausalLM (SDPA attention) get the same step with the same
fused AdamW. Random weights, synthetic tokens, dropout 0. "compiled" is torch.compile(model), as the
trainer's `compile` option does; its compile time is the first step's time less a compiled step's.

Workloads:
  gpt2         GPT-2 124M (12 layers, 12 heads, 768 wide, vocab 50257, biases, tied), 16 x 1024 tokens
  gpt2-nobias  the same without biases in aic (transformers' GPT-2 always has them: its row is gpt2's)
  tinyllama    TinyLlama-1.1B's shape (22 layers, 32 heads / 4 KV heads, 2048 wide, SwiGLU 5632, vocab 32000,
               untied), 8 x 2048 tokens

MFU = tokens/s x (6N + 12 L H Q T) / peak, N the parameters the matmuls use (all but the input and position
embeddings; a tied head counts once), L layers, H heads, Q head size, T context; the peak is the bf16
matmul rate this script measures on the card (a large square matmul), not the data sheet's.

    python bench/gpu_train.py                              # all workloads on CUDA
    python bench/gpu_train.py --only gpt2 --ablate-loss    # plus aic with the plain full-logits loss
    python bench/gpu_train.py --compiled-only              # the targets' mode only: about half the time
    python bench/gpu_train.py --smoke                      # tiny shapes on the CPU (fp32): checks the script runs
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers

import aic_core.model.nn.transformer as aic_transformer
from aic_core.plugins.registry import Registry
from aic_core.spec import TrainSpec
from aic_core.train.common import adamw

NANOGPT_COMPILED = 477_394  # nanoGPT compiled, GPT-2 124M without biases, 16 x 1024 on the lent H100 (issue 14)
TRAIN = TrainSpec(trainer={"type": "torch"}, steps=1, lr=1e-4)  # AdamW: betas (0.9, 0.95), weight decay 0.1


@dataclass(frozen=True)
class Shape:
    family: str  # "gpt2" or "llama"
    n_layer: int
    n_head: int
    n_embd: int
    vocab: int
    batch: int
    context: int
    bias: bool = True
    n_kv_head: int | None = None
    mlp_hidden: int | None = None


SHAPES = {
    "gpt2": Shape("gpt2", 12, 12, 768, 50257, 16, 1024),
    "gpt2-nobias": Shape("gpt2", 12, 12, 768, 50257, 16, 1024, bias=False),
    "tinyllama": Shape("llama", 22, 32, 2048, 32000, 8, 2048, bias=False, n_kv_head=4, mlp_hidden=5632),
}
SMOKE = {
    "gpt2": Shape("gpt2", 2, 4, 64, 500, 2, 64),
    "gpt2-nobias": Shape("gpt2", 2, 4, 64, 500, 2, 64, bias=False),
    "tinyllama": Shape("llama", 2, 4, 64, 512, 2, 64, bias=False, n_kv_head=2, mlp_hidden=176),
}


def aic_model(s: Shape) -> torch.nn.Module:
    registry = Registry(strict=False)
    plugin = registry.get("model", s.family)
    positional = registry.get("positional", "learned" if s.family == "gpt2" else "rope")
    fields = dict(n_layer=s.n_layer, n_head=s.n_head, n_embd=s.n_embd, block_size=s.context, vocab_size=s.vocab)
    if s.family == "gpt2":
        fields["bias"] = s.bias
    else:
        fields.update(n_kv_head=s.n_kv_head, mlp_hidden=s.mlp_hidden)
    options = plugin.Options(**fields)
    config = plugin.config(options, s.vocab)
    return plugin.build(options, config, positional.build(positional.Options(), config))


def hf_model(s: Shape) -> torch.nn.Module:
    if s.family == "gpt2":
        config = transformers.GPT2Config(
            n_layer=s.n_layer,
            n_head=s.n_head,
            n_embd=s.n_embd,
            n_positions=s.context,
            vocab_size=s.vocab,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
            attn_implementation="sdpa",
        )
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(
        hidden_size=s.n_embd,
        intermediate_size=s.mlp_hidden,
        num_hidden_layers=s.n_layer,
        num_attention_heads=s.n_head,
        num_key_value_heads=s.n_kv_head,
        max_position_embeddings=s.context,
        vocab_size=s.vocab,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="sdpa",
    )
    return transformers.LlamaForCausalLM(config)


def flops_per_token(s: Shape, hf: torch.nn.Module) -> float:
    """6N + 12 L H Q T, N from transformers' model (the real vocabulary, no padding rows)."""
    n = sum(p.numel() for p in hf.parameters())  # a tied head counts once
    embeddings = hf.get_input_embeddings().weight.numel()
    if s.family == "gpt2":
        n -= hf.transformer.wpe.weight.numel()
        if not hf.config.tie_word_embeddings:
            n -= embeddings
    else:
        n -= embeddings  # untied: the head is its own matrix
    return 6 * n + 12 * s.n_layer * s.n_head * (s.n_embd // s.n_head) * s.context


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul, the best of several."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(3):
        a @ b
    for _ in range(10):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(5):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - t0) / 5)
    return 2 * n**3 / best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_loss(x, weight, targets, vocab_size):  # noqa: ANN001, ANN201
    """The loss before aic_core.model.nn.loss: full logits, padding sliced off, fp32 cross-entropy (--ablate-loss)."""
    logits = F.linear(x, weight)[..., :vocab_size]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)


def make_step(model, optimizer, forward, loss_fn, x, y, autocast):
    """One training step as the torch trainer takes it; the step returns the loss (detached)."""

    def step() -> torch.Tensor:
        with autocast:
            loss = loss_fn(forward, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def run(name: str, model: torch.nn.Module, loss_fn, s: Shape, compiled: bool, args, device) -> dict:  # noqa: ANN001
    """Time one configuration; returns its row."""
    model = model.to(device).train()
    optimizer = adamw(model, TRAIN, device)
    forward = torch.compile(model) if compiled else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, s.vocab, (s.batch, s.context + 1), generator=g)
    x, y = tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)

    step = make_step(model, optimizer, forward, loss_fn, x, y, autocast)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    step()
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(args.warmup):
        step()
    sync(device)
    best = float("inf")
    for _ in range(args.repeats):  # the best of several timings of `steps` steps
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss = step()
        sync(device)
        best = min(best, (time.perf_counter() - t0) / args.steps)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    row = {
        "name": name,
        "compiled": compiled,
        "ms": best * 1e3,
        "tok_s": s.batch * s.context / best,
        "peak_gib": peak,
        "compile_s": first - best if compiled else None,
        "loss": float(loss),
    }
    del model, optimizer, forward
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def aic_loss(forward, x, y):  # noqa: ANN001, ANN201
    return forward(x, y)


def hf_loss(forward, x, y):  # noqa: ANN001, ANN201
    return forward(input_ids=x, labels=x).loss  # transformers shifts the labels itself


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(SHAPES), help="workloads to run (default: all)")
    parser.add_argument("--steps", type=int, default=10, help="steps per timing")
    parser.add_argument("--repeats", type=int, default=3, help="timings per configuration (the best is kept)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after the first")
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--compiled-only", action="store_true", help="compiled only (the targets' mode; half the runs)")
    parser.add_argument("--ablate-loss", action="store_true", help="also aic with the plain full-logits cross-entropy")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU in fp32, 1 step per timing")
    args = parser.parse_args()
    if args.no_compile and args.compiled_only:
        parser.error("--no-compile and --compiled-only leave nothing to run: pass one of them")
    if args.smoke:
        device, shapes, dtype = torch.device("cpu"), SMOKE, torch.float32
        args.steps, args.repeats, args.warmup = 1, 1, 1
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run with --smoke on the CPU")
        device, shapes, dtype = torch.device("cuda"), SHAPES, torch.bfloat16
        torch.backends.cuda.matmul.allow_tf32 = True  # as the torch trainer sets them
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    peak = matmul_peak(device, dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"{name}, {'bf16 autocast' if device.type == 'cuda' else 'fp32'}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}; {str(dtype).removeprefix('torch.')} matmul peak measured: "
        f"{peak / 1e12:.1f} TFLOP/s; best of {args.repeats} timings of {args.steps} steps after "
        f"{args.warmup} warm-up steps\n"
    )
    modes = [False] if args.no_compile else [True] if args.compiled_only else [False, True]
    summary = []
    for workload in args.only or list(shapes):
        s = shapes[workload]
        hf = hf_model(s)
        fpt = flops_per_token(s, hf)
        del hf
        rows = []
        for compiled in modes:
            rows.append(run("aic", aic_model(s), aic_loss, s, compiled, args, device))
            if args.ablate_loss:
                chunked = aic_transformer.lm_head_loss
                aic_transformer.lm_head_loss = plain_loss
                try:
                    rows.append(run("aic, plain cross-entropy", aic_model(s), aic_loss, s, compiled, args, device))
                finally:
                    aic_transformer.lm_head_loss = chunked
            if workload != "gpt2-nobias":  # transformers' GPT-2 has biases: gpt2's rows are its peer
                rows.append(
                    run(
                        "HF " + ("GPT2LMHeadModel" if s.family == "gpt2" else "LlamaForCausalLM"),
                        hf_model(s),
                        hf_loss,
                        s,
                        compiled,
                        args,
                        device,
                    )
                )
        print(
            f"### {workload}: {s.n_layer} layers, {s.n_head} heads{f' ({s.n_kv_head} KV)' if s.n_kv_head else ''}, "
            f"width {s.n_embd}, vocab {s.vocab}, {'biases' if s.bias else 'no biases'}, "
            f"batch {s.batch} x context {s.context}; {fpt / 1e9:.3f} GFLOP/token\n"
        )
        print("| model | mode | tokens/s | ms/step | MFU | peak memory GiB | compile s | loss |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            compile_s = f"{r['compile_s']:.1f}" if r["compile_s"] is not None else ""
            print(
                f"| {r['name']} | {'compiled' if r['compiled'] else 'eager'} | {r['tok_s']:,.0f} | {r['ms']:.1f} | "
                f"{100 * r['tok_s'] * fpt / peak:.1f} % | {r['peak_gib']:.2f} | {compile_s} | {r['loss']:.3f} |"
            )
        print()
        for compiled in modes:
            aic = next(r for r in rows if r["name"] == "aic" and r["compiled"] == compiled)
            mode = "compiled" if compiled else "eager"
            hf_rows = [r for r in rows if r["name"].startswith("HF") and r["compiled"] == compiled]
            if hf_rows:
                summary.append(f"{workload}, {mode}: aic / HF = {aic['tok_s'] / hf_rows[0]['tok_s']:.2f}")
            if workload.startswith("gpt2") and compiled and not args.smoke:
                summary.append(
                    f"{workload}, compiled: aic / nanoGPT's compiled figure ({NANOGPT_COMPILED:,} tok/s) "
                    f"= {aic['tok_s'] / NANOGPT_COMPILED:.2f}"
                )
    print("Ratios (tokens/s):")
    for line in summary:
        print(f"- {line}")


if __name__ == "__main__":
    main()
