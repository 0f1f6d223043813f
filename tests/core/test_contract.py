"""aic_core.authoring.testing, the contract a plugin package tests itself against: every built-in plugin passes it,
and it catches each broken promise it checks, saying which one."""

from __future__ import annotations

import types

import pytest
import torch
from pydantic import BaseModel, ConfigDict

from aic_core.authoring.testing import (
    ContractError,
    PositionalContract,
    check_adapter,
    check_model,
    check_options,
    check_plugin,
    check_positional,
    check_registration,
    check_tokenizer,
    check_trainer,
)
from aic_core.model.nn.transformer import Transformer
from aic_core.plugins.hookspecs import hookimpl
from aic_core.plugins.kinds import (
    AdapterPlugin,
    ModelPlugin,
    PluginOptions,
    Positional,
    PositionalPlugin,
    TrainerPlugin,
)
from aic_core.plugins.registry import Registry
from aic_core.train.checkpoint import model_state
from aic_plugins.positional.learned import Learned
from aic_plugins.tokenizers.sentencepiece import SentencePiece

# Small valid options for the built-ins whose defaults are not small (or not complete).
EXAMPLE_OPTIONS = {
    ("model", "gpt2"): {"n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 16},
    ("model", "llama"): {"n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 32, "mlp_hidden": 64, "block_size": 16},
    ("tokenizer", "sentencepiece"): {"vocab_size": 400, "special_tokens": ["<|user|>", "<|end|>"]},
    ("tokenizer", "bpe"): {"vocab_size": 400, "special_tokens": ["<|user|>"], "bos_token": "<|bos|>"},
}
BUILTINS = Registry(strict=False, pinned=[])  # the distribution `aic` only
BUILTIN_PLUGINS = sorted((r.kind, r.name) for r in BUILTINS.records if r.status == "ok")


def test_the_built_ins_cover_the_kinds():
    assert {"model", "positional", "tokenizer", "trainer"} <= {kind for kind, _ in BUILTIN_PLUGINS}


@pytest.mark.parametrize("kind, name", BUILTIN_PLUGINS, ids=[f"{k}-{n}" for k, n in BUILTIN_PLUGINS])
def test_every_built_in_plugin_passes_its_kinds_contract(kind, name, tmp_path):
    check_plugin(type(BUILTINS.get(kind, name)), EXAMPLE_OPTIONS.get((kind, name), {}), tmp_path)


class TestLearnedThroughTheContractClass(PositionalContract):
    plugin = Learned


# --- broken plugins the contract must catch -------------------------------------------------------------


class SlotPositions(Positional):
    """Adds an embedding of the slot (0..T-1 of this call) instead of the absolute position: wrong with a KV cache."""

    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.wpe = torch.nn.Embedding(64, n_embd)

    def embed(self, x, positions):
        return x + self.wpe(torch.arange(x.shape[1]))


class SlotPositional(PositionalPlugin):
    name = "slot"

    def build(self, options, config):
        return SlotPositions(config.n_embd)


def test_a_positional_that_ignores_positions_fails_the_kv_cache_check():
    with pytest.raises(ContractError, match=r"positional plugin 'slot'.*KV cache.*differs from recomputing"):
        check_positional(SlotPositional)


class Limited(PositionalPlugin):
    name = "limited"
    extrapolates = True

    def build(self, options, config):
        positional = Positional()
        positional.max_positions = config.block_size
        return positional


def test_capabilities_must_agree_with_the_module():
    with pytest.raises(ContractError, match="declares extrapolates=True but its Positional has max_positions=16"):
        check_positional(Limited)


def model_plugin(name: str, build) -> type[ModelPlugin]:
    class Options(PluginOptions):
        pass

    def config(self, options, vocab_size):
        from aic_core.model.nn.transformer import TransformerConfig

        return TransformerConfig(
            vocab_size=vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16, tie_embeddings=False
        )

    return type(f"Model_{name}", (ModelPlugin,), {"name": name, "Options": Options, "config": config, "build": build})


def shared_head(self, options, config, positional):
    model = Transformer(config, positional)
    model.lm_head.weight = model.wte.weight  # one tensor under two names: safetensors refuses it
    return model


def unused_parameter(self, options, config, positional):
    model = Transformer(config, positional)
    model.spare = torch.nn.Linear(2, 2)
    return model


def test_a_model_with_shared_tensors_fails_the_checkpoint_check():
    with pytest.raises(ContractError, match="cannot be saved as safetensors.*Do not share one tensor"):
        check_model(model_plugin("shared", shared_head), positional=Learned)


def test_a_model_with_an_unused_parameter_fails_the_gradient_check():
    with pytest.raises(ContractError, match="trainable parameters get no gradient: spare.weight, spare.bias.*DDP"):
        check_model(model_plugin("unused", unused_parameter), positional=Learned)


def test_options_that_accept_unknown_keys_fail():
    class Loose(BaseModel):
        model_config = ConfigDict(extra="ignore")

    loose = type("LoosePositional", (SlotPositional,), {"name": "loose", "Options": Loose})
    with pytest.raises(ContractError, match="must forbid unknown keys"):
        check_options(loose)


def test_a_module_that_does_not_register_the_class_fails(monkeypatch):
    module = types.ModuleType("aic_contract_elsewhere")

    @hookimpl
    def aic_register_positional_encodings(register):
        register(Limited)

    module.aic_register_positional_encodings = aic_register_positional_encodings
    monkeypatch.setitem(__import__("sys").modules, "aic_contract_elsewhere", module)
    with pytest.raises(ContractError, match="module 'aic_contract_elsewhere' does not register this class"):
        check_registration(SlotPositional, "aic_contract_elsewhere")


class StrippingSentencePiece(SentencePiece):
    """Loses trailing whitespace on decode, and leaves a stray file next to the tokenizer."""

    name = "stripping"

    def train(self, options, files, path):
        tokenizer = super().train(options, files, path)
        tokenizer.decode = lambda ids: SentencePiece.load(self, options, path).decode(ids).rstrip()
        return tokenizer


class LitteringSentencePiece(SentencePiece):
    name = "littering"

    def train(self, options, files, path):
        (path.parent / "vocab.txt").write_text("left behind")
        return super().train(options, files, path)


def test_a_tokenizer_that_does_not_round_trip_fails(tmp_path):
    with pytest.raises(ContractError, match=r"decode\(encode\(text\)\) != text"):
        check_tokenizer(StrippingSentencePiece, {"vocab_size": 400}, tmp_path)


def test_a_tokenizer_that_writes_more_than_one_file_fails(tmp_path):
    with pytest.raises(ContractError, match=r"train\(\) left \['tokenizer.model', 'vocab.txt'\].*exactly the one file"):
        check_tokenizer(LitteringSentencePiece, {"vocab_size": 400}, tmp_path)


class ForgetfulAdapter(AdapterPlugin):
    """Scales attn.proj's output; merge() forgets to fold the scale into the weight."""

    name = "forgetful"

    def apply(self, model, options):
        model.requires_grad_(False)
        model.gain = torch.nn.Parameter(torch.ones(()))
        proj = model.blocks[0].attn.proj
        proj.register_forward_hook(lambda m, i, out: out * (1.0 if getattr(m, "merged", False) else model.gain))
        return ["blocks.0.attn.proj"]

    def merge(self, model):
        model.blocks[0].attn.proj.merged = True

    def unmerge(self, model):
        model.blocks[0].attn.proj.merged = False

    def remove(self, model):
        raise NotImplementedError

    def adapter_state(self, model):
        return {"gain": model.gain.detach()}


def test_an_adapter_whose_merge_changes_the_function_fails():
    with pytest.raises(ContractError, match=r"after merge\(\) the logits differ"):
        check_adapter(ForgetfulAdapter)


class LazyTrainer(TrainerPlugin):
    """Saves the untrained model once, at the end."""

    name = "lazy"

    def train(self, options, job):
        job.save_checkpoint(job.spec.train.steps, model_state(job.model), None)


def test_a_trainer_that_does_not_train_fails(tmp_path):
    with pytest.raises(ContractError, match=r"trainer plugin 'lazy'.*did not change the model's weights"):
        check_trainer(LazyTrainer, {}, tmp_path)


def test_a_contract_class_without_a_plugin_says_what_to_set():
    class TestNothing(PositionalContract):
        pass

    with pytest.raises(ContractError, match="set `plugin = YourPluginClass`"):
        TestNothing().test_options_model()


def test_bad_options_given_to_a_check_name_the_key():
    with pytest.raises(
        ContractError, match=r"model\.positional\.max_bais: unknown key 'max_bais' \(did you mean 'max_bias'\?\)"
    ):
        check_positional(type(BUILTINS.get("positional", "alibi")), {"max_bais": 4.0})
