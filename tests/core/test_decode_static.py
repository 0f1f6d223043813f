"""The static decode step and the decoding loop around it.

Transformer.decode (one token, the whole preallocated cache, the slot as a device tensor) against the
cached forward pass and a full forward pass of the unpadded sequence, for every positional encoding and
grouped-query attention, with left padding; `generate` on the static path against full recompute and
against a plain greedy loop with a real tokenizer; the sampler's draw against torch.multinomial; blocks of
steps, incremental detokenization, stop strings and incomplete characters against the text of the ids.
On a GPU (marked gpu): the graphed and the compiled step against the eager one.
"""

from __future__ import annotations

import itertools
import math
import re
import warnings
from pathlib import Path

import pytest
import torch

from aic_core.errors import GenerationError
from aic_core.generate import decode as generation
from aic_core.generate import generate, process_logits, sample_next, stream
from aic_core.model.nn.transformer import Transformer
from aic_core.plugins.kinds import Positional, Tokenizer
from aic_core.plugins.registry import Registry
from aic_core.spec import SamplerSpec
from tests.core.test_generation import (
    TOK,
    ByteTokenizer,
    chain_model,
    cycle_model,
)

REGISTRY = Registry()
GREEDY = SamplerSpec(temperature=0)
SAMPLED = SamplerSpec(temperature=0.9, top_k=30, top_p=0.95, min_p=0.01, repetition_penalty=1.3)
PROMPTS = ["the cat sat", "a", "", "once upon a time, there was"]


