"""The alibi plugin against independent references: the paper's slopes (float64), BLOOM's
build_alibi_tensor, a float64 hand-written attention, and the real gpt2 model (KV cache, left padding,
generation past block_size, state dict)."""

from __future__ import annotations

import math

import pytest
import torch

from aic_core.generate import generate
from aic_core.model.nn.transformer import Transformer
from aic_core.plugins.kinds import Tokenizer
from aic_core.plugins.registry import Registry
from aic_core.spec import SamplerSpec

VOCAB = 50


def paper_slopes(n: int) -> list[float]:
    """get_slopes from the paper's code (ofirpress/attention_with_linear_biases), in float64."""

    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))  # 2^(-8/n)
        return [start * start**i for i in range(n)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + paper_slopes(2 * closest)[0::2][: n - closest]


@pytest.fixture(scope="module")
def reg() -> Registry:
    return Registry()


def build(reg: Registry, n_head: int = 6, std: float = 0.3, **alibi_options) -> Transformer:
    torch.manual_seed(0)
    gpt2, alibi = reg.get("model", "gpt2"), reg.get("positional", "alibi")
    opts = gpt2.Options(n_layer=2, n_head=n_head, n_embd=8 * n_head, block_size=32, vocab_size=VOCAB)
    cfg = gpt2.config(opts, VOCAB)
    model = gpt2.build(opts, cfg, alibi.build(alibi.Options(**alibi_options), cfg)).eval()
    # GPT-2's init (std 0.02) gives near-uniform attention and greedy text that repeats one token;
    # larger weights give peaked attention and varied text, so every comparison below counts.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, std)
    return model


def positional(reg: Registry, n_head: int):
    return build(reg, n_head).positional


# --- slopes and bias -------------------------------------------------------------------------------


def test_plugin_registered(reg):
    plugin = reg.get("positional", "alibi")
    assert plugin.extrapolates and plugin.Options().max_bias == 8.0
    assert build(reg).positional.max_positions is None


@pytest.mark.parametrize("n_head", range(1, 17))
def test_slopes_match_paper(reg, n_head):
    ours = positional(reg, n_head).slopes
    assert ours.dtype == torch.float32 and ours.shape == (n_head,)
    ref = torch.tensor(paper_slopes(n_head), dtype=torch.float64)
    assert ((ours.double() - ref).abs() / ref).max() <= 2**-24  # float32's rounding of the float64 values


def test_slopes_examples(reg):
    # The paper: 8 heads -> 1/2, 1/4, ..., 1/256.
    assert positional(reg, 8).slopes.tolist() == [2.0**-i for i in range(1, 9)]
    # 6 heads: the 4 of n=4 (2^-2, 2^-4, 2^-6, 2^-8), then 2^-1, 2^-3 from n=8.
    assert positional(reg, 6).slopes.tolist() == [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]


def test_max_bias_option(reg):
    # 2^(-max_bias/n * i): max_bias 4 with 4 heads -> 1/2, 1/4, 1/8, 1/16.
    assert build(reg, 4, max_bias=4.0).positional.slopes.tolist() == [0.5, 0.25, 0.125, 0.0625]


def test_bias_values(reg):
    pos = positional(reg, 6)
    q = torch.tensor([[3, 4], [7, 8]])  # (B=2, Tq=2)
    k = torch.tensor([[0, 1, 2, 3, 4], [4, 5, 6, 7, 8]])  # (B=2, Tk=5)
    bias = pos.attn_bias(q, k)
    assert bias.shape == (2, 6, 2, 5) and bias.dtype == torch.float32
    slopes = torch.tensor(paper_slopes(6), dtype=torch.float64)
    dist = (q[:, :, None] - k[:, None, :]).double()  # (B, Tq, Tk)
    ref = -slopes[None, :, None, None] * dist[:, None]
    past = (dist >= 0)[:, None].expand_as(ref)  # future keys are masked by the core; only the past counts
    assert (bias.double() - ref)[past].abs().max() < 1e-6
    assert torch.equal(bias[0], bias[1])  # only the distance matters


@pytest.mark.parametrize("n_head", [1, 2, 3, 4, 5, 6, 7, 8, 12, 16])
def test_softmax_matches_bloom(reg, n_head):
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    T = 20
    bloom = build_alibi_tensor(torch.ones(1, T, dtype=torch.long), n_head, torch.float32).view(n_head, T)  # slope_h * k
    ours = positional(reg, n_head)
    assert (ours.slopes - bloom[:, 1]).abs().max() < 1e-7  # k = 1: BLOOM's slopes themselves
    positions = torch.arange(T)[None]
    bias = ours.attn_bias(positions, positions)[0]  # (H, T, T) = -slope (q - k)
    # -slope (q - k) and slope k differ by slope q, a constant per row, which softmax cancels.
    scores = torch.randn(n_head, T, T, generator=torch.Generator().manual_seed(n_head))
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    p_ours = torch.softmax((scores + bias).masked_fill(~causal, float("-inf")), dim=-1)
    p_bloom = torch.softmax((scores + bloom[:, None, :]).masked_fill(~causal, float("-inf")), dim=-1)
    diff = (p_ours - p_bloom).abs().max().item()
    print(f"alibi vs BLOOM softmax, n_head={n_head}: max abs diff {diff:.1e}")
    assert diff < 1e-6


# --- attention -----------------------------------------------------------------------------------------


def test_attention_matches_float64_reference(reg):
    model = build(reg)
    attn, H, D = model.blocks[0].attn, 6, 8
    B, T = 2, 12
    x = torch.randn(B, T, 48, generator=torch.Generator().manual_seed(1))
    positions = torch.arange(T).expand(B, T)
    mask, causal = model._mask(positions, positions, None, False, 0)
    assert mask.shape == (B, H, T, T) and mask.dtype == torch.float32 and not causal
    with torch.no_grad():
        y = attn(x, positions, model.positional, mask, causal)

    # float64, by hand: softmax(q k^T / sqrt(d) - slope_h (i - j), j <= i) v, then the output projection.
    W, b = attn.qkv.weight.double(), attn.qkv.bias.double()
    q, k, v = (x.double() @ W.T + b).split(48, dim=-1)
    q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    slopes = torch.tensor(paper_slopes(H), dtype=torch.float64)
    bias = -slopes[:, None, None] * (i - j).double()  # (H, T, T)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(D) + bias
    scores = scores.masked_fill(j > i, float("-inf"))
    out = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(B, T, 48)
    ref = out @ attn.proj.weight.double().T + attn.proj.bias.double()
    diff = (y.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    print(f"alibi attention vs float64 reference: max abs diff {diff:.1e} (outputs up to {scale:.0f})")
    assert diff < 1e-6 * scale  # float32 rounding


# --- the real model --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(reg) -> Transformer:
    return build(reg, std=0.1)  # logits within a few units, so float32 rounding stays far below 1e-5


def test_state_dict_has_no_alibi_tensors(model):
    assert "positional.slopes" in dict(model.named_buffers())
    assert not [k for k in model.state_dict() if k.startswith("positional.") or "slopes" in k]


@torch.no_grad()
def test_kv_cache_matches_full_forward(model):
    idx = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(2))
    full = model(idx)  # (2, 20, V)
    cache = model.new_cache(2, 20)
    prefill = model(idx[:, :19], cache=cache)
    step = model(idx[:, 19:], cache=cache)
    diff = max((prefill - full[:, :19]).abs().max().item(), (step - full[:, 19:]).abs().max().item())
    print(f"alibi KV cache vs full forward: max abs logit diff {diff:.1e}")
    assert diff < 1e-5


@torch.no_grad()
def test_left_padded_batch_matches_each_alone(model):
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, VOCAB, (1, 16), generator=g), torch.randint(0, VOCAB, (1, 10), generator=g)
    pad = 16 - 10
    idx = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.long), b], dim=1)])  # (2, 16)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, :pad] = 0
    positions = (torch.arange(16)[None] - torch.tensor([[0], [pad]])).clamp(min=0)  # 0 at the first real token
    batch = model(idx, positions=positions, attention_mask=mask)
    diff = max((batch[0] - model(a)[0]).abs().max().item(), (batch[1, pad:] - model(b)[0]).abs().max().item())
    print(f"alibi left-padded batch vs alone: max abs logit diff {diff:.1e}")
    assert diff < 1e-5


