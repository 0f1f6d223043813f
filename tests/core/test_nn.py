"""float64 reference checks of the transformer blocks: attention, KV cache, left padding, vocab padding, loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from aic_core.model.nn.attention import CausalSelfAttention
from aic_core.model.nn.transformer import Transformer, TransformerConfig
from aic_core.plugins.kinds import Positional
from aic_plugins.positional.learned import LearnedPositions

VOCAB = 1000  # not a multiple of 64: the embedding is padded to 1024 rows


def config(**kwargs) -> TransformerConfig:
    return TransformerConfig(
        **{"vocab_size": VOCAB, "block_size": 64, "n_layer": 2, "n_head": 4, "n_embd": 32, **kwargs}
    )


def make_model(dtype: torch.dtype = torch.float64, **kwargs) -> Transformer:
    torch.manual_seed(0)
    c = config(**kwargs)
    model = Transformer(c, LearnedPositions(c.block_size, c.n_embd)).to(dtype).eval()
    with torch.no_grad():  # non-trivial biases and norms, so every parameter matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def tokens(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def reference_attention(
    attn: CausalSelfAttention, x: torch.Tensor, allowed: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(QK^T / sqrt(d) + causal mask) V, written out by hand."""
    B, T, C = x.shape
    H, Hkv, D = attn.n_head, attn.n_kv_head, attn.head_dim
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias
    q, k, v = qkv[..., : H * D], qkv[..., H * D : (H + Hkv) * D], qkv[..., (H + Hkv) * D :]
    q = q.reshape(B, T, H, D).permute(0, 2, 1, 3)
    k = k.reshape(B, T, Hkv, D).permute(0, 2, 1, 3).repeat_interleave(H // Hkv, dim=1)
    v = v.reshape(B, T, Hkv, D).permute(0, 2, 1, 3).repeat_interleave(H // Hkv, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    if allowed is None:
        allowed = torch.ones(T, T, dtype=torch.bool).tril()
    scores = scores.masked_fill(~allowed, float("-inf"))
    y = torch.softmax(scores, dim=-1) @ v  # (B, H, T, D)
    y = y.permute(0, 2, 1, 3).reshape(B, T, H * D)
    return y @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize("n_kv_head", [None, 2, 1], ids=["mha", "gqa", "mqa"])
def test_attention_matches_float64_reference(n_kv_head):
    torch.manual_seed(0)
    attn = CausalSelfAttention(config(n_kv_head=n_kv_head)).double().eval()
    with torch.no_grad():
        attn.qkv.bias.normal_()
        attn.proj.bias.normal_()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    positions = torch.arange(9).expand(2, 9)
    with torch.no_grad():
        ours = attn(x, positions, Positional(), None, causal=True)
        # The explicit-mask path (used with padding) must agree too.
        mask = torch.ones(9, 9, dtype=torch.bool).tril()[None, None]
        masked = attn(x, positions, Positional(), mask, causal=False)
    ref = reference_attention(attn, x)
    assert (ours - ref).abs().max().item() < 1e-12
    assert (masked - ref).abs().max().item() < 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_kv_cache_matches_full_forward(dtype):
    model = make_model(dtype)
    idx = tokens(3, 20)
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(3, 20)
        steps = [model(idx[:, :6], cache=cache), model(idx[:, 6:9], cache=cache)]  # prefill, then a chunk
        steps += [model(idx[:, t : t + 1], cache=cache) for t in range(9, 20)]  # then one token at a time
    cached = torch.cat(steps, dim=1)
    assert cache.length == 20 and cached.shape == full.shape == (3, 20, VOCAB)
    diff = (cached - full).abs().max().item()
    print(f"kv cache vs full forward ({dtype}): max abs logit diff {diff:.2e}")
    assert diff < 1e-5


def test_kv_cache_full_raises():
    model = make_model()
    cache = model.new_cache(1, 4)
    with torch.no_grad():
        model(tokens(1, 4), cache=cache)
        with pytest.raises(ValueError, match="KV cache full"):
            model(tokens(1, 1), cache=cache)


def left_pad(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    idx = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        idx[i, T - len(s) :] = s
        mask[i, T - len(s) :] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # 0 at each sequence's first real token
    return idx, mask, positions


def test_left_padded_batch_matches_each_sequence_alone():
    model = make_model()
    seqs = [tokens(1, n, seed=n)[0] for n in (11, 4, 8)]
    idx, mask, positions = left_pad(seqs)
    with torch.no_grad():
        batch = model(idx, positions=positions, attention_mask=mask)
        assert torch.isfinite(batch).all()  # padding rows too (no all-masked rows)
        for i, s in enumerate(seqs):
            alone = model(s[None])[0]
            diff = (batch[i, -len(s) :] - alone).abs().max().item()
            assert diff < 1e-10, (i, diff)


def test_left_padded_batch_with_kv_cache_matches_each_sequence_alone():
    model = make_model()
    seqs = [tokens(1, n, seed=n)[0] for n in (9, 3, 6)]
    more = tokens(3, 5, seed=99)  # tokens fed one at a time after the prompts
    idx, mask, positions = left_pad(seqs)
    with torch.no_grad():
        cache = model.new_cache(3, idx.shape[1] + 5)
        out = [model(idx, positions=positions, attention_mask=mask, cache=cache)[:, -1:]]
        next_pos = positions[:, -1:] + 1
        for t in range(5):
            out.append(model(more[:, t : t + 1], positions=next_pos + t, cache=cache))
        decoded = torch.cat(out, dim=1)  # logits of the last prompt token and of each new token
        for i, s in enumerate(seqs):
            alone = model(torch.cat([s, more[i]])[None])[0, len(s) - 1 :]
            diff = (decoded[i] - alone).abs().max().item()
            assert diff < 1e-10, (i, diff)


def test_padded_vocab_returns_exactly_vocab_size_columns():
    model = make_model()
    assert model.config.padded_vocab_size == 1024 and model.wte.weight.shape[0] == 1024
    with torch.no_grad():
        assert model(tokens(2, 7)).shape == (2, 7, VOCAB)
        assert model(tokens(2, 7), last_only=True).shape == (2, 1, VOCAB)
    untied = make_model(tie_embeddings=False)
    assert untied.lm_head.weight.shape[0] == 1024
    with torch.no_grad():
        assert untied(tokens(2, 7)).shape == (2, 7, VOCAB)


def test_loss_equals_cross_entropy_of_the_logits():
    model = make_model()
    idx = tokens(2, 12)
    targets = tokens(2, 12, seed=5)
    targets[0, :3] = -1  # ignored
    with torch.no_grad():
        logits = model(idx)
        loss = model(idx, targets=targets)
    expected = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=-1)
    keep = targets.reshape(-1) != -1
    logp = torch.log_softmax(logits.reshape(-1, VOCAB)[keep], dim=-1)
    by_hand = -logp.gather(1, targets.reshape(-1)[keep, None]).mean()
    assert loss.shape == () and abs(loss.item() - expected.item()) < 1e-6
    assert abs(loss.item() - by_hand.item()) < 1e-6


def test_loss_keeps_float64_precision():
    model = make_model()
    idx, targets = tokens(2, 12), tokens(2, 12, seed=5)
    with torch.no_grad():
        loss = model(idx, targets=targets)
        expected = F.cross_entropy(model(idx).reshape(-1, VOCAB), targets.reshape(-1))
    assert loss.dtype == torch.float64 and abs(loss.item() - expected.item()) < 1e-12