class SinusoidalAndDecay(Positional):
    """A third-party encoding through the Positional interface alone, using two hooks: sinusoidal embeddings,
    and one distance bias for all heads, (B, 1, Tq, Tk), which attention broadcasts over them."""

    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / 100.0 ** (torch.arange(0, n_embd, 2) / n_embd), persistent=False)

    def embed(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        angles = positions[..., None].float() * self.inv_freq  # (B, T, C/2)
        return x + torch.cat((angles.sin(), angles.cos()), dim=-1).to(x.dtype)

    def attn_bias(self, q_positions: torch.Tensor, k_positions: torch.Tensor) -> torch.Tensor:
        distance = (q_positions[:, :, None] - k_positions[:, None, :]).clamp(min=0).float()  # (B, Tq, Tk)
        return -0.3 * distance[:, None]  # (B, 1, Tq, Tk)


# name -> (model plugin, positional plugin or a Positional class, the model's options): every built-in
# positional encoding, a third-party one, and grouped-query attention.
MODELS = {
    "learned": ("gpt2", "learned", {"n_layer": 2, "n_head": 2, "n_embd": 32, "tie_embeddings": False}),
    "rope": ("gpt2", "rope", {"n_layer": 2, "n_head": 2, "n_embd": 32, "tie_embeddings": False}),
    "alibi": ("gpt2", "alibi", {"n_layer": 2, "n_head": 4, "n_embd": 32, "tie_embeddings": False}),
    "third-party": ("gpt2", SinusoidalAndDecay, {"n_layer": 2, "n_head": 2, "n_embd": 32, "tie_embeddings": False}),
    "llama-gqa": ("llama", "rope", {"n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 32, "mlp_hidden": 64}),
}


def build(name: str, vocab_size: int = 50, block_size: int = 64, seed: int = 0) -> Transformer:
    """A random model with weights larger than the init's, so that its greedy text varies with the context and
    its greedy choices are not near-ties that rounding between two paths could flip."""
    model_name, positional, options = MODELS[name]
    plugin = REGISTRY.get("model", model_name)
    opts = plugin.Options(block_size=block_size, vocab_size=vocab_size, **options)
    cfg = plugin.config(opts, vocab_size)
    if isinstance(positional, str):
        pos_plugin = REGISTRY.get("positional", positional)
        positional = pos_plugin.build(pos_plugin.Options(), cfg)
    else:
        positional = positional(cfg.n_embd)
    torch.manual_seed(seed)
    model = plugin.build(opts, cfg, positional).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module", params=list(MODELS))
def model(request) -> Transformer:
    return build(request.param)


# --- the step against the cached forward pass and full recompute ----------------------------------------


def padded_batch(
    prompt_lens: list[int], steps: int, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokens, valid, positions (B, L + steps): left padding, then each row's tokens from position 0."""
    B, L = len(prompt_lens), max(prompt_lens)
    tokens = torch.zeros(B, L + steps, dtype=torch.long)
    valid = torch.zeros(B, L + steps, dtype=torch.bool)
    positions = torch.zeros(B, L + steps, dtype=torch.long)
    for b, n in enumerate(prompt_lens):
        tokens[b, L - n :] = torch.randint(3, vocab_size, (n + steps,))
        valid[b, L - n :] = True
        positions[b, L - n :] = torch.arange(n + steps)
    return tokens, valid, positions


def test_the_decode_step_gives_the_logits_of_the_cached_forward_and_of_full_recompute(model):
    torch.manual_seed(1)
    prompt_lens, steps = [4, 1, 6], 7
    B, L = len(prompt_lens), max(prompt_lens)
    tokens, valid, positions = padded_batch(prompt_lens, steps, 50)
    with torch.no_grad():
        caches = {}
        for name in ("static", "window", "forward"):
            cache = model.new_cache(B, L + steps + 5)  # slots past the sequence stay stale and must be masked out
            for t in (cache.k, cache.v):
                t.normal_(0, 10.0)
            cache.valid.fill_(True)
            cache.positions.random_(0, 50)
            model(tokens[:, :L], positions=positions[:, :L], attention_mask=valid[:, :L], cache=cache)
            caches[name] = cache
        got = {name: [] for name in caches}
        for s in range(L, L + steps):
            tok, pos, slot = tokens[:, s : s + 1], positions[:, s : s + 1], torch.tensor([s])
            got["static"].append(model.decode(tok, pos, caches["static"], slot))
            got["window"].append(model.decode(tok, pos, caches["window"], slot, window=s + 1))
            got["forward"].append(
                model(tok, positions=pos, attention_mask=valid[:, s : s + 1], cache=caches["forward"])[:, -1]
            )
        for b in range(B):
            full = model(tokens[b, valid[b]][None])[0]  # (n + steps, V): no padding, no cache
            for name, logits in got.items():
                for step, row in enumerate(logits):
                    diff = (row[b] - full[prompt_lens[b] + step]).abs().max().item()
                    assert diff < 1e-5, (name, b, step, diff)


def test_static_decoding_gives_the_tokens_of_full_recompute_for_a_padded_batch(model):
    for sampler in (GREEDY, SAMPLED):  # the same seed draws the same random numbers on both paths
        cached = generate(model, TOK, PROMPTS, 24, sampler, seed=5, use_cache=True)
        recomputed = generate(model, TOK, PROMPTS, 24, sampler, seed=5, use_cache=False)
        assert cached == recomputed  # each id decodes to one character, so equal texts mean equal ids
        assert any(len(t) >= 12 for t in cached)


def test_the_whole_cache_step_a_graph_replays_gives_the_tokens_of_full_recompute(model, monkeypatch):
    """On the CPU the eager step looks at the slots so far only; a CUDA graph replays the step over the whole
    cache, stale slots masked. Run that step here, eagerly."""

    def whole_cache_step(self, model):
        self._step(model)
        self.fed += 1

    monkeypatch.setattr(generation._CachedSteps, "_eager_step", whole_cache_step)
    for sampler in (GREEDY, SAMPLED):
        assert generate(model, TOK, PROMPTS, 24, sampler, seed=5) == generate(
            model, TOK, PROMPTS, 24, sampler, seed=5, use_cache=False
        )


def test_each_prompt_alone_gives_what_it_gives_in_a_left_padded_batch(model):
    batch = generate(model, TOK, PROMPTS, 16, GREEDY)
    assert batch == [generate(model, TOK, [p], 16, GREEDY)[0] for p in PROMPTS]


# --- the sampler's draw ----------------------------------------------------------------------------------


def test_sampling_draws_what_torch_multinomial_draws_from_the_same_generator():
    torch.manual_seed(0)
    logits, prev = torch.randn(6, 300) * 3, torch.randint(0, 300, (6, 20))
    for sampler in (SamplerSpec(temperature=1.0), SAMPLED):
        probs = torch.softmax(process_logits(logits, prev, None, sampler), dim=-1)
        for seed in range(5):
            expected = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed)).squeeze(1)
            got = sample_next(logits, prev, None, sampler, torch.Generator().manual_seed(seed))
            assert torch.equal(got, expected)
            noise = torch.empty(6, 300).exponential_(generator=torch.Generator().manual_seed(seed))
            assert torch.equal(sample_next(logits, prev, None, sampler, None, noise), expected)


# --- text: a real tokenizer, incremental detokenization, stop strings, blocks of steps ----------------


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory) -> Tokenizer:
    text = (Path(__file__).resolve().parents[2] / "examples" / "data" / "northangerabbey.txt").read_text(
        encoding="utf-8"
    )[:60_000]
    folder = tmp_path_factory.mktemp("sp")
    (folder / "corpus.txt").write_text(text, encoding="utf-8")
    plugin = REGISTRY.get("tokenizer", "sentencepiece")
    return plugin.train(plugin.Options(vocab_size=400), [folder / "corpus.txt"], folder / "tokenizer.model")


def greedy_reference(model: Transformer, prompt_ids: list[int], max_new_tokens: int, eos: int) -> list[int]:
    """The plainest greedy loop: the whole unpadded sequence through the model, argmax, until eos."""
    ids, new = list(prompt_ids), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([ids]))[0, -1].argmax())
            if token == eos:
                break
            ids.append(token)
            new.append(token)
    return new


