"""The example plugins against aic's contract tests, and each against an independent reference."""

from __future__ import annotations

import math

import pytest
import torch
from aic_core.kinds import Positional
from aic_core.nn.transformer import TransformerConfig
from aic_core.testing import ModelContract, PositionalContract, TokenizerContract, check_entry_point

from aic_plugin_example.model import GPTReLU2
from aic_plugin_example.positional import Sinusoidal
from aic_plugin_example.tokenizer import Bytes

SMALL = {"n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 16}


class TestSinusoidal(PositionalContract):
    plugin = Sinusoidal


class TestGPTReLU2(ModelContract):
    plugin = GPTReLU2
    options = SMALL
    positional = Sinusoidal


class TestGPTReLU2WithRope(ModelContract):
    plugin = GPTReLU2
    options = SMALL
    positional = "rope"  # a built-in plugin, looked up among the installed ones


class TestBytes(TokenizerContract):
    plugin = Bytes


def test_each_plugin_is_installed_under_the_aic_entry_points():
    for cls in (Sinusoidal, GPTReLU2, Bytes):
        check_entry_point(cls)


def test_sinusoidal_matches_the_papers_formula_in_float64():
    n_embd, base = 16, 10000.0
    config = TransformerConfig(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=n_embd)
    positional = Sinusoidal().build(Sinusoidal.Options(base=base), config)
    positions = [0, 1, 7, 500]
    got = positional.embed(torch.zeros(1, 4, n_embd), torch.tensor([positions]))[0]
    expected = torch.tensor(
        [[f(pos / base ** (2 * (j // 2) / n_embd)) for j, f in zip(range(n_embd), [math.sin, math.cos] * n_embd)] for pos in positions],
        dtype=torch.float64,
    )
    assert torch.allclose(got.double(), expected, atol=2e-4)  # float32 angles of positions up to 500


def test_bytes_tokenizer_ids_are_the_utf8_bytes(tmp_path):
    tokenizer = Bytes().train(Bytes.Options(), [], tmp_path / "tokenizer.model")
    text = "caf\u00e9 \u2014 \U0001F600\n"
    assert tokenizer.encode(text) == list(text.encode("utf-8"))
    assert (tokenizer.vocab_size, tokenizer.eos_id) == (257, 256)
    assert tokenizer.decode(tokenizer.encode(text)[:-3]) == "caf\u00e9 \u2014 \ufffd"  # a cut character shows as U+FFFD
    assert Bytes().load(Bytes.Options(), tmp_path / "tokenizer.model").encode("a") == [97]
    no_eos = Bytes().train(Bytes.Options(eos=False), [], tmp_path / "plain.model")
    assert (no_eos.vocab_size, no_eos.eos_id) == (256, None)


def test_relu2_mlp_is_the_squared_relu_in_float64():
    options = GPTReLU2.Options(**SMALL)
    model = GPTReLU2().build(options, GPTReLU2().config(options, 50), Positional())
    mlp = model.blocks[0].mlp.double()
    x = torch.randn(3, 32, dtype=torch.float64)
    expected = torch.clamp(x @ mlp.fc.weight.T, min=0) ** 2 @ mlp.proj.weight.T
    assert torch.allclose(mlp(x), expected)


def test_odd_width_is_refused_with_the_field_named():
    from aic_core.errors import SpecError

    config = TransformerConfig(vocab_size=10, block_size=8, n_layer=1, n_head=1, n_embd=15)
    with pytest.raises(SpecError, match=r"model\.n_embd: .*must be even \(got 15\)"):
        Sinusoidal().build(Sinusoidal.Options(), config)
