"""The rope plugin against independent references: transformers' Llama rotary (plain and linear scaling)
and GPT-NeoX partial rotary, a float64 complex-number rotation written here, the rotation's invariants
(pair norms, relative positions), spec errors, and the real gpt2 model (KV cache, positions past
block_size, state dict)."""

from __future__ import annotations

import pytest
import torch

from aic_core.errors import SpecError
from aic_core.model.nn.transformer import Transformer, TransformerConfig
from aic_core.plugins.registry import Registry
from aic_core.spec import parse_spec
from tests.conftest import tiny_spec

transformers = pytest.importorskip("transformers")
from transformers.models.gpt_neox import modeling_gpt_neox as neox  # noqa: E402 - after importorskip
from transformers.models.llama.modeling_llama import (  # noqa: E402
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

VOCAB = 50


@pytest.fixture(scope="module")
def reg() -> Registry:
    return Registry()


def rope(reg: Registry, n_head: int = 4, n_embd: int = 64, n_kv_head: int | None = 2, **options):
    """The plugin's module for a head shape (block_size 16: most test positions lie past it, so the table grows)."""
    plugin = reg.get("positional", "rope")
    config = TransformerConfig(
        vocab_size=VOCAB, block_size=16, n_layer=1, n_head=n_head, n_embd=n_embd, n_kv_head=n_kv_head
    )
    return plugin.build(plugin.Options(**options), config)


def qk_positions(head_dim: int, T: int = 9, seed: int = 0):
    """q (2, 4, T, D), k (2, 2, T, D) and per-row different, non-contiguous positions (2, T), some repeated."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, T, head_dim, generator=g)
    k = torch.randn(2, 2, T, head_dim, generator=g)
    positions = torch.stack(
        [
            torch.randint(0, 3000, (T,), generator=g).sort().values,  # left-to-right, with gaps
            torch.randint(0, 40, (T,), generator=g),  # any order, repeats
        ]
    )
    return q, k, positions


# --- transformers --------------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [None, 4.0])
def test_matches_transformers_llama(reg, factor):
    params = {"rope_type": "default", "rope_theta": 500000.0}
    if factor is not None:
        params = {"rope_type": "linear", "rope_theta": 500000.0, "factor": factor}
    hf_config = transformers.LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=16,
        rope_parameters=params,
    )
    hf_rope = LlamaRotaryEmbedding(hf_config)
    ours = rope(reg, theta=500000.0, scaling_factor=factor or 1.0)
    q, k, positions = qk_positions(16)

    cos, sin = hf_rope(q, positions)
    hf_q, hf_k = apply_rotary_pos_emb(q, k, cos, sin)
    our_q, our_k = ours.rotate(q, k, positions)
    assert our_q.dtype == our_k.dtype == torch.float32
    assert (our_q - hf_q).abs().max().item() < 1e-5
    assert (our_k - hf_k).abs().max().item() < 1e-5
    assert (our_q - q).abs().max().item() > 0.1  # the positions did rotate

    # bf16 in, bf16 out, computed in float32 (so within bf16 rounding of the float32 result).
    bq, bk = ours.rotate(q.bfloat16(), k.bfloat16(), positions)
    assert bq.dtype == bk.dtype == torch.bfloat16
    assert (bq.float() - hf_q).abs().max().item() < 0.05


def test_matches_transformers_gpt_neox_partial_rotary(reg):
    hf_config = transformers.GPTNeoXConfig(
        hidden_size=64,
        num_attention_heads=4,
        max_position_embeddings=16,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    )
    hf_rope = neox.GPTNeoXRotaryEmbedding(hf_config)
    ours = rope(reg, rotary_fraction=0.25)
    assert ours.rotary_dim == 4
    q, k, positions = qk_positions(16, seed=1)

    cos, sin = hf_rope(q, positions)
    assert cos.shape[-1] == 4  # transformers rotates 4 of the 16 dims too
    hf_q, hf_k = neox.apply_rotary_pos_emb(q, k, cos, sin)
    our_q, our_k = ours.rotate(q, k, positions)
    assert (our_q - hf_q).abs().max().item() < 1e-5
    assert (our_k - hf_k).abs().max().item() < 1e-5


# --- a float64 reference and invariants ----------------------------------------------------------


def reference_rotate(
    x: torch.Tensor, positions: torch.Tensor, rotary_dim: int, theta: float, factor: float
) -> torch.Tensor:
    """RoPE as complex multiplication in float64: dims (i, i + r/2) are one complex number, turned by
    (position / factor) * theta^(-2i/r). x (B, H, T, D), positions (B, T)."""
    x = x.double()
    half = rotary_dim // 2
    z = torch.complex(x[..., :half], x[..., half:rotary_dim])  # (B, H, T, r/2)
    freq = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / rotary_dim)  # (r/2,)
    angle = (positions.double() / factor)[:, None, :, None] * freq  # (B, 1, T, r/2)
    z = z * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag, x[..., rotary_dim:]], dim=-1)


@pytest.mark.parametrize(("n_embd", "fraction", "rotary_dim"), [(80, 0.4, 8), (64, 1.0, 16), (96, 0.25, 6)])
def test_partial_rotary_against_float64_reference(reg, n_embd, fraction, rotary_dim):
    head_dim = n_embd // 4
    ours = rope(reg, n_embd=n_embd, theta=1000.0, rotary_fraction=fraction, scaling_factor=2.0)
    assert ours.rotary_dim == rotary_dim
    q, k, positions = qk_positions(head_dim, seed=2)
    positions = positions % 300  # float32 angles lose ~position * 6e-8 rad; keep that below the tolerance
    our_q, our_k = ours.rotate(q, k, positions)
    for x, ours_x in ((q, our_q), (k, our_k)):
        ref = reference_rotate(x, positions, rotary_dim, 1000.0, 2.0)
        assert (ours_x.double() - ref).abs().max().item() < 5e-5
        assert torch.equal(ours_x[..., rotary_dim:], x[..., rotary_dim:])  # untouched dims: bit for bit


def test_rotation_preserves_pair_norms(reg):
    ours = rope(reg, rotary_fraction=0.5)  # 8 rotary dims: pairs (i, i + 4)
    q, k, positions = qk_positions(16, seed=3)
    our_q, _ = ours.rotate(q, k, positions)

    def pair_norms(x):
        return x[..., :4].double() ** 2 + x[..., 4:8].double() ** 2  # (B, H, T, 4)

    assert torch.allclose(pair_norms(our_q), pair_norms(q), rtol=1e-5, atol=1e-6)


def test_scores_depend_only_on_position_difference(reg):
    ours = rope(reg, n_head=1, n_embd=16, n_kv_head=None)
    g = torch.Generator().manual_seed(4)
    q = torch.nn.functional.normalize(torch.randn(1, 1, 1, 16, generator=g, dtype=torch.float64), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(1, 1, 1, 16, generator=g, dtype=torch.float64), dim=-1)

    def score(m: int, n: int) -> float:
        rq, _ = ours.rotate(q, q, torch.tensor([[m]]))
        _, rk = ours.rotate(k, k, torch.tensor([[n]]))
        assert rq.dtype == torch.float64
        return (rq * rk).sum().item()

    for distance in (0, 3, 17):
        scores = [score(n + distance, n) for n in (0, 5, 40, 200)]
        assert max(scores) - min(scores) < 1e-5, (distance, scores)
    assert abs(score(3, 0) - score(17, 0)) > 1e-3  # and the distance does matter


# --- spec errors ---------------------------------------------------------------------------------


def test_odd_rotary_dim_is_a_spec_error(reg):
    with pytest.raises(SpecError) as err:  # head size 10 * 0.5 = 5 dims
        rope(reg, n_head=4, n_embd=40, n_kv_head=None, rotary_fraction=0.5)
    message = str(err.value)
    assert message.startswith("model.positional.rotary_fraction") and "0.5" in message and "= 5" in message
    assert "rotary_fraction = 0.4 (4 dims)" in message

    with pytest.raises(SpecError) as err:  # odd head size 9
        rope(reg, n_head=4, n_embd=36, n_kv_head=None)
    message = str(err.value)
    assert "model.n_embd / model.n_head" in message and "36 / 4" in message
    assert "model.n_head = 3 (head size 12)" in message or "model.n_head = 6 (head size 6)" in message


def test_check_refuses_the_spec_before_any_work(reg, corpus, tmp_path):
    raw = tiny_spec(
        corpus, tmp_path, model={"n_embd": 40, "n_head": 4, "positional": {"type": "rope", "rotary_fraction": 0.5}}
    )
    with pytest.raises(SpecError, match=r"model\.positional\.rotary_fraction.*int\(10 \* 0\.5\) = 5"):
        parse_spec(raw, reg)
    raw["model"]["positional"]["rotary_fraction"] = 0.4
    assert parse_spec(raw, reg).model.positional.rotary_fraction == 0.4


# --- the real gpt2 model -------------------------------------------------------------------------


def build_gpt2(reg: Registry, **rope_options) -> Transformer:
    torch.manual_seed(0)
    gpt2, plugin = reg.get("model", "gpt2"), reg.get("positional", "rope")
    opts = gpt2.Options(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=VOCAB)
    cfg = gpt2.config(opts, VOCAB)
    model = gpt2.build(opts, cfg, plugin.build(plugin.Options(**rope_options), cfg)).eval()
    with torch.no_grad():  # larger weights than GPT-2's init, so attention is peaked and positions matter
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.3)
    return model


@torch.no_grad()
def test_gpt2_kv_cache_matches_full_forward(reg):
    model = build_gpt2(reg, rotary_fraction=0.5)
    idx = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
    full = model(idx)  # (2, 12, VOCAB)
    cache = model.new_cache(2, 12)
    prefill = model(idx[:, :11], cache=cache)
    step = model(idx[:, 11:], cache=cache)
    assert (prefill - full[:, :11]).abs().max().item() < 1e-5
    assert (step[:, 0] - full[:, 11]).abs().max().item() < 1e-5


@torch.no_grad()
def test_gpt2_past_block_size_and_state_dict(reg):
    model = build_gpt2(reg)
    idx = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(6))
    at_start = model(idx)
    late = model(idx, positions=torch.arange(80, 100).expand(2, 20))  # past block_size 32: the table grows
    assert late.shape == (2, 20, VOCAB) and torch.isfinite(late).all()
    # RoPE sees only distances and gpt2 has no other position signal: shifting every position changes nothing.
    assert (late - at_start).abs().max().item() < 5e-5
    assert model.positional.max_positions is None and reg.get("positional", "rope").extrapolates

    state = model.state_dict()
    assert not [name for name in state if name.startswith("positional")]
    fresh = build_gpt2(reg, theta=500.0)  # a different theta: still no tensors to disagree about
    fresh.load_state_dict(state, strict=True)