@pytest.mark.parametrize("name", ["learned", "alibi"])
def test_streamed_text_is_the_text_of_a_plain_greedy_loop_with_sentencepiece(sentencepiece, name):
    tok = sentencepiece
    m = build(name, vocab_size=tok.vocab_size, block_size=128)
    prompts = ["Catherine Morland", "“Déjà vu”, said she — ", "I"]
    steps = list(stream(m, tok, prompts, 40, GREEDY))
    for b, prompt in enumerate(prompts):
        expected = tok.decode(greedy_reference(m, tok.encode(prompt), 40, tok.eos_id))
        assert "".join(d[b] for d in steps) == expected


def test_streamed_text_with_broken_utf8_is_the_text_of_the_ids():
    """A random byte-level model writes incomplete and invalid UTF-8: the deltas still join to the decoded ids."""
    tok = ByteTokenizer()
    m = build("learned", vocab_size=tok.vocab_size, block_size=128, seed=3)
    prompts = ["é", "ab"]
    steps = list(stream(m, tok, prompts, 60, GREEDY))
    for b, prompt in enumerate(prompts):
        expected = tok.decode(greedy_reference(m, tok.encode(prompt), 60, tok.eos_id))
        assert "\ufffd" in expected or any(ord(c) > 127 for c in expected)  # the case this test is about
        assert "".join(d[b] for d in steps) == expected


class PieceTokenizer(Tokenizer):
    """Multi-character pieces: id 0 unk, 1 bos, 2 eos, then one id per piece. Counts the ids it decodes."""

    bos_id, eos_id = 1, 2

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = [b"?", b"", b""] + pieces
        self.vocab_size = len(self.pieces)
        self.longest_decode = 0

    def encode(self, text: str) -> list[int]:
        if text:
            raise NotImplementedError("these tests start from the empty prompt (bos)")
        return []

    def decode(self, ids: list[int]) -> str:
        self.longest_decode = max(self.longest_decode, len(ids))
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def piece_chain(tok: PieceTokenizer, ids: list[int]) -> Transformer:
    """bos -> ids[0] -> ids[1] -> ... -> eos (each id at most once)."""
    seq = [tok.bos_id, *ids]
    return chain_model({**dict(itertools.pairwise(seq)), seq[-1]: tok.eos_id}, tok.vocab_size)


def test_a_stop_string_across_token_boundaries_is_cut_and_never_emitted():
    tok = PieceTokenizer([b"ab", b"cd", b"ef", b"gh", b"i"])
    m = piece_chain(tok, [3, 4, 5, 6, 7])  # "ab" "cd" "ef" "gh" "i"
    # "bc" spans the first two pieces: "b" is held back at the first step, then cut.
    assert list(stream(m, tok, [""], 10, GREEDY, stop=["bc"])) == [["a"], [""]]
    # "defg" spans three pieces: the held-back tail grows, then goes.
    assert list(stream(m, tok, [""], 10, GREEDY, stop=["defg"])) == [["ab"], ["c"], [""], [""]]
    # A held-back tail that does not become the stop string is released.
    assert list(stream(m, tok, [""], 10, GREEDY, stop=["fx"])) == [["ab"], ["cd"], ["e"], ["fgh"], ["i"], [""]]