@torch.no_grad()
def test_unpadded_batch_builds_one_bias_row(model):
    """Training and evaluation batches (no padding, default positions) build the bias once, as
    (1, H, T, T), and broadcast it over the batch; logits equal those from per-row positions."""
    idx = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(4))
    shared = model(idx)
    per_row = model(idx, positions=torch.arange(16).expand(3, 16).clone())
    assert (shared - per_row).abs().max().item() < 1e-6
    mask, _ = model._mask(torch.arange(16)[None], torch.arange(16)[None], None, False, 0)
    assert mask.shape == (1, 6, 16, 16)


def test_bias_is_cast_once_to_the_autocast_dtype(model):
    positions = torch.arange(8)[None]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mask, _ = model._mask(positions, positions, None, False, 0)
        logits = model(torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(5)))
    assert mask.dtype == torch.bfloat16
    assert torch.isfinite(logits).all()


class CharTokenizer(Tokenizer):
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWX"
    vocab_size = VOCAB

    def encode(self, text: str) -> list[int]:
        return [self.chars.index(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)


def test_greedy_generation_cache_matches_no_cache_past_block_size(reg):
    model, tok = build(reg), CharTokenizer()
    prompts = ["thequickbrownfoxjumps", "overthelazy"]  # 21 and 11 tokens, block_size 32
    greedy = SamplerSpec(temperature=0, repetition_penalty=1.3)  # deterministic, and varied text
    n_new = 16  # 21 + 16 = 37 > 32: alibi extrapolates, so generation must not refuse
    cached = generate(model, tok, prompts, n_new, greedy, use_cache=True)
    uncached = generate(model, tok, prompts, n_new, greedy, use_cache=False)
    print(f"alibi greedy generation: {cached}")
    assert cached == uncached
    assert [len(t) for t in cached] == [n_new, n_new]  # no eos: every step emits one char
    # Each prompt alone generates the same as inside the left-padded batch.
    assert [generate(model, tok, [p], n_new, greedy)[0] for p in prompts] == cached
