"""Activation checkpointing (`train.activation_checkpointing`): per-block recompute gives the same loss and
gradients as storing activations, dropout included; it really stores less; evaluation and generation never
recompute; the torch trainer switches it on from the spec."""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import aic_core.model.nn.transformer as transformer_module
from aic_core.cli import main
from aic_core.model.nn.transformer import Transformer, TransformerConfig
from aic_plugins.positional.alibi import ALiBi
from aic_plugins.positional.learned import LearnedPositions
from aic_plugins.positional.rope import RotaryPositions
from tests.conftest import tiny_spec, write_spec

VOCAB = 200

ARCHS = {
    "gpt2-learned": ({"mlp": "gelu", "norm": "layernorm", "bias": True}, "learned"),
    "llama-rope": (
        {"mlp": "swiglu", "norm": "rmsnorm", "bias": False, "n_kv_head": 2, "tie_embeddings": False},
        "rope",
    ),
    "gpt2-alibi": ({"mlp": "gelu", "norm": "layernorm", "bias": True}, "alibi"),
}


def make_model(
    arch: str, dropout: float = 0.0, n_layer: int = 2, n_embd: int = 32, block_size: int = 32
) -> Transformer:
    fields, positional = ARCHS[arch]
    c = TransformerConfig(
        vocab_size=VOCAB, block_size=block_size, n_layer=n_layer, n_head=4, n_embd=n_embd, dropout=dropout, **fields
    )
    pos = {
        "learned": lambda: LearnedPositions(c.block_size, c.n_embd),
        "rope": lambda: RotaryPositions(c.head_dim, c.head_dim, 10000.0, 1.0),
        "alibi": lambda: ALiBi(c.n_head, 8.0),
    }[positional]()
    torch.manual_seed(0)
    model = Transformer(c, pos)
    with torch.no_grad():  # non-trivial biases and norms, so every parameter gets a gradient that matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.train()


def batch(B: int = 3, T: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, VOCAB, (B, T + 1), generator=g)
    return data[:, :-1], data[:, 1:]