def test_an_incomplete_character_inside_a_token_is_held_back_and_flushed_at_the_end():
    tok = PieceTokenizer(["hé".encode()[:2], "é".encode()[1:] + b"!", "€".encode()[:2]])
    m = piece_chain(tok, [3, 4, 5])  # b"h\xc3" b"\xa9!" b"\xe2\x82"
    assert list(stream(m, tok, [""], 10, GREEDY)) == [["h"], ["é!"], [""], ["\ufffd"]]
    assert generate(m, tok, [""], 3, GREEDY) == ["hé!\ufffd"]  # the last step flushes it too


def test_each_token_decodes_a_short_window_not_the_whole_text():
    tok = PieceTokenizer([bytes([c]) for c in b"abcdefghijklmnopqrstuvwxyz"])
    text_ids = list(range(3, 29)) * 2 + list(range(3, 14))  # 63 tokens, cycling through the alphabet
    m = chain_model({1: 3, **{i: i + 1 for i in range(3, 28)}, 28: 3}, tok.vocab_size)
    expected = tok.decode(text_ids)
    tok.longest_decode = 0
    assert generate(m, tok, [""], len(text_ids), GREEDY) == [expected]
    assert generate(m, tok, [""], len(text_ids), GREEDY, stop=["zab", "qqq"]) == ["abcdefghijklmnopqrstuvwxy"]
    assert tok.longest_decode <= 2


@pytest.mark.parametrize("block", [2, 3, 16])
def test_blocks_of_steps_stream_what_single_steps_stream(monkeypatch, block):
    m = cycle_model("abcdefghij")
    cases = [
        (["a", "f"], 20, ["hi", "cd"]),  # rows end at different steps, on stop strings
        (["g", "^"], 10, []),  # eos
        (["a", "b", "c"], 7, ["zz"]),  # max_new_tokens
    ]
    one_step = [list(stream(m, TOK, p, n, GREEDY, stop=s)) for p, n, s in cases]
    monkeypatch.setattr(generation, "_sync_every", lambda device: block)
    assert [list(stream(m, TOK, p, n, GREEDY, stop=s)) for p, n, s in cases] == one_step
    model = build("rope")
    monkeypatch.setattr(generation, "_sync_every", lambda device: 1)
    expected = list(stream(model, TOK, PROMPTS, 21, SAMPLED, seed=2))
    monkeypatch.setattr(generation, "_sync_every", lambda device: block)
    assert list(stream(model, TOK, PROMPTS, 21, SAMPLED, seed=2)) == expected


# --- requests refused up front ---------------------------------------------------------------------------


def test_a_decode_step_that_cannot_run_is_refused_before_any_work():
    m = cycle_model("ab")
    with pytest.raises(GenerationError, match="'fast'.*'auto', 'eager', 'graph', 'compile'"):
        stream(m, TOK, ["a"], 5, GREEDY, decode_step="fast")
    with pytest.raises(GenerationError, match="CUDA graph, but the model is on cpu.*'eager'"):
        stream(m, TOK, ["a"], 5, GREEDY, decode_step="graph")
    with pytest.raises(GenerationError, match="use_cache is false.*set use_cache to true"):
        stream(m, TOK, ["a"], 5, GREEDY, use_cache=False, decode_step="eager")


