"""CPU training-step throughput: aic's gpt2 against transformers' GPT2LMHeadModel of the same shape.

One step = forward + backward + AdamW step, fp32. Shape: 4 layers, 4 heads, 256 wide, context 256,
batch 8, vocab 4096 (a multiple of 64, so aic's vocab padding adds nothing and both have the same
parameters). The two models alternate step by step (who goes first alternates too); warm-up steps are
dropped and the median step time is reported.

    python bench/cpu_train.py --steps 20 --warmup 3 --threads 4
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers

from aic_core.registry import Registry

LAYERS, HEADS, WIDTH, CONTEXT, BATCH, VOCAB = 4, 4, 256, 256, 8, 4096


def aic_gpt2() -> torch.nn.Module:
    registry = Registry(strict=False)  # the installed plugins, built-ins included
    model_plugin, pos_plugin = registry.get("model", "gpt2"), registry.get("positional", "learned")
    options = model_plugin.Options(n_layer=LAYERS, n_head=HEADS, n_embd=WIDTH, block_size=CONTEXT, vocab_size=VOCAB)
    config = model_plugin.config(options, VOCAB)
    return model_plugin.build(options, config, pos_plugin.build(pos_plugin.Options(), config))


def hf_gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(
        n_layer=LAYERS, n_head=HEADS, n_embd=WIDTH, n_positions=CONTEXT, vocab_size=VOCAB,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, attn_implementation="sdpa",
    )
    model = transformers.GPT2LMHeadModel(config)
    assert model.config._attn_implementation == "sdpa"
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    x = torch.randint(0, VOCAB, (BATCH, CONTEXT + 1))
    inputs, targets = x[:, :-1], x[:, 1:]
    models = {"aic gpt2": aic_gpt2(), "HF GPT2LMHeadModel (sdpa)": hf_gpt2()}
    loss_fns = {
        "aic gpt2": lambda m: m(inputs, targets=targets),
        "HF GPT2LMHeadModel (sdpa)": lambda m: m(input_ids=inputs, labels=inputs).loss,  # HF shifts labels itself
    }
    optims = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}

    for step in range(args.warmup + args.steps):
        order = list(models) if step % 2 == 0 else list(reversed(models))
        for name in order:
            model, opt = models[name], optims[name]
            model.train()
            t0 = time.perf_counter()
            loss = loss_fns[name](model)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - t0
            if step >= args.warmup:
                times[name].append(elapsed)

    tokens = BATCH * CONTEXT
    print(f"CPU, {args.threads} threads, fp32; {LAYERS} layers, {HEADS} heads, width {WIDTH}, context {CONTEXT}, "
          f"batch {BATCH}, vocab {VOCAB}; median of {args.steps} steps after {args.warmup} warm-up\n")
    print("| model | params | ms/step | tokens/s | ratio aic/HF |")
    print("|---|---:|---:|---:|---:|")
    medians = {name: statistics.median(t) for name, t in times.items()}
    hf_tps = tokens / medians["HF GPT2LMHeadModel (sdpa)"]
    for name, model in models.items():
        params = sum(p.numel() for p in model.parameters())  # HF ties wte/lm_head: parameters() counts it once
        tps = tokens / medians[name]
        print(f"| {name} | {params:,} | {medians[name] * 1e3:.1f} | {tps:,.0f} | {tps / hf_tps:.2f} |")


if __name__ == "__main__":
    main()
