"""The gpt2 plugin: logit parity with transformers' GPT2LMHeadModel, presets' parameter counts, import errors."""

from __future__ import annotations

import pytest
import torch

from aic_core.errors import PluginError
from aic_core.model.nn.transformer import Transformer, TransformerConfig
from aic_plugins.models.gpt2 import GPT2
from aic_plugins.positional.learned import Learned

transformers = pytest.importorskip("transformers")

# Published parameter counts of the GPT-2 family (vocab 50257, tied embeddings), as transformers counts them.
HF_PARAMS = {"gpt2-small": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}


def hf_model(**kwargs):
    torch.manual_seed(0)
    kwargs = {
        "n_layer": 3,
        "n_head": 4,
        "n_embd": 64,
        "n_positions": 128,
        "vocab_size": 1000,
        "bos_token_id": 0,
        "eos_token_id": 0,
        **kwargs,
    }
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**kwargs)).eval()
    with torch.no_grad():  # HF zero-initialises the LayerNorm biases etc.; make every tensor count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def build(
    options: dict, vocab_size: int = 0, device: str | torch.device = "cpu"
) -> tuple[Transformer, TransformerConfig]:
    plugin = GPT2()
    opts = plugin.Options.model_validate(options)
    config = plugin.config(opts, vocab_size)
    with torch.device(device):
        positional = Learned().build(Learned.Options(), config)
        model = plugin.build(opts, config, positional)
    return model, config


def import_hf(hf) -> Transformer:
    plugin = GPT2()
    model, config = build(plugin.options_from_hf_config(hf.config.to_dict()))
    model.load_state_dict(plugin.state_dict_from_hf(hf.state_dict(), config), strict=True)
    return model.eval()


def max_logit_diff(hf, model: Transformer) -> float:
    idx = torch.randint(0, hf.config.vocab_size, (2, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    assert ours.dtype == theirs.dtype == torch.float32 and ours.shape == theirs.shape == (2, 50, hf.config.vocab_size)
    return (ours - theirs).abs().max().item()


@pytest.fixture(scope="module")
def hf_tied():
    return hf_model()


def test_options_from_hf_config(hf_tied):
    options = GPT2().options_from_hf_config(hf_tied.config.to_dict())
    assert options == {
        "n_layer": 3,
        "n_head": 4,
        "n_embd": 64,
        "block_size": 128,
        "vocab_size": 1000,
        "tie_embeddings": True,
        "norm_eps": 1e-5,
    }


def test_logits_match_transformers_tied_and_padded_vocab(hf_tied):
    hf = hf_tied
    model = import_hf(hf)
    assert model.config.padded_vocab_size == 1024 and model.wte.weight.shape == (1024, 64)
    assert torch.equal(model.wte.weight[1000:], torch.zeros(24, 64))
    diff = max_logit_diff(hf, model)
    print(f"gpt2 tied parity: max abs logit diff {diff:.2e}")
    assert diff < 1e-4


def test_logits_match_transformers_untied():
    hf = hf_model(tie_word_embeddings=False)
    assert hf.lm_head.weight.data_ptr() != hf.transformer.wte.weight.data_ptr()
    model = import_hf(hf)
    assert model.lm_head is not None and model.lm_head.weight.shape == (1024, 64)
    assert torch.equal(model.lm_head.weight[:1000], hf.lm_head.weight)
    diff = max_logit_diff(hf, model)
    print(f"gpt2 untied parity: max abs logit diff {diff:.2e}")
    assert diff < 1e-4


def test_imports_a_bare_gpt2model_state(hf_tied):
    hf = hf_tied
    plugin = GPT2()
    model, config = build(plugin.options_from_hf_config(hf.config.to_dict()))
    model.load_state_dict(plugin.state_dict_from_hf(hf.transformer.state_dict(), config), strict=True)
    assert max_logit_diff(hf, model.eval()) < 1e-4


def test_extra_tensors_are_named(hf_tied):
    hf = hf_tied
    plugin = GPT2()
    state = dict(hf.state_dict())
    state["transformer.h.0.attn.rotary.inv_freq"] = torch.zeros(8)
    _, config = build(plugin.options_from_hf_config(hf.config.to_dict()))
    with pytest.raises(PluginError, match=r"unexpected tensors.*h\.0\.attn\.rotary\.inv_freq"):
        plugin.state_dict_from_hf(state, config)
    # A 3-layer checkpoint into a 2-layer config: layer 2's tensors are extra.
    _, small = build({**plugin.options_from_hf_config(hf.config.to_dict()), "n_layer": 2})
    with pytest.raises(PluginError, match=r"\(2 layers\).*unexpected tensors: transformer\.h\.2\.attn\.c_attn\.bias"):
        plugin.state_dict_from_hf(hf.state_dict(), small)


def test_unsupported_activation_is_refused(hf_tied):
    config = hf_tied.config.to_dict()
    config["activation_function"] = "relu"
    with pytest.raises(Exception, match="activation_function 'relu'"):
        GPT2().options_from_hf_config(config)


def padded_count(config: TransformerConfig) -> int:
    """The parameter count of the module as built: embeddings padded to padded_vocab_size rows."""
    C, L, V = config.n_embd, config.n_layer, config.padded_vocab_size
    per_block = 2 * 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C)
    return V * C + config.block_size * C + L * per_block + 2 * C


@pytest.mark.parametrize("preset", list(HF_PARAMS))
def test_preset_shapes_build_with_the_expected_tensors(preset):
    model, config = build({"preset": preset}, vocab_size=50257, device="meta")
    assert config.vocab_size == 50257 and config.padded_vocab_size == 50304
    assert sum(p.numel() for p in model.parameters()) == padded_count(config)
    # Without the 47 padding rows the module is exactly the published GPT-2.
    assert padded_count(config) - 47 * config.n_embd == HF_PARAMS[preset]


@pytest.mark.parametrize("preset", ["gpt2-small"])
def test_preset_num_params_is_the_published_count(preset):
    model, _ = build({"preset": preset}, vocab_size=50257, device="meta")
    assert model.num_params() == HF_PARAMS[preset] == 124_439_808
