"""The llama model plugin against transformers' LlamaForCausalLM (random weights, small configs)."""

from __future__ import annotations

import pytest
import torch

from aic_core.errors import AicError
from aic_core.generate import generate
from aic_core.model.loading import import_hf
from aic_core.plugins.registry import get_registry
from aic_core.spec import SamplerSpec
from tests.core.test_generation import CharTokenizer

transformers = pytest.importorskip("transformers")


def hf_llama(tmp_path, **overrides):
    fields = dict(
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=128,
        vocab_size=1000,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )
    fields.update(overrides)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields)).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    return model


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # grouped-query attention: 8 query heads share 2 KV heads
        {"num_key_value_heads": 8},  # multi-head
        {"num_key_value_heads": 1, "tie_word_embeddings": True},  # multi-query, tied
        {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}},
    ],
    ids=["gqa", "mha", "mqa-tied", "rope-linear"],
)
def test_llama_logits_match_transformers(tmp_path, overrides):
    hf = hf_llama(tmp_path, **overrides)
    imported = import_hf(tmp_path)
    assert imported.options["type"] == "llama" and imported.options["positional"]["type"] == "rope"
    idx = torch.randint(0, 1000, (2, 50), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        diff = (imported.model(idx) - hf(idx).logits).abs().max().item()
    assert diff < 1e-4, diff


def test_kv_cache_stores_only_the_kv_heads(tmp_path):
    hf_llama(tmp_path)
    model = import_hf(tmp_path).model
    cache = model.new_cache(batch_size=3, max_len=20)
    assert cache.k.shape == (2, 3, 2, 20, 8)  # (layers, batch, n_kv_head, max_len, head_dim)


def test_greedy_with_the_cache_equals_full_recompute(tmp_path):
    hf_llama(tmp_path, vocab_size=CharTokenizer().vocab_size)
    model = import_hf(tmp_path).model
    tok = CharTokenizer()
    greedy = SamplerSpec(temperature=0)
    prompts = ["the cat", "a", "once upon a time"]
    cached = generate(model, tok, prompts, 20, greedy, use_cache=True)
    recomputed = generate(model, tok, prompts, 20, greedy, use_cache=False)
    assert cached == recomputed


def test_presets_fill_the_tinyllama_shape():
    llama = get_registry().get("model", "llama")
    opts = llama.Options(preset="tinyllama-1.1b", vocab_size=32000)
    cfg = llama.config(opts, 32000)
    assert (cfg.n_layer, cfg.n_embd, cfg.hidden, cfg.n_head, cfg.kv_heads, cfg.block_size) == (
        22,
        2048,
        5632,
        32,
        4,
        2048,
    )
    with torch.device("meta"):
        rope = get_registry().get("positional", "rope")
        model = llama.build(opts, cfg, rope.build(rope.Options(), cfg))
    assert model.num_params() == 1_100_048_384  # TinyLlama-1.1B's published parameter count


def test_head_ratio_that_does_not_divide_is_refused():
    llama = get_registry().get("model", "llama")
    with pytest.raises(ValueError, match=r"n_head \(8\) must be a multiple of n_kv_head \(3\)"):
        llama.Options(preset="llama-mini", n_kv_head=3)


def test_unsupported_llama_config_is_refused(tmp_path):
    hf_llama(tmp_path, hidden_act="gelu")
    with pytest.raises(AicError, match="hidden_act"):
        import_hf(tmp_path)