# --- on a GPU: the graphed and the compiled step against the eager one ----------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(MODELS))
def test_graphed_decoding_gives_the_tokens_of_eager_decoding_and_of_full_recompute(name):
    model = build(name, block_size=128).cuda()  # learned positions: prompts of up to 27 tokens + 40
    for sampler in (GREEDY, SAMPLED):  # float32: the paths differ only by rounding, far from the greedy margins
        eager = generate(model, TOK, PROMPTS, 40, sampler, seed=3, decode_step="eager")
        assert generate(model, TOK, PROMPTS, 40, sampler, seed=3, decode_step="graph") == eager
        assert generate(model, TOK, PROMPTS, 40, sampler, seed=3, use_cache=False) == eager


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(MODELS))
def test_compiled_decoding_gives_the_tokens_of_eager_decoding(name):
    torch._dynamo.reset()  # each model compiles afresh, far from torch.compile's limit of recompilations
    model = build(name, block_size=128).cuda()
    for sampler in (GREEDY, SAMPLED) if name == "rope" else (GREEDY,):
        eager = generate(model, TOK, PROMPTS, 40, sampler, seed=3, decode_step="eager")
        assert generate(model, TOK, PROMPTS, 40, sampler, seed=3, decode_step="compile") == eager


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(MODELS))
def test_graphed_bf16_decoding_gives_the_tokens_of_eager_bf16_decoding(name):
    """The graph replays the eager step's very kernels, so even in bf16 the tokens are the same."""
    model = build(name, block_size=128).cuda().to(torch.bfloat16)
    eager = generate(model, TOK, PROMPTS, 40, GREEDY, decode_step="eager")
    assert generate(model, TOK, PROMPTS, 40, GREEDY, decode_step="graph") == eager


@pytest.mark.gpu
def test_auto_on_cuda_captures_the_step_without_falling_back():
    model = build("rope").cuda()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto = generate(model, TOK, PROMPTS, 30, GREEDY)
    assert not [w for w in caught if "could not run as" in str(w.message)]
    assert model in generation._CAPTURED  # captured, and kept for the next call
    assert auto == generate(model, TOK, PROMPTS, 30, GREEDY, decode_step="eager")


@pytest.mark.gpu
def test_a_kept_capture_serves_the_next_call_of_the_same_shapes_and_goes_when_the_model_changes():
    model = build("alibi").cuda()
    generate(model, TOK, PROMPTS, 30, GREEDY, decode_step="graph")
    kept = generation._CAPTURED[model]
    others = ["xyz", "hello there", "q", ""]  # the same batch size and, rounded, the same cache length
    assert generate(model, TOK, others, 30, GREEDY, decode_step="graph") == generate(
        model, TOK, others, 30, GREEDY, decode_step="eager"
    )
    assert generation._CAPTURED[model] is kept
    # A module swapped in (as an adapter does): the kept graph would read the old weights.
    old = model.blocks[1].attn.proj
    model.blocks[1].attn.proj = torch.nn.Linear(old.in_features, old.out_features).cuda()
    assert generate(model, TOK, others, 30, GREEDY, decode_step="graph") == generate(
        model, TOK, others, 30, GREEDY, decode_step="eager"
    )
    assert generation._CAPTURED[model] is not kept


@pytest.mark.gpu
def test_two_streams_at_once_on_one_model_do_not_share_a_capture():
    model = build("learned").cuda()
    expected = generate(model, TOK, PROMPTS, 30, GREEDY, decode_step="eager")
    generate(model, TOK, PROMPTS, 30, GREEDY, decode_step="graph")  # leaves a kept capture that both could take
    a, b = (
        stream(model, TOK, PROMPTS, 30, GREEDY, decode_step="graph"),
        stream(model, TOK, PROMPTS, 30, GREEDY, decode_step="graph"),
    )
    texts_a, texts_b = [""] * len(PROMPTS), [""] * len(PROMPTS)
    for deltas_a, deltas_b in zip(a, b):  # one step of each in turn
        texts_a = [t + d for t, d in zip(texts_a, deltas_a)]
        texts_b = [t + d for t, d in zip(texts_b, deltas_b)]
    assert texts_a == texts_b == expected


