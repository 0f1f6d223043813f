"""What plugins tell `aic plan` (TrainerPlugin.plan_memory / plan_column, AdapterPlugin.plan_layers,
PositionalPlugin.plan_cache_bytes), and the plan counting from the config: one block times n_layer, so a model
100,000 blocks deep is planned in about the time of a small one."""

from __future__ import annotations

import json
import time

import pytest
import torch

from aic_core.authoring.testing import registry_of
from aic_core.cli import main
from aic_core.errors import PluginError, SpecError
from aic_core.plan import memory
from aic_core.plan.columns import MemoryInputs, Strategy
from aic_core.plan.shape import AdapterLayer, build_meta_model, count_model
from aic_core.plugins import registry as registry_module
from aic_core.plugins.kinds import AdapterPlugin, PluginOptions, TrainerPlugin
from aic_core.plugins.registry import get_registry
from aic_core.spec import parse_spec
from aic_plugins.adapters.lora import LoRA
from aic_plugins.models.gpt2 import GPT2
from aic_plugins.models.llama import Llama
from aic_plugins.positional.learned import Learned
from aic_plugins.positional.rope import Rope
from aic_plugins.tokenizers.sentencepiece import SentencePiece
from aic_plugins.trainers.deepspeed import DeepSpeedTrainer
from aic_plugins.trainers.torch import TorchTrainer

VOCAB = 300
TINY_GPT2 = {"type": "gpt2", "n_layer": 3, "n_head": 4, "n_embd": 64, "block_size": 32}
TINY_LLAMA = {"type": "llama", "preset": "llama-mini", "block_size": 64}


def raw_spec(model: dict | None = None, trainer: dict | None = None, adapter: dict | None = None, **train) -> dict:
    raw = {
        "name": "plan-hooks",
        "data": {"train": ["unused.txt"]},
        "tokenizer": {"type": "sentencepiece", "vocab_size": VOCAB},
        "model": model or TINY_GPT2,
        "train": {"trainer": trainer or {"type": "torch"}, "steps": 1, "batch_size": 4, "grad_accum": 4, **train},
    }
    if adapter:
        raw["adapter"] = adapter
    return raw


# --- a third-party trainer's column -----------------------------------------------------------------


class ShardTrainer(TrainerPlugin):
    """A third-party trainer that shards weights, gradients and optimizer state over the processes (as FSDP's
    FULL_SHARD) and keeps one gathered layer's worth of bf16 weights: it tells the plan so, and gets a column."""

    name = "shard"

    class Options(PluginOptions):
        prefetch: int = 1

    def plan_memory(self, options: PluginOptions | None, inputs: MemoryInputs) -> list[Strategy]:
        P, Pt, world = inputs.parameter_elements, inputs.trainable_elements, inputs.world_size
        gathered = 2 * P // max(1, inputs.shape.n_layer) * (1 + (options.prefetch if options else 1))
        return [
            inputs.column(
                "shard",
                f"shard x{world}",
                weights=2 * P // world,
                gradients=2 * Pt // world,
                optimizer=12 * Pt // world,
                buffers=gathered,
                advice="the shard trainer",
            )
        ]

    def train(self, options: PluginOptions, job) -> None:  # noqa: ANN001 - never run here
        raise NotImplementedError


class SilentTrainer(TrainerPlugin):
    """A third-party trainer that tells the plan nothing: planned as the core's torch / DDP column."""

    name = "silent"

    def train(self, options: PluginOptions, job) -> None:  # noqa: ANN001
        raise NotImplementedError


BUILT_INS = (GPT2, Llama, Learned, Rope, SentencePiece, LoRA, TorchTrainer, DeepSpeedTrainer)