def loss_and_grads(
    model: Transformer, checkpointing: bool, seed: int = 123
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.activation_checkpointing = checkpointing
    model.zero_grad(set_to_none=True)
    x, y = batch()
    torch.manual_seed(seed)  # the same dropout masks in both runs
    loss = model(x, y)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


class CountCheckpoint:
    """Wraps aic_core.nn.transformer.checkpoint, counting the blocks it runs."""

    def __init__(self, monkeypatch) -> None:
        self.calls = 0
        self._real = transformer_module.checkpoint
        monkeypatch.setattr(transformer_module, "checkpoint", self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self._real(*args, **kwargs)


def test_off_by_default():
    assert make_model("gpt2-learned").activation_checkpointing is False


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_loss_and_gradients_equal_without_checkpointing(arch, dropout, monkeypatch):
    model = make_model(arch, dropout)
    loss_ref, grads_ref = loss_and_grads(model, checkpointing=False)
    counter = CountCheckpoint(monkeypatch)
    loss_ckpt, grads_ckpt = loss_and_grads(model, checkpointing=True)
    assert counter.calls == model.config.n_layer  # every block went through checkpoint
    torch.testing.assert_close(loss_ckpt, loss_ref, rtol=0, atol=1e-6)
    assert grads_ckpt.keys() == grads_ref.keys()
    assert len(grads_ref) == len(list(model.parameters()))  # every parameter got a gradient
    for name, grad in grads_ref.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=0, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    if dropout:  # dropout is really on: another seed gives another loss
        loss_other, _ = loss_and_grads(model, checkpointing=True, seed=124)
        assert not torch.equal(loss_other, loss_ref)


def saved_activation_bytes(model: Transformer, checkpointing: bool, forward=None) -> int:
    """Bytes autograd keeps for the backward pass (distinct storages, parameters excluded). Inside a
    checkpointed block, checkpoint's own hooks take over and keep nothing. `forward`: e.g. the compiled model."""
    model.activation_checkpointing = checkpointing
    forward = model if forward is None else forward
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    x, y = batch(B=4, T=64)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward(x, y)
    loss.backward()
    return sum(storages.values())


@pytest.mark.parametrize("arch", list(ARCHS))
def test_checkpointing_stores_much_less(arch):
    model = make_model(arch, dropout=0.1, n_layer=4, n_embd=64, block_size=64)
    without = saved_activation_bytes(model, checkpointing=False)
    with_ = saved_activation_bytes(model, checkpointing=True)
    print(f"{arch}: saved for backward {without} bytes without checkpointing, {with_} with")
    assert with_ < without / 2, (with_, without)


def test_alibi_bias_built_once_per_forward(monkeypatch):
    """The ALiBi bias is built once outside the blocks and handed to each; recompute does not rebuild it."""
    model = make_model("gpt2-alibi", n_layer=3)
    model.activation_checkpointing = True
    calls = []
    real = model.positional.attn_bias
    monkeypatch.setattr(model.positional, "attn_bias", lambda *a: calls.append(1) or real(*a))
    x, y = batch()
    model(x, y).backward()
    assert len(calls) == 1


def test_no_checkpointing_in_eval_no_grad_or_with_cache(monkeypatch):
    counter = CountCheckpoint(monkeypatch)
    model = make_model("llama-rope", dropout=0.1)
    model.activation_checkpointing = True
    x, y = batch()
    model.eval()
    model(x, y)  # eval mode, gradients on
    with torch.no_grad():
        model(x, y)
    model.train()
    with torch.no_grad():
        model(x, y)  # training mode, no gradients (e.g. evaluation inside a training loop)
    # Generation with a KV cache, even in training mode with gradients enabled.
    cache = model.new_cache(x.shape[0], 40)
    model(x[:, :8], cache=cache)
    model(x[:, 8:9], cache=cache)
    assert counter.calls == 0
    model(x, y)
    assert counter.calls == model.config.n_layer


def test_torch_compile_keeps_checkpointing_and_gradients():
    """Under torch.compile (dynamo + AOTAutograd, the layers that handle checkpoint; the aot_eager backend
    skips only the slow C++ code generation), checkpointing still stores much less and, dropout included,
    gives the eager gradients."""
    model = make_model("llama-rope", dropout=0.1)
    loss_ref, grads_ref = loss_and_grads(model, checkpointing=False)
    compiled = torch.compile(model, backend="aot_eager")
    model.activation_checkpointing = True
    model.zero_grad(set_to_none=True)
    x, y = batch()
    torch.manual_seed(123)
    loss = compiled(x, y)
    loss.backward()
    torch.testing.assert_close(loss.detach(), loss_ref, rtol=0, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads_ref[name], rtol=0, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")

    model = make_model("llama-rope", dropout=0.1, n_layer=4, n_embd=64, block_size=64)
    without = saved_activation_bytes(model, False, torch.compile(model, backend="aot_eager"))
    torch._dynamo.reset()
    with_ = saved_activation_bytes(model, True, torch.compile(model, backend="aot_eager"))
    assert with_ < without / 2, (with_, without)


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    calls = []
    real = transformer_module.checkpoint
    transformer_module.checkpoint = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        results = {}
        for flag in (False, True):
            model = make_model("gpt2-learned", dropout=0.1)
            model.activation_checkpointing = flag
            ddp = DistributedDataParallel(model)
            x, y = batch(B=4)
            torch.manual_seed(100 + rank)  # each rank its own dropout masks, the same with and without
            loss = ddp(x[rank::world], y[rank::world])
            loss.backward()
            results[flag] = {"loss": loss.detach(), **{n: p.grad for n, p in model.named_parameters()}}
        results["calls"] = len(calls)
        torch.save(results, f"{out}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # gloo sometimes aborts at interpreter exit after all work is done (../shared/deepspeed.md)


def test_ddp_gradients_equal_with_checkpointing(tmp_path):
    """Under DDP (2 gloo processes), the all-reduced gradients with checkpointing equal those without."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = str(tmp_path / "grads")
    mp.spawn(_ddp_worker, args=(2, port, out), nprocs=2, join=True)
    for rank in range(2):
        results = torch.load(f"{out}.{rank}")
        assert results["calls"] == 2  # the two blocks of the run with checkpointing
        assert results[False].keys() == results[True].keys()
        for name, ref in results[False].items():
            torch.testing.assert_close(
                results[True][name],
                ref,
                rtol=0,
                atol=1e-6,
                msg=lambda m, name=name, rank=rank: f"rank {rank} {name}: {m}",
            )


def run_losses(run_dir: Path) -> list[float]:
    return [
        rec["loss"] for rec in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in rec
    ]


@pytest.mark.slow
def test_aic_run_loss_curve_equal_with_checkpointing(tmp_path, corpus, monkeypatch):
    """The torch trainer switches it on from the spec (its blocks do go through checkpoint); with dropout 0.1
    the loss curve is unchanged."""
    curves = []
    for flag in (False, True):
        counter = CountCheckpoint(monkeypatch)
        run = tmp_path / f"run-{flag}"
        spec = tiny_spec(corpus, run, train={"steps": 6, "activation_checkpointing": flag})
        assert spec["model"]["dropout"] == 0.1
        path = write_spec(tmp_path / f"spec-{flag}.json", spec)
        assert main(["run", str(path), "--stage", "tokenizer,train"]) == 0
        # 2 blocks per training forward when on; evaluation (at the end of training) never checkpoints.
        assert counter.calls == (6 * 2 if flag else 0)
        resolved = json.loads((run / "spec.resolved.json").read_text())
        assert resolved["train"]["activation_checkpointing"] is flag
        curves.append(run_losses(run))
    assert len(curves[0]) == 6
    torch.testing.assert_close(torch.tensor(curves[1]), torch.tensor(curves[0]), rtol=0, atol=1e-6)
