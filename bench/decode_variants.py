"""Which changes to the decode step would pay on this card: variants of aic's one-token step, timed as it runs.

aic's decode step (aic_core.generate._CachedSteps, as `aic generate` runs it) on GPT-2 small's shape, random
weights, bf16, a prompt of 128 tokens, with one thing changed at a time:
  attention   sdpa (as shipped: torch picks the kernel), efficient / cudnn (one SDPA backend forced),
              math (q @ k^T, float32 softmax, @ v as three matmul-sized ops), baddbmm (the same with the scale
              and the mask folded into one baddbmm)
  gelu        as shipped (addmm, then tanh GELU), or addmm_gelu: torch._addmm_activation, which on CUDA may run
              the GELU as a cuBLASLt epilogue of the fc matmul (on the CPU it is the exact GELU, not the tanh one)
  inductor    for the compile step: coordinate_descent_tuning, decompose_mem_bound_mm
Each row: replayed ms per step (200 steps queued, one sync), tokens/s, and how many of the 256 greedy tokens
equal those of the shipped step (bf16 rounding may move a few).

    python bench/decode_variants.py                    # graph and compile steps, on CUDA
    python bench/decode_variants.py --modes graph
    python bench/decode_variants.py --smoke            # tiny shape on the CPU, eager step: checks the script runs
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from collections.abc import Iterator

import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F
from decode_profile import fresh_steps  # bench/ is on the path when this script runs
from gpu_train import SHAPES, SMOKE, aic_model

from aic_core.model.nn import attention, mlp

PROMPT, NEW = 128, 256


def _attend(kind: str):
    """F.scaled_dot_product_attention for the decode step's call (q, k, v, attn_mask=...) done as `kind`;
    the prefill's calls (with is_causal, dropout_p, ...) go to SDPA as they are."""

    def sdpa(q, k, v, attn_mask=None, **kwargs):
        if kwargs or kind == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **kwargs)
        if kind in ("efficient", "cudnn"):
            from torch.nn.attention import SDPBackend, sdpa_kernel

            backend = SDPBackend.EFFICIENT_ATTENTION if kind == "efficient" else SDPBackend.CUDNN_ATTENTION
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        scale = 1.0 / math.sqrt(q.shape[-1])
        if kind == "math":
            scores = torch.matmul(q, k.transpose(-1, -2)) * scale + attn_mask
            return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)
        if kind == "baddbmm":
            B, H, G, D = q.shape
            S = k.shape[-2]
            bias = attn_mask.expand(B, H, G, S).reshape(B * H, G, S)
            scores = torch.baddbmm(bias, q.reshape(B * H, G, D), k.reshape(B * H, S, D).transpose(1, 2), alpha=scale)
            return torch.bmm(
                torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v.reshape(B * H, S, D)
            ).view(B, H, G, D)
        raise ValueError(f"unknown attention variant {kind!r}")

    return sdpa


class _Functional:
    """torch.nn.functional with scaled_dot_product_attention replaced, for aic_core.model.nn.attention's `F`."""

    def __init__(self, kind: str) -> None:
        self.scaled_dot_product_attention = _attend(kind)

    def __getattr__(self, name: str):
        return getattr(F, name)


def _mlp_addmm_gelu(self, x):
    if self.fc.bias is None:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))
    h = torch._addmm_activation(self.fc.bias, x.reshape(-1, x.shape[-1]), self.fc.weight.t(), use_gelu=True)
    return self.proj(h.view(*x.shape[:-1], -1))


@contextlib.contextmanager
def variant(attn: str, gelu: str, flags: dict) -> Iterator[None]:
    saved_f, saved_mlp = attention.F, mlp.MLP.forward
    saved_flags = {k: getattr(inductor_config, k) for k in flags}
    attention.F = _Functional(attn)
    if gelu == "addmm_gelu":
        mlp.MLP.forward = _mlp_addmm_gelu
    for k, v in flags.items():
        setattr(inductor_config, k, v)
    try:
        yield
    finally:
        attention.F, mlp.MLP.forward = saved_f, saved_mlp
        for k, v in saved_flags.items():
            setattr(inductor_config, k, v)
        torch._dynamo.reset()


def measure(model, batch: int, mode: str, new: int, repeats: int) -> tuple[float, torch.Tensor]:
    """Best ms per step over `repeats` runs of `new` - 1 steps; and the greedy tokens of the last run."""
    device = model.wte.weight.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    steps = fresh_steps(model, batch, mode, PROMPT, new)  # a new capture for each variant
    generator = torch.Generator(device).manual_seed(0)
    best = float("inf")
    for i in range(repeats + 1):  # the first run builds (capture, compile) and is not timed
        steps.first(model, generator)
        sync()
        t0 = time.perf_counter()
        steps.run(model, new - 1)
        sync()
        if i:
            best = min(best, (time.perf_counter() - t0) / (new - 1))
    L = steps.batch.prompt_len
    return best * 1e3, steps.batch.tokens[:, L : L + new].cpu()


PLAN = [  # attention, gelu, inductor flags, modes, batches
    ("sdpa", "tanh", {}, ("graph", "compile"), (1, 16)),
    ("efficient", "tanh", {}, ("graph",), (1, 16)),
    ("cudnn", "tanh", {}, ("graph",), (1, 16)),
    ("math", "tanh", {}, ("graph", "compile"), (1, 16)),
    ("baddbmm", "tanh", {}, ("graph",), (1, 16)),
    ("sdpa", "addmm_gelu", {}, ("graph", "compile"), (1, 16)),
    ("sdpa", "tanh", {"coordinate_descent_tuning": True}, ("compile",), (1,)),
    ("sdpa", "tanh", {"decompose_mem_bound_mm": True}, ("compile",), (1,)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=["graph", "compile"], choices=["graph", "compile"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny shape on the CPU, eager step, one repeat")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.smoke:
        model, new, modes = aic_model(SMOKE["gpt2"]).eval(), 8, ["eager"]
        plan = [
            (a, g, {}, ("eager",), (1, 2))
            for a, g, flags, _, _ in PLAN
            if a not in ("efficient", "cudnn") and not flags
        ]
        args.repeats = 1
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run with --smoke on the CPU")
        model, new, modes = aic_model(SHAPES["gpt2"]).to("cuda", torch.bfloat16).eval(), NEW, args.modes
        plan = PLAN
        print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}")
    shipped: dict[tuple[str, int], torch.Tensor] = {}
    print("\n| attention | gelu | inductor | step | batch | ms/step | tok/s | tokens as shipped |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for attn, gelu, flags, variant_modes, batches in plan:
        for mode in (m for m in variant_modes if m in modes):
            for batch in batches:
                try:
                    with variant(attn, gelu, flags), torch.no_grad():
                        ms, tokens = measure(model, batch, mode, new, args.repeats)
                except Exception as exc:  # a backend this card or shape does not have: say so, go on
                    if args.smoke:  # the smoke run checks the script itself: no failure is expected there
                        raise
                    print(
                        f"| {attn} | {gelu} | {flags or ''} | {mode} | {batch} | failed: {type(exc).__name__}: "
                        f"{str(exc)[:80]} | | |",
                        flush=True,
                    )
                    continue
                base = shipped.setdefault((mode, batch), tokens)
                same = int((tokens == base).sum())
                print(
                    f"| {attn} | {gelu} | {flags or ''} | {mode} | {batch} | {ms:.3f} | {batch / ms * 1e3:,.0f} | "
                    f"{same} of {base.numel()} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
