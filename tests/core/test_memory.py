"""aic plan (aic_core/memory.py): parameter counts, the analytic model-state bytes, activations measured on the
CPU, FLOPs, the KV cache, refusing what does not fit, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from aic_core.cli import main
from aic_core.errors import SpecError
from aic_core.model.loading import build_model
from aic_core.plan import memory
from aic_core.plugins.registry import get_registry
from aic_core.spec import parse_spec

VOCAB = 300
TINY_GPT2 = {"type": "gpt2", "n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 32}
TINY_LLAMA = {"type": "llama", "preset": "llama-mini", "block_size": 64}


def make_spec(model: dict, adapter: dict | None = None, vocab: int = VOCAB, **train) -> object:
    raw = {
        "name": "plan-test",
        "data": {"train": ["unused.txt"]},
        "tokenizer": {"type": "sentencepiece", "vocab_size": vocab},
        "model": model,
        "train": {"steps": 1, "batch_size": 3, **train},
        "generate": {"prompts": ["Anne", "Captain Wentworth"], "max_new_tokens": 10},
    }
    if adapter:
        raw["adapter"] = adapter
    return parse_spec(raw, get_registry(), check=False)


# --- parameters -----------------------------------------------------------------------------------

# Published parameter counts (Hugging Face GPT2LMHeadModel with vocab 50257, tied; TinyLlama-1.1B with vocab 32000).
PUBLISHED = {
    "gpt2-small": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
    "tinyllama-1.1b": 1_100_048_384,
}


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_large_presets_count_the_published_parameters(preset):
    model = {
        "type": "llama" if preset.startswith("tiny") else "gpt2",
        "preset": preset,
        "vocab_size": 32000 if preset.startswith("tiny") else 50257,
    }
    p = memory.plan(make_spec(model), get_registry(), device="cpu")
    assert p.parameters == p.trainable == PUBLISHED[preset]


@pytest.mark.parametrize(
    "model, adapter",
    [
        ({"type": "gpt2", "preset": "gpt2-small", "vocab_size": 50257}, None),
        ({"type": "llama", "preset": "llama-mini"}, None),
        (TINY_GPT2, {"type": "lora", "r": 4}),
        ({"type": "llama", "preset": "llama-mini"}, {"type": "lora", "r": 8, "targets": ["all-linear"]}),
        ({**TINY_GPT2, "positional": {"type": "rope"}, "tie_embeddings": False}, None),
    ],
)
def test_parameter_counts_equal_the_built_model(model, adapter):
    spec = make_spec(model, adapter)
    p = memory.plan(spec, get_registry(), device="cpu")
    torch.manual_seed(0)
    built = build_model(spec, get_registry(), VOCAB)
    assert (p.parameters, p.trainable) == (built.num_params(), built.num_params(trainable_only=True))
    if adapter:
        assert p.trainable < p.parameters


def test_the_plan_builds_on_the_meta_device():
    model = memory.build_meta_model(
        make_spec({"type": "gpt2", "preset": "gpt2-xl", "vocab_size": 50257}), get_registry()
    )
    assert all(t.device.type == "meta" for t in model.parameters())


# --- model states -------------------------------------------------------------------------------


def test_weights_gradients_and_optimizer_bytes_follow_the_formulas():
    spec = make_spec(TINY_GPT2, {"type": "lora", "r": 4})
    built = build_model(spec, get_registry(), VOCAB)
    P = sum(t.numel() for t in built.parameters())  # allocated elements: padded vocabulary rows included
    trainable = [t for t in built.parameters() if t.requires_grad]
    Pt = sum(t.numel() for t in trainable)
    buffers = sum(b.numel() * b.element_size() for b in built.buffers())

    p = memory.plan(spec, get_registry(), world_size=1, device="cpu")
    torch_ = p.strategy("torch")
    assert (torch_.weights, torch_.gradients, torch_.optimizer) == (
        4 * P + buffers,
        4 * Pt,
        8 * Pt + 4 * len(trainable),
    )
    assert torch_.weight_copies == 0 and torch_.buffers == 0  # fp32 on the CPU: no autocast copies; one process: no DDP

    p4 = memory.plan(spec, get_registry(), world_size=4, device="cuda", device_memory=80)
    ddp = p4.strategy("ddp")
    assert ddp.buffers == 4 * Pt  # DDP's gradient buckets: one more fp32 copy of the gradients
    z1, z2, z3 = (p4.strategy(f"zero-{k}") for k in (1, 2, 3))
    # The ZeRO paper's mixed-precision Adam: 2 + 2 + 12 bytes per parameter, sharded by stage.
    assert (z1.weights, z1.gradients, z1.optimizer) == (2 * P + buffers, 2 * Pt, 12 * Pt // 4)
    assert (z2.weights, z2.gradients, z2.optimizer) == (2 * P + buffers, 2 * Pt // 4, 12 * Pt // 4)
    assert (z3.weights, z3.gradients, z3.optimizer) == (2 * P // 4 + buffers, 2 * Pt // 4, 12 * Pt // 4)
    # bf16 autocast copies the backward pass keeps: every matmul weight (the tied head: wte) and LoRA's A and B,
    # except where the input needs no gradient: block 0's qkv (frozen embeddings and norm before it) keeps only B.
    linears = sum(m.weight.numel() for m in built.modules() if isinstance(m, torch.nn.Linear))
    lora = sum(getattr(m, n).numel() for m in built.modules() for n in ("lora_A", "lora_B") if hasattr(m, n))
    qkv0 = built.blocks[0].attn.qkv
    assert ddp.weight_copies == 2 * (
        linears + built.wte.weight.numel() + lora - qkv0.weight.numel() - qkv0.lora_A.numel()
    )


# --- activations, measured on the CPU -----------------------------------------------------------------


def saved_tensor_bytes(model: torch.nn.Module, batch: int, seq_len: int, documents: bool = False) -> int:
    """The bytes of every storage autograd saves for the backward pass in one training forward (parameters and
    their views excluded), counted once each: exact, on any device."""
    params = {t.untyped_storage().data_ptr() for t in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            storages[st.data_ptr()] = st.nbytes()
        return t.detach()  # kept alive, so no address is reused; no graph reference cycle

    torch.manual_seed(0)
    x = torch.randint(0, VOCAB, (batch, seq_len))
    y = torch.randint(0, VOCAB, (batch, seq_len))
    # packed rows (chat data): three documents a row, at different places in each row
    docs = (torch.arange(seq_len) * 3 // seq_len + torch.arange(batch)[:, None] % 2) if documents else None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, y, docs)
    return sum(storages.values())


@pytest.mark.parametrize(
    "model, adapter",
    [
        (TINY_GPT2, None),  # CPU flash attention
        ({**TINY_GPT2, "dropout": 0.1}, None),  # dropout: the math kernel, its T x T probabilities, masks
        ({**TINY_GPT2, "positional": {"type": "alibi"}}, None),  # an additive bias
        ({**TINY_GPT2, "positional": {"type": "rope"}}, None),  # rotated q and k
        (TINY_LLAMA, None),  # RMSNorm, SwiGLU, grouped-query attention
        ({**TINY_LLAMA, "dropout": 0.1}, None),
        ({**TINY_LLAMA, "positional": {"type": "alibi"}}, None),
        (TINY_GPT2, {"type": "lora", "r": 4}),
        (TINY_GPT2, {"type": "lora", "r": 4, "targets": ["all-linear"], "dropout": 0.1}),
        (TINY_LLAMA, {"type": "lora", "r": 8, "targets": ["all-linear"]}),
    ],
)
def test_activations_match_the_saved_tensors_of_a_cpu_training_step(model, adapter):
    spec = make_spec(model, adapter)
    p = memory.plan(spec, get_registry(), device="cpu")
    torch.manual_seed(0)
    built = build_model(spec, get_registry(), VOCAB)
    built.train()
    measured = saved_tensor_bytes(built, p.batch_size, p.seq_len)
    planned = p.activations + p.loss_saved  # + what the chunked head and loss keep (their gradients)
    assert abs(planned - measured) <= 0.10 * measured, (planned, measured)


@pytest.mark.parametrize("positional", ["learned", "rope", "alibi"])
def test_packed_rows_count_their_mask(positional):
    """Chat data packed into rows: the block-diagonal mask (a bias with ALiBi) is one per row, and positions too."""
    spec = make_spec({**TINY_GPT2, "positional": {"type": positional}}, batch_size=4)
    spec = spec.model_copy(update={"data": spec.data.model_copy(update={"format": "chat"})})
    p = memory.plan(spec, get_registry(), device="cpu")
    plain = memory.plan(make_spec({**TINY_GPT2, "positional": {"type": positional}}, batch_size=4), get_registry())
    torch.manual_seed(0)
    built = build_model(spec, get_registry(), VOCAB)
    built.train()
    measured = saved_tensor_bytes(built, p.batch_size, p.seq_len, documents=True)
    planned = p.activations + p.loss_saved
    assert p.activations > plain.activations
    assert abs(planned - measured) <= 0.10 * measured, (planned, measured)


def test_activation_checkpointing_keeps_only_block_inputs():
    p = memory.plan(make_spec(TINY_LLAMA, activation_checkpointing=True, batch_size=16), get_registry(), device="cpu")
    N, c = p.batch_size * p.seq_len, 256
    assert p.activation_checkpointing and p.activations_checkpointed < p.activations / 3
    torch_ = p.strategy()
    assert torch_.activations == p.activations_checkpointed
    assert torch_.total == torch_.total_with_checkpointing < torch_.total_without_checkpointing
    assert p.activations_checkpointed >= 4 * N * c * 4  # four blocks' fp32 inputs


# --- FLOPs and the KV cache ---------------------------------------------------------------------------


def test_flops_per_token_is_6n_plus_attention():
    p = memory.plan(
        make_spec({"type": "gpt2", "preset": "gpt2-small", "vocab_size": 50257}), get_registry(), device="cpu"
    )
    n = 124_439_808 - 1024 * 768  # nanoGPT's non-embedding count: all but the position embeddings (the head is tied)
    assert p.matmul_parameters == n
    assert p.flops_per_token == 6 * n + 12 * 12 * 12 * 64 * 1024


def test_kv_cache_bytes():
    p = memory.plan(make_spec(TINY_LLAMA), get_registry(), device="cpu")
    longest = len("Captain Wentworth") + 10  # at most one token per UTF-8 byte, + max_new_tokens
    assert p.kv_cache == 2 * 4 * 2 * 2 * longest * 32 * 4 + 2 * longest * 9  # k and v, 4 layers, 2 prompts, 2 KV heads


# --- fitting ---------------------------------------------------------------------------------------------


def test_check_fits_names_what_to_change():
    spec = make_spec({"type": "gpt2", "preset": "gpt2-small", "vocab_size": 50257}, batch_size=16, seq_len=1024)
    p = memory.check_fits(spec, get_registry(), world_size=1, device="cuda", device_memory=80)
    assert p.fits and p.strategy().total < 20 * memory.GiB
    with pytest.raises(SpecError) as err:
        memory.check_fits(spec, get_registry(), world_size=1, device="cuda", device_memory=6)
    message = str(err.value)
    assert "does not fit" in message and "6.0 GiB" in message
    assert "train.batch_size" in message and "train.grad_accum" in message  # a smaller micro-batch, same global batch
    assert "activation_checkpointing" in message
    with pytest.raises(SpecError, match="more devices|offloaded|ZeRO"):
        memory.check_fits(spec, get_registry(), world_size=1, device="cuda", device_memory=1)


def test_check_fits_without_a_known_vocabulary_waits_for_the_tokenizer():
    spec = make_spec(TINY_GPT2)
    spec.tokenizer = spec.tokenizer.model_copy(update={"vocab_size": None})  # as a tokenizer whose options have none
    assert memory.check_fits(spec, get_registry(), device="cpu") is None
    assert memory.check_fits(spec, get_registry(), device="cpu", vocab_size=VOCAB).fits
    with pytest.raises(SpecError, match="model.vocab_size"):
        memory.plan(spec, get_registry(), device="cpu")


@pytest.mark.parametrize("world_size", [0, -2])
def test_world_size_below_one_is_refused(world_size):
    with pytest.raises(SpecError, match="--world-size"):
        memory.plan(make_spec(TINY_GPT2), get_registry(), world_size=world_size)


# --- the CLI ----------------------------------------------------------------------------------------------


@pytest.fixture
def spec_file(tmp_path):
    raw = {
        "name": "plan-cli",
        "data": {"train": ["corpus.txt"]},
        "tokenizer": {"type": "sentencepiece", "vocab_size": VOCAB},
        "model": TINY_GPT2,
        "train": {"steps": 1, "batch_size": 2},
    }
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize("world_size", ["0", "-1"])
def test_cli_world_size_below_one_exits_2(spec_file, capsys, world_size):
    assert main(["plan", str(spec_file), "--world-size", world_size]) == 2
    err = capsys.readouterr().err
    assert "--world-size" in err and "at least 1" in err and "Traceback" not in err


def test_cli_table_and_json(spec_file, capsys):
    assert main(["plan", str(spec_file), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for text in ("parameters", "FLOPs per token", "global batch", "peak total", "zero-3 x1", "KV cache"):
        assert text in out
    assert (
        main(["plan", str(spec_file), "--device", "cuda", "--world-size", "2", "--device-memory", "0.001", "--json"])
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert data["world_size"] == 2 and data["fits"] is False and "does not fit" in data["advice"]
    assert [s["name"] for s in data["strategies"]] == ["ddp", "zero-1", "zero-2", "zero-3"]
