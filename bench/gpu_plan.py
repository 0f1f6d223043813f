"""`aic plan` against measured GPU memory: one training step per configuration, peak memory per component.

A step is what the torch trainer does on CUDA (plugins/trainers/torch.py): bf16 autocast, fused AdamW over
param_groups, the loss, backward, gradient clipping at 1.0, optimizer step, zero_grad(set_to_none=True),
with `model.activation_checkpointing` on or off. Three steps run; the first allocates the optimizer state.
Measured with torch.cuda.memory_allocated / max_memory_allocated (what the caching allocator hands out):

- weights: allocated after building the model on the GPU; optimizer state: the bytes of optimizer.state;
- weight copies, activations, log-probs: the storages autograd saves in one forward (a saved-tensor hook;
  without checkpointing only), split into bf16 copies of parameters, the (N, V) float32 log-probabilities
  and the rest;
- gradients: allocated after backward minus before forward;
- peak: max_memory_allocated over the whole run, and which phase reached it.

Each configuration runs in its own process, so its peak is its own.

    python bench/gpu_plan.py                    # gpt2-small 16x1024 and tinyllama-1.1b 4x2048, checkpointing off/on
    python bench/gpu_plan.py --kernels          # + small models that exercise each attention kernel and dropout
    python bench/gpu_plan.py --device cpu --quick   # smoke test on the CPU (tiny shapes; no peaks)
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys

import torch

GiB = 2**30
MAIN = [
    ("gpt2-small", {"type": "gpt2", "preset": "gpt2-small", "vocab_size": 50257}, 16, 1024),
    ("tinyllama-1.1b", {"type": "llama", "preset": "tinyllama-1.1b", "vocab_size": 32000}, 4, 2048),
]
# Small models that take each SDPA path on CUDA: flash (learned, rope, GQA), memory-efficient (ALiBi bias),
# math (ALiBi + grouped-query heads), and dropout everywhere.
SMALL = {"n_layer": 2, "n_head": 12, "n_embd": 768, "block_size": 512, "vocab_size": 50257}
KERNELS = [
    ("gpt2 learned", {"type": "gpt2", **SMALL}, 8, 512),
    ("gpt2 rope", {"type": "gpt2", **SMALL, "positional": {"type": "rope"}}, 8, 512),
    ("gpt2 alibi", {"type": "gpt2", **SMALL, "positional": {"type": "alibi"}}, 8, 512),
    ("gpt2 learned dropout", {"type": "gpt2", **SMALL, "dropout": 0.1}, 8, 512),
    ("gpt2 alibi dropout", {"type": "gpt2", **SMALL, "dropout": 0.1, "positional": {"type": "alibi"}}, 8, 512),
    ("llama rope", {"type": "llama", **SMALL, "n_kv_head": 4, "mlp_hidden": 2048}, 8, 512),
    (
        "llama alibi",
        {"type": "llama", **SMALL, "n_kv_head": 4, "mlp_hidden": 2048, "positional": {"type": "alibi"}},
        8,
        512,
    ),
    ("llama rope dropout", {"type": "llama", **SMALL, "n_kv_head": 4, "mlp_hidden": 2048, "dropout": 0.1}, 8, 512),
    ("gpt2 lora", {"type": "gpt2", **SMALL}, 8, 512, {"type": "lora", "r": 8, "targets": ["all-linear"]}),
]


def make_spec(model: dict, batch: int, seq_len: int, ckpt: bool, adapter: dict | None, device: str):
    from aic_core.plugins.registry import get_registry
    from aic_core.spec import parse_spec

    raw = {
        "name": "gpu-plan",
        "data": {"train": ["unused.txt"]},
        "tokenizer": {"type": "sentencepiece", "vocab_size": 4096},
        "model": model,
        "train": {
            "trainer": {"type": "torch", "device": device},
            "steps": 3,
            "batch_size": batch,
            "seq_len": seq_len,
            "activation_checkpointing": ckpt,
        },
    }
    if adapter:
        raw["adapter"] = adapter
    return parse_spec(raw, get_registry(), check=False)


def run_one(name: str, model: dict, batch: int, seq_len: int, ckpt: bool, adapter: dict | None, device: str) -> dict:
    from aic_core.model.loading import build_model
    from aic_core.plan.memory import plan
    from aic_core.plugins.registry import get_registry
    from aic_core.train.common import param_groups

    registry = get_registry()
    spec = make_spec(model, batch, seq_len, ckpt, adapter, device)
    p = plan(spec, registry, device=device)
    s = p.strategy()
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    allocated = (lambda: torch.cuda.memory_allocated()) if cuda else (lambda: 0)
    torch.manual_seed(0)
    with dev:
        net = build_model(spec, registry, model["vocab_size"])
    net.activation_checkpointing = ckpt
    net.train()
    m_weights = allocated()
    optimizer = torch.optim.AdamW(param_groups(net, 0.1), lr=1e-4, betas=(0.9, 0.95), fused=cuda)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    V = net.config.vocab_size
    x = torch.randint(0, V, (batch, seq_len), device=dev)
    y = torch.randint(0, V, (batch, seq_len), device=dev)
    out: dict = {"name": name, "ckpt": ckpt, "batch": batch, "seq_len": seq_len, "kernel_planned": p.attention}

    # Saved tensors of one forward (no backward): exact activation bytes, split by kind.
    if not ckpt:
        params = {q.untyped_storage().data_ptr(): q for q in net.parameters()}
        by_shape: dict[tuple, list[torch.Tensor]] = {}
        for q in net.parameters():
            by_shape.setdefault(tuple(q.shape), []).append(q)
        storages: dict[int, tuple[int, str]] = {}

        def is_copy(t: torch.Tensor) -> bool:  # autocast's bf16 copy of a parameter (or its transpose), by value
            for cand in (t, t.t() if t.dim() == 2 else t):
                for q in by_shape.get(tuple(cand.shape), []):
                    if torch.equal(cand, q.detach().to(torch.bfloat16)):
                        return True
            return False

        def pack(t: torch.Tensor) -> torch.Tensor:
            st = t.untyped_storage()
            key = st.data_ptr()
            if key in params or key in storages:
                return t
            if t.dtype == torch.bfloat16 and is_copy(t):
                kind = "weight_copies"
            elif t.dtype == torch.float32 and tuple(t.shape) == (batch * seq_len, V):
                kind = "logprobs"
            else:
                kind = "activations"
            storages[key] = (st.nbytes(), kind)
            # Keep the storage alive (so no address is reused) without the autograd graph: a saved output
            # returned as itself would make a node <-> tensor reference cycle that outlives `del loss`.
            return t.detach()

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
            loss = net(x, y)
        kernels, seen, stack = set(), set(), [loss.grad_fn]
        while stack:
            fn = stack.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            if "Attention" in type(fn).__name__ or "Softmax" in type(fn).__name__:
                kernels.add(type(fn).__name__)
            stack += [n for n, _ in fn.next_functions]
        out["kernel_measured"] = ",".join(sorted(k for k in kernels if k != "LogSoftmaxBackward0"))
        for kind in ("weight_copies", "logprobs", "activations"):
            out[f"saved_{kind}"] = sum(n for n, k in storages.values() if k == kind)
        del loss, storages, seen, stack, fn, by_shape, params  # free that forward's graph before measuring
        gc.collect()
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    phases = {}
    for step in range(3):
        before = allocated()
        with autocast:
            loss = net(x, y)
        after_forward = allocated()
        loss.backward()
        after_backward = allocated()
        peak_fb = torch.cuda.max_memory_allocated() if cuda else 0
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        peak = torch.cuda.max_memory_allocated() if cuda else 0
        phases[step] = {
            "before": before,
            "forward": after_forward,
            "backward": after_backward,
            "peak_fb": peak_fb,
            "peak": peak,
        }
        if step == 0:
            opt_state = sum(
                v.numel() * v.element_size()
                for st in optimizer.state.values()
                for v in st.values()
                if torch.is_tensor(v)
            )
            out["other_persistent"] = allocated() - m_weights - opt_state
    steady = phases[2]
    out.update(
        weights=m_weights,
        optimizer=opt_state,
        gradients=steady["backward"] - steady["before"],
        forward_delta=steady["forward"] - steady["before"],
        peak=max(ph["peak"] for ph in phases.values()),
        loss=float(loss),
        plan={
            k: getattr(s, k)
            for k in (
                "weights",
                "gradients",
                "optimizer",
                "weight_copies",
                "activations",
                "logits",
                "buffers",
                "workspace",
                "total",
                "peak_at",
            )
        },
        plan_logprobs=4 * batch * seq_len * V,
        # What the forward leaves allocated: saved activations, log-probs and the bf16 weight copies the backward
        # pass needs (with checkpointing only the head's).
        plan_forward=s.activations
        + 4 * batch * seq_len * V
        + (2 * net.config.padded_vocab_size * net.config.n_embd if ckpt else s.weight_copies),
        phases=phases,
    )
    return out


def pct(plan: float, measured: float) -> str:
    return f"{100 * (plan - measured) / measured:+.1f}%" if measured else "n/a"


def table(results: list[dict]) -> str:
    def mib(n: float) -> str:
        return f"{n / 2**20:,.0f}"

    lines = [
        "| model, batch | act. ckpt | component | plan MiB | measured MiB | plan - measured |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    for r in results:
        p = r["plan"]
        where = f"{r['name']}, {r['batch']}x{r['seq_len']}"
        ck = "on" if r["ckpt"] else "off"
        rows = [
            ("weights", p["weights"], r["weights"]),
            ("optimizer state", p["optimizer"], r["optimizer"]),
            ("gradients", p["gradients"], r["gradients"]),
        ]
        if "saved_activations" in r:
            rows += [
                ("autocast weight copies (saved)", p["weight_copies"], r["saved_weight_copies"]),
                ("activations (saved)", p["activations"], r["saved_activations"]),
                ("log-probs (saved)", r["plan_logprobs"], r["saved_logprobs"]),
            ]
        rows += [("allocated by the forward (all it saves)", r["plan_forward"], r["forward_delta"])]
        rows += [
            ("CUDA workspaces (other persistent)", p["workspace"], r["other_persistent"]),
            (f"**peak** (plan: {p['peak_at']})", p["total"], r["peak"]),
        ]
        for comp, planned, measured in rows:
            lines.append(f"| {where} | {ck} | {comp} | {mib(planned)} | {mib(measured)} | {pct(planned, measured)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--kernels", action="store_true", help="also the small models that exercise each attention kernel"
    )
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        name, model, batch, seq_len, ckpt, adapter = json.loads(args.one)
        print(json.dumps(run_one(name, model, batch, seq_len, ckpt, adapter, args.device)))
        return
    configs = [(n, m, b, t, ck, None) for n, m, b, t in MAIN for ck in (False, True)]
    if args.kernels:
        configs += [(c[0], c[1], c[2], c[3], False, c[4] if len(c) > 4 else None) for c in KERNELS]
    if args.quick:
        tiny = {"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 64, "vocab_size": 300}
        shrunk = []
        for n, m, _b, _t, ck, ad in configs:
            m = {k: v for k, v in m.items() if k not in ("preset", "n_kv_head", "mlp_hidden")} | tiny
            if m["type"] == "llama":
                m |= {"n_kv_head": 2, "mlp_hidden": 176}
            shrunk.append((n, m, 2, 64, ck, ad))
        configs = shrunk
    results = []
    for config in configs:
        proc = subprocess.run(
            [sys.executable, __file__, "--device", args.device, "--one", json.dumps(config)],
            check=False,
            capture_output=True,
            text=True,
        )
        if proc.returncode:
            print(f"{config[0]} ckpt={config[4]}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(r)
        print(
            f"{r['name']} {r['batch']}x{r['seq_len']} ckpt={r['ckpt']}: kernel planned {r['kernel_planned']}, "
            f"measured {r.get('kernel_measured', '-')}; peak plan {r['plan']['total'] / GiB:.2f} GiB, "
            f"measured {r['peak'] / GiB:.2f} GiB ({pct(r['plan']['total'], r['peak'])}); loss "
            f"{r['loss']:.3f}; step 3 MiB: " + ", ".join(f"{k} {v / 2**20:,.0f}" for k, v in r["phases"]["2"].items()),
            flush=True,
        )
    print()
    print(table(results))
    print()
    print("raw:", json.dumps(results))


if __name__ == "__main__":
    main()