def test_a_third_party_trainer_gets_its_column_in_aic_plan(tmp_path, monkeypatch, capsys):
    registry = registry_of(*BUILT_INS, ShardTrainer)
    monkeypatch.setattr(registry_module, "_default", registry)  # what `aic plan` loads, as if installed
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(raw_spec(trainer={"type": "shard", "prefetch": 2})))
    assert main(["plan", str(path), "--device", "cuda", "--world-size", "4", "--device-memory", "80"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.strip().startswith("per device"))
    assert header.split()[3:] == ["ddp", "x4", "zero-1", "x4", "zero-2", "x4", "zero-3", "x4", "shard", "x4", "*"]

    assert main(["plan", str(path), "--device", "cuda", "--world-size", "4", "--device-memory", "80", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["spec_strategy"] == "shard"
    assert [s["name"] for s in data["strategies"]] == ["ddp", "zero-1", "zero-2", "zero-3", "shard"]
    shard = data["strategies"][-1]
    P = count_model(parse_spec(raw_spec(), registry, check=False), registry).elements
    assert (shard["weights"], shard["optimizer"], shard["buffers"]) == (2 * P // 4, 12 * P // 4, 2 * P // 3 * 3)
    states = sum(shard[k] for k in ("weights", "gradients", "optimizer", "buffers", "workspace"))
    assert shard["total"] >= states + shard["activations"]
    assert "advice" not in shard and "fallback" not in shard  # the JSON keeps its keys


def test_the_fit_advice_offers_a_third_party_column():
    registry = registry_of(GPT2, Learned, SentencePiece, TorchTrainer, ShardTrainer)
    spec = parse_spec(raw_spec(), registry, check=False)
    p = memory.plan(spec, registry, world_size=4, device="cuda", device_memory=80)
    assert [s.name for s in p.strategies] == ["ddp", "shard"]  # no ZeRO columns without the DeepSpeed plugin
    ddp, shard = p.strategies
    assert p.spec_strategy == "ddp" and shard.total < ddp.total_with_checkpointing
    between = (shard.total + ddp.total_with_checkpointing) / 2 / memory.GiB
    with pytest.raises(SpecError, match=r"the shard trainer over 4 device\(s\)"):
        memory.check_fits(spec, registry, world_size=4, device="cuda", device_memory=between)


def test_a_trainer_that_tells_nothing_is_planned_as_the_torch_trainer():
    registry = registry_of(GPT2, Learned, SentencePiece, TorchTrainer, SilentTrainer)
    p = memory.plan(parse_spec(raw_spec(trainer={"type": "silent"}), registry, check=False), registry, device="cpu")
    assert [s.name for s in p.strategies] == ["torch"] and p.spec_strategy == "torch"
    assert "trainer 'silent' is planned as the torch trainer." in p.notes
    installed = get_registry()  # the built-in torch trainer: the core's column is its own, no note
    torch_plan = memory.plan(parse_spec(raw_spec(), installed, check=False), installed, device="cpu")
    assert not any("planned as the torch trainer" in n for n in torch_plan.notes)
    assert p.strategy().total == torch_plan.strategy().total


def test_deepspeed_stage_0_is_planned_as_data_parallel_and_stages_1_to_3_as_their_zero_column():
    registry = get_registry()
    for stage, world, name in [(0, 1, "torch"), (0, 2, "ddp"), (1, 2, "zero-1"), (3, 4, "zero-3")]:
        spec = parse_spec(raw_spec(trainer={"type": "deepspeed", "stage": stage}), registry, check=False)
        p = memory.plan(spec, registry, world_size=world, device="cuda", device_memory=80)
        assert p.spec_strategy == name
        assert [f.name for f in p.fallbacks] == ["zero-3-offload"]  # offered by the advice, not shown


def test_a_plan_column_naming_no_column_is_a_plugin_error():
    class Confused(SilentTrainer):
        name = "confused"

        def plan_column(self, options: PluginOptions, world_size: int) -> str | None:
            return "fsdp"

    registry = registry_of(GPT2, Learned, SentencePiece, Confused)
    spec = parse_spec(raw_spec(trainer={"type": "confused"}), registry, check=False)
    with pytest.raises(PluginError, match="plan_column named the column 'fsdp'"):
        memory.plan(spec, registry, device="cpu")


# --- adapters ---------------------------------------------------------------------------------------------


class _Stub(AdapterPlugin):
    """An adapter that is never applied here: the plan asks its plan_layers, it builds nothing."""

    def apply(self, model, options):  # noqa: ANN001, ANN201
        raise AssertionError("the plan must not apply the adapter")

    merge = unmerge = remove = apply

    def adapter_state(self, model):  # noqa: ANN001, ANN201
        return {}


class Scales(_Stub):
    """(IA)^3-like: one learned vector of out_features per MLP input layer."""

    name = "scales"

    def plan_layers(self, options, linears):  # noqa: ANN001, ANN201
        return {n: AdapterLayer(tensors=(fan_out,)) for n, (_, fan_out) in linears.items() if n.endswith("mlp.fc")}


class Mute(_Stub):
    name = "mute"


def test_an_adapter_tells_the_plan_its_parameters_without_being_applied():
    registry = registry_of(GPT2, Learned, SentencePiece, TorchTrainer, Scales, Mute)
    spec = parse_spec(raw_spec(adapter={"type": "scales"}), registry, check=False)
    p = memory.plan(spec, registry, device="cpu")
    base = memory.plan(parse_spec(raw_spec(), registry, check=False), registry, device="cpu")
    assert p.trainable == 3 * 4 * 64  # three blocks' fc: 4 x n_embd outputs each
    assert p.parameters == base.parameters + p.trainable
    assert p.strategy().optimizer == 8 * p.trainable + 4 * 3  # one tensor per wrapped layer
    muted = memory.plan(parse_spec(raw_spec(adapter={"type": "mute"}), registry, check=False), registry, device="cpu")
    assert muted.trainable == 0 and any("AdapterPlugin.plan_layers" in n for n in muted.notes)


@pytest.mark.parametrize(
    "model, targets",
    [
        (TINY_GPT2, ["attn.qkv", "attn.proj"]),
        (TINY_GPT2, ["all-linear"]),
        ({**TINY_GPT2, "tie_embeddings": False}, ["blocks.1.*", "lm_head"]),
        (TINY_LLAMA, ["mlp.*", "blocks.0.attn.qkv"]),
    ],
)
def test_lora_plans_the_layers_it_wraps(model, targets):
    registry = get_registry()
    spec = parse_spec(raw_spec(model, adapter={"type": "lora", "r": 4, "targets": targets}), registry, check=False)
    full = build_meta_model(spec, registry)  # the adapter applied to the whole model
    wrapped = {n for n, m in full.named_modules() if hasattr(m, "lora_A")}
    linears = {n: (m.in_features, m.out_features) for n, m in full.named_modules() if isinstance(m, torch.nn.Linear)}
    planned = registry.get("adapter", "lora").plan_layers(spec.adapter, linears)
    assert set(planned) == wrapped
    for n in wrapped:
        m = full.get_submodule(n)
        assert planned[n].tensors == (m.lora_A.numel(), m.lora_B.numel())


def test_lora_targets_that_match_nothing_are_refused_by_the_plan_as_by_apply():
    registry = get_registry()
    spec = parse_spec(raw_spec(adapter={"type": "lora", "targets": ["attn.qkv", "blocks.9.*"]}), registry, check=False)
    with pytest.raises(PluginError, match=r"'blocks\.9\.\*' matches no linear layer"):
        memory.plan(spec, registry, device="cpu")


# --- positional encodings -------------------------------------------------------------------------------


def test_rope_tells_the_plan_its_cos_and_sin_tables():
    registry = get_registry()
    spec = parse_spec(
        raw_spec({**TINY_GPT2, "positional": {"type": "rope", "rotary_fraction": 0.5}}), registry, check=False
    )
    rope = registry.get("positional", "rope")
    config = registry.get("model", "gpt2").config(spec.model, VOCAB)
    positions = torch.arange(32).expand(4, 32)
    cos, sin = rope.build(spec.model.positional, config)._angles(positions)
    assert rope.plan_cache_bytes(spec.model.positional, config, 4, 32) == cos.nbytes + sin.nbytes
    assert registry.get("positional", "learned").plan_cache_bytes(spec.model.positional, config, 4, 32) == 0


# --- one block times n_layer ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model, adapter",
    [
        (TINY_GPT2, None),
        ({**TINY_GPT2, "positional": {"type": "rope"}, "tie_embeddings": False}, None),
        ({**TINY_GPT2, "positional": {"type": "alibi"}}, None),
        (TINY_LLAMA, None),
        (TINY_GPT2, {"type": "lora", "r": 4, "targets": ["all-linear"], "dropout": 0.1}),
        ({**TINY_GPT2, "tie_embeddings": False}, {"type": "lora", "r": 2, "targets": ["blocks.1.*", "lm_head"]}),
        (TINY_LLAMA, {"type": "lora", "r": 8, "targets": ["mlp.*"]}),
    ],
)
def test_one_block_times_n_layer_counts_what_the_whole_model_holds(model, adapter):
    registry = get_registry()
    spec = parse_spec(raw_spec(model, adapter=adapter), registry, check=False)
    s = count_model(spec, registry)
    full = build_meta_model(spec, registry)
    params = list(full.parameters())
    assert s.n_layer == len(full.blocks) == sum(n for _, n in s.blocks)
    assert s.elements == sum(p.numel() for p in params)
    assert s.trainable_elements == sum(p.numel() for p in params if p.requires_grad)
    assert s.trainable_tensors == sum(1 for p in params if p.requires_grad)
    assert s.buffer_bytes == sum(b.numel() * b.element_size() for b in full.buffers())
    assert (s.parameters, s.trainable) == (full.num_params(), full.num_params(trainable_only=True))


class DeepGPT2(GPT2):
    """A model plugin whose build makes every block whatever the config says: the plan reads each."""

    name = "deep-gpt2"

    def build(self, options, config, positional):  # noqa: ANN001, ANN201
        from aic_core.model.nn.transformer import Transformer

        return Transformer(type(config)(**{**config.to_dict(), "n_layer": options.n_layer}), positional)


def test_a_model_plugin_that_builds_every_block_is_counted_block_by_block():
    registry = registry_of(GPT2, DeepGPT2, Learned, SentencePiece, TorchTrainer)
    plans = [
        memory.plan(parse_spec(raw_spec({**TINY_GPT2, "type": t}), registry, check=False), registry, device="cpu")
        for t in ("gpt2", "deep-gpt2")
    ]
    assert plans[0].parameters == plans[1].parameters
    assert plans[0].strategy().total == plans[1].strategy().total


def test_a_model_100000_blocks_deep_is_refused_in_about_a_second():
    """Was minutes at 3.5 GB RSS (n_layer 10000: 109 s) while the plan built every block on the meta device."""
    registry = get_registry()
    model = {**TINY_GPT2, "n_layer": 100_000, "block_size": 1_000_000_000}
    memory.plan(parse_spec(raw_spec(), registry, check=False), registry, device="cpu")  # torch's one-time imports
    for adapter in (None, {"type": "lora", "r": 8}):
        spec = parse_spec(raw_spec(model, adapter=adapter), registry, check=False)
        start = time.perf_counter()
        with pytest.raises(SpecError) as err:
            memory.check_fits(spec, registry, device="cpu", device_memory=80)
        elapsed = time.perf_counter() - start
        print(f"n_layer 100,000, block_size 1e9, adapter {adapter}: refused in {elapsed:.3f} s")
        message = str(err.value)
        C = 64
        block = 12 * C * C + 13 * C  # qkv, proj, fc, mlp proj with biases; two LayerNorms
        lora = 100_000 * 8 * (C + 3 * C + C + C) if adapter else 0  # A and B of qkv and proj
        parameters = VOCAB * C + 1_000_000_000 * C + 100_000 * block + 2 * C + lora
        assert f"({parameters:,} parameters)" in message
        assert "this run does not fit" in message and "80.0 GiB" in message and "To make it fit" in message