@pytest.mark.gpu
def test_a_step_that_cannot_be_captured_falls_back_to_eager_with_a_warning():
    """A positional encoding that reads a tensor back to the host inside the step cannot be captured."""
    model = build("learned").cuda()
    positional = model.positional
    embed = positional.embed

    def syncing_embed(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        assert int(positions.max()) < math.inf  # a host sync, as a third-party plugin might do
        return embed(x, positions)

    positional.embed = syncing_embed
    try:
        expected = generate(model, TOK, PROMPTS, 20, GREEDY, decode_step="eager")
        rng = torch.cuda.get_rng_state()
        with pytest.warns(
            RuntimeWarning, match=r"(?s)could not run as 'graph'.*'eager'"
        ):  # (?s): CUDA's message spans lines
            assert generate(model, TOK, PROMPTS, 20, GREEDY) == expected
        # The failed capture leaves the default CUDA generator as it was, and usable: a later training step's
        # dropout raised "Offset increment outside graph capture encountered unexpectedly" before.
        assert torch.equal(torch.cuda.get_rng_state(), rng)
        assert torch.nn.functional.dropout(torch.ones(1000, device="cuda"), 0.5).eq(0).any()
        assert not torch.equal(torch.cuda.get_rng_state(), rng)  # the draw moved it on
    finally:
        del positional.embed


@pytest.mark.parametrize("name", ["learned", "rope"])
def test_the_compiled_step_writes_the_cache_and_gives_the_logits_of_the_eager_step(name):
    """The KV write under torch.compile against the eager one (the same index_copy_, compiled and not),
    on the CPU: keys and values as the matmul gave them (learned) and rotated keys stacked with values (rope)."""
    torch._dynamo.reset()
    model = build(name)
    torch.manual_seed(2)
    tokens, valid, positions = padded_batch([5, 3], 3, 50)
    with torch.no_grad():
        caches = [model.new_cache(2, 16) for _ in range(2)]
        for cache in caches:
            model(tokens[:, :5], positions=positions[:, :5], attention_mask=valid[:, :5], cache=cache)
        compiled = torch.compile(model.decode, dynamic=False)
        for s in range(5, 8):
            tok, pos, slot = tokens[:, s : s + 1], positions[:, s : s + 1], torch.tensor([s])
            eager = model.decode(tok, pos, caches[0], slot)
            got = compiled(tok, pos, caches[1], slot)
            torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(caches[1].kv[:, :, :, :, :8], caches[0].kv[:, :, :, :, :8], rtol=1e-5, atol=1e-5)
        assert caches[1].kv[:, :, :, :, 5:8].abs().sum() > 0  # the steps wrote their slots


@pytest.mark.parametrize("name", ["learned", "rope", "llama-gqa"])
def test_the_compiled_step_writes_the_cache_in_place(name):
    """Inductor's code for the compiled step has no loop over the whole KV buffer, a layer's part of it, or a
    layer's keys: each layer's one-token write is done in place, and attention reads the buffer itself.
    - When the cache kept k and v as views made once, they were graph inputs aliasing `kv`, and the write
      became a copy of the whole cache and a copy back, per layer (a compiled decode step as slow as the
      eager one at batch 16 on an H200).
    - With `kv[layer].index_copy_` under compile, each layer's cache was copied to a fresh buffer, written
      there, and its keys and values copied again for attention (1.5 ms a step at batch 16 on an H100).
    Checked on the CPU's generated C++, whose graph has both faults as the GPU's has."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    model = build(name)
    B, L = 3, 40  # kv.numel() = layers * 2 * B * Hkv * L * head_dim: no other size in the step equals it
    tokens = torch.randint(0, 50, (B, 6))
    positions = torch.arange(6).expand(B, 6).contiguous()
    with torch.no_grad():
        cache = model.new_cache(B, L)
        model(tokens[:, :5], positions=positions[:, :5], cache=cache)
        eager_cache = model.new_cache(B, L)
        model(tokens[:, :5], positions=positions[:, :5], cache=eager_cache)
        got, codes = run_and_get_code(
            torch.compile(model.decode, dynamic=False), tokens[:, 5:], positions[:, 5:], cache, torch.tensor([5])
        )
        eager = model.decode(tokens[:, 5:], positions[:, 5:], eager_cache, torch.tensor([5]))
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.kv, eager_cache.kv, rtol=1e-5, atol=1e-5)
    code = "\n".join(codes)
    assert "kernel" in code  # inductor's code, not an empty capture
    n_layer = cache.kv.shape[0]
    sizes = {
        "the whole KV buffer": cache.kv.numel(),
        "a layer's keys and values": cache.kv[0].numel(),
        "a layer's keys": cache.kv[0, 0].numel(),
    }
    assert (
        len(set(sizes.values()) | {n_layer * model.config.vocab_size, B * model.config.vocab_size}) == 5
    )  # no size stands for another
    for what, n in sizes.items():  # a loop's bound: C++ `x0<static_cast<int64_t>(N L)`, Triton `xnumel = N`
        assert not re.search(rf"<static_cast<int64_t>\({n}L\)|xnumel = {n}\b", code), (
            f"a kernel loops over {what} ({n} elements)"
        )
