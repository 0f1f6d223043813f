"""Generation: each sampler step against a float64 reference, the KV cache and left padding against full
recompute, seeds, stop strings, eos, and the requests refused up front."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aic_core.errors import GenerationError
from aic_core.generate import generate, process_logits, sample_next, stream
from aic_core.model.nn.transformer import Transformer
from aic_core.plugins.kinds import Tokenizer
from aic_core.plugins.registry import Registry
from aic_core.spec import SamplerSpec

REGISTRY = Registry()
GREEDY = SamplerSpec(temperature=0)


# --- a character tokenizer and two tiny models -------------------------------------------------------


class CharTokenizer(Tokenizer):
    """id 0 unk, 1 bos, 2 eos, then one id per character. Every id decodes to exactly one character (the
    specials too), so two equal texts come from equal token ids."""

    SPECIALS = "¿^$"
    ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 .,!?;:'-()"
    bos_id, eos_id = 1, 2

    def __init__(self) -> None:
        self.chars = self.SPECIALS + self.ALPHABET
        self.vocab_size = len(self.chars)  # 50
        self.index = {c: i for i, c in enumerate(self.chars)}

    def encode(self, text: str) -> list[int]:
        return [self.index.get(c, 0) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)


class ByteTokenizer(Tokenizer):
    """id 0 unk, 1 bos, 2 eos, then 3 + each UTF-8 byte; decoding an incomplete character gives '\ufffd'."""

    bos_id, eos_id, vocab_size = 1, 2, 3 + 256

    def encode(self, text: str) -> list[int]:
        return [3 + b for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")


TOK = CharTokenizer()


def build(vocab_size: int = 50, block_size: int = 64, **options) -> Transformer:
    gpt2 = REGISTRY.get("model", "gpt2")
    opts = gpt2.Options(
        block_size=block_size, vocab_size=vocab_size, **{"n_layer": 2, "n_head": 2, "n_embd": 32, **options}
    )
    cfg = gpt2.config(opts, vocab_size)
    return gpt2.build(opts, cfg, REGISTRY.get("positional", "learned").build(None, cfg)).eval()


@pytest.fixture(scope="module")
def model() -> Transformer:
    """A random tiny gpt2 with weights larger than the init's: its greedy text varies with the context
    (the init's tied, nearly flat logits just repeat the last token), and its greedy choices are not
    near-ties that float rounding between the cached and recomputed paths could flip."""
    torch.manual_seed(0)
    m = build(tie_embeddings=False)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return m


def chain_model(successors: dict[int, int], vocab_size: int) -> Transformer:
    """A real gpt2 rigged so that the next token depends only on the last one: x -> successors[x].
    One-hot embeddings, no position embeddings, a block that adds nothing to the residual stream, and an
    LM head that scores each token's successor highest."""
    n = math.ceil(vocab_size / 64) * 64  # the padded vocabulary, so the embeddings can be one-hot
    m = build(vocab_size, n_layer=1, n_head=1, n_embd=n, tie_embeddings=False)
    with torch.no_grad():
        for p in m.blocks.parameters():
            p.zero_()
        m.positional.wpe.weight.zero_()
        m.wte.weight.copy_(torch.eye(n))
        m.lm_head.weight.zero_()
        for x, y in successors.items():
            m.lm_head.weight[y, x] = 100.0
    return m


def cycle_model(text: str, last: int = CharTokenizer.eos_id) -> Transformer:
    """bos -> text[0] -> text[1] -> ... -> text[-1] -> `last`."""
    ids = [TOK.bos_id] + TOK.encode(text)
    return chain_model({**dict(zip(ids, ids[1:])), ids[-1]: last}, TOK.vocab_size)


# --- the sampler chain against float64 references -----------------------------------------------------

LOGITS = torch.tensor(
    [
        [2.0, 1.0, 0.5, -0.5, -1.0, 3.0, 0.0, -2.0],
        [0.3, 0.3, 0.3, -1.0, 1.5, 1.5, -0.2, 0.9],  # ties
    ]
)
PREV = torch.tensor([[0, 3, 3, 6, 7], [4, 3, 0, 0, 1]])
PREV_MASK = torch.tensor([[True, True, True, True, True], [False, False, True, True, True]])  # row 1 left-padded


def ref_penalty(x: np.ndarray, prev: torch.Tensor, mask: torch.Tensor, penalty: float) -> np.ndarray:
    x = x.copy()
    for b in range(len(x)):
        for i in {int(t) for t, ok in zip(prev[b], mask[b]) if ok}:
            x[b, i] = x[b, i] / penalty if x[b, i] > 0 else x[b, i] * penalty
    return x


def ref_top_k(x: np.ndarray, k: int) -> np.ndarray:
    x = x.copy()
    for row in x:
        if k < len(row):
            kth = np.sort(row)[::-1][k - 1]
            row[row < kth] = -np.inf
    return x


def softmax(row: np.ndarray) -> np.ndarray:
    e = np.exp(row - row.max())
    return e / e.sum()


def ref_top_p(x: np.ndarray, p: float) -> np.ndarray:
    """Add tokens from the most likely down until their mass reaches p; tokens tied with the last one stay."""
    x = x.copy()
    for row in x:
        probs, mass, kept = softmax(row), 0.0, []
        for i in np.argsort(-row, kind="stable"):
            kept.append(i)
            mass += probs[i]
            if mass >= p:
                break
        row[row < row[kept].min()] = -np.inf
    return x


def ref_min_p(x: np.ndarray, m: float) -> np.ndarray:
    x = x.copy()
    for row in x:
        probs = softmax(row)
        row[probs < m * probs.max()] = -np.inf
    return x


def check(sampler: SamplerSpec, expected: np.ndarray, logits: torch.Tensor = LOGITS) -> None:
    got = process_logits(logits, PREV[: len(logits)], PREV_MASK[: len(logits)], sampler)
    assert got.dtype == torch.float32
    got = got.double().numpy()
    np.testing.assert_array_equal(np.isinf(got), np.isinf(expected))  # the same tokens filtered
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    x = LOGITS.double().numpy()
    check(SamplerSpec(temperature=0, repetition_penalty=1.3), ref_penalty(x, PREV, PREV_MASK, 1.3))
    # Row 1's padding (ids 4 and 3) is not "seen": only 0 and 1 are penalized.
    got = process_logits(LOGITS, PREV, PREV_MASK, SamplerSpec(temperature=0, repetition_penalty=2.0))
    assert got[1].tolist() == pytest.approx([0.15, 0.15, 0.3, -1.0, 1.5, 1.5, -0.2, 0.9])
    # No mask means every previous id is real.
    got = process_logits(LOGITS, PREV, None, SamplerSpec(temperature=0, repetition_penalty=2.0))
    assert got[1].tolist() == pytest.approx([0.15, 0.15, 0.3, -2.0, 0.75, 1.5, -0.2, 0.9])


def test_temperature_scales_logits_and_zero_leaves_them():
    x = LOGITS.double().numpy()
    check(SamplerSpec(temperature=0.7), x / 0.7)
    check(SamplerSpec(temperature=0), x)


def test_top_k_keeps_the_k_largest_and_ties_with_the_kth():
    x = LOGITS.double().numpy()
    for k in (1, 2, 3, 4, 5):
        check(SamplerSpec(temperature=1, top_k=k), ref_top_k(x, k))
    got = process_logits(LOGITS, PREV, PREV_MASK, SamplerSpec(temperature=1, top_k=1))
    assert torch.isfinite(got[1]).tolist() == [False, False, False, False, True, True, False, False]  # 1.5 twice
    for k in (8, 100):  # k >= V keeps all
        check(SamplerSpec(temperature=1, top_k=k), x)


def test_top_p_keeps_the_smallest_set_reaching_p():
    three = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.2)]])  # probabilities 0.5, 0.3, 0.2

    def kept(p: float) -> list[bool]:
        logits = process_logits(three, PREV[:1, :0], None, SamplerSpec(temperature=1, top_p=p))
        return torch.isfinite(logits).tolist()[0]

    assert kept(0.4) == [True, False, False]  # the top token alone already reaches 0.4
    assert kept(0.75) == [True, True, False]
    assert kept(0.9) == [True, True, True]
    assert kept(1e-6) == [True, False, False]  # the top token is always kept

    x = LOGITS.double().numpy()
    for p in (0.05, 0.3, 0.5, 0.62, 0.8, 0.9, 0.99):
        check(SamplerSpec(temperature=1, top_p=p), ref_top_p(x, p))
    # Row 1: 1.5 and 1.5 carry about 0.29 each; p = 0.2 is reached by the first, its tie is kept too.
    assert torch.isfinite(process_logits(LOGITS, PREV, None, SamplerSpec(temperature=1, top_p=0.2))[1]).sum() == 2


def test_top_p_one_keeps_every_token_even_the_improbable():
    logits = torch.tensor([[10.0, 0.0, -60.0, -80.0]])  # the last two have probability ~1e-31 and ~1e-39
    got = process_logits(logits, PREV[:1, :0], None, SamplerSpec(temperature=1, top_p=1.0))
    assert torch.equal(got, logits)


def test_min_p_drops_tokens_below_a_fraction_of_the_top_probability():
    x = LOGITS.double().numpy()
    for m in (0.0, 0.05, 0.2, 0.5, 0.9):
        check(SamplerSpec(temperature=1, min_p=m), ref_min_p(x, m))
    # Row 0: probability ratio to the top token is exp(logit - 3); 0.3 keeps 3.0, 2.0 (0.37), drops 1.0 (0.14).
    got = process_logits(LOGITS, PREV, PREV_MASK, SamplerSpec(temperature=1, min_p=0.3))
    assert torch.isfinite(got[0]).tolist() == [True, False, False, False, False, True, False, False]


def test_the_steps_compose_in_order():
    x = LOGITS.double().numpy()
    s = SamplerSpec(temperature=0.8, top_k=5, top_p=0.9, min_p=0.1, repetition_penalty=1.2)
    expected = ref_min_p(ref_top_p(ref_top_k(ref_penalty(x, PREV, PREV_MASK, 1.2) / 0.8, 5), 0.9), 0.1)
    check(s, expected)


def test_sample_next_is_greedy_at_temperature_zero_and_follows_the_filtered_distribution():
    s = SamplerSpec(temperature=0, repetition_penalty=3.0)
    # Row 0: 3.0 (id 5) is unseen and stays the largest; row 1: 1.5 twice, argmax takes the first (id 4).
    assert sample_next(LOGITS, PREV, PREV_MASK, s, None).tolist() == [5, 4]

    s = SamplerSpec(temperature=0.7, top_k=4)
    n = 20_000
    draws = sample_next(LOGITS[:1].expand(n, -1), PREV[:1].expand(n, -1), None, s, torch.Generator().manual_seed(0))
    freq = np.bincount(draws.numpy(), minlength=8) / n
    ref = softmax(ref_top_k(LOGITS[:1].double().numpy() / 0.7, 4)[0])
    assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(ref))  # never a filtered token
    np.testing.assert_allclose(freq, ref, atol=0.015)


# --- decoding: the KV cache and left padding against full recompute -----------------------------------

PROMPTS = ["the cat sat", "a", "", "once upon a time, there was"]


def test_cached_greedy_equals_full_recompute_for_a_padded_batch(model):
    cached = generate(model, TOK, PROMPTS, 20, GREEDY, use_cache=True)
    recomputed = generate(model, TOK, PROMPTS, 20, GREEDY, use_cache=False)
    assert cached == recomputed  # each id decodes to one character, so equal texts mean equal ids
    assert any(len(t) >= 10 for t in cached)


@pytest.mark.parametrize("use_cache", [True, False])
def test_each_prompt_alone_equals_the_same_prompt_in_a_left_padded_batch(model, use_cache):
    batch = generate(model, TOK, PROMPTS, 15, GREEDY, use_cache=use_cache)
    alone = [generate(model, TOK, [p], 15, GREEDY, use_cache=use_cache)[0] for p in PROMPTS]
    assert batch == alone


def test_cached_prefill_and_decode_logits_equal_a_full_forward_on_the_unpadded_sequence(model):
    """The protocol `stream` uses: left-pad, give positions from 0 at each row's first real token, prefill
    into the cache with the mask, then one token per step."""
    torch.manual_seed(1)
    prompt_lens, steps = [4, 1, 6], 6
    B, L = len(prompt_lens), max(prompt_lens)
    tokens = torch.zeros(B, L + steps, dtype=torch.long)  # (B, L + steps): padding, prompt, continuation
    valid = torch.zeros(B, L + steps, dtype=torch.bool)
    positions = torch.zeros(B, L + steps, dtype=torch.long)
    for b, n in enumerate(prompt_lens):
        pad = L - n
        tokens[b, pad:] = torch.randint(3, 50, (n + steps,))
        valid[b, pad:] = True
        positions[b, pad:] = torch.arange(n + steps)
    with torch.no_grad():
        cache = model.new_cache(B, L + steps)
        got = [model(tokens[:, :L], positions=positions[:, :L], attention_mask=valid[:, :L], cache=cache)[:, -1]]
        for s in range(L, L + steps - 1):
            got.append(
                model(
                    tokens[:, s : s + 1],
                    positions=positions[:, s : s + 1],
                    attention_mask=valid[:, s : s + 1],
                    cache=cache,
                )[:, -1]
            )
        for b in range(B):
            real = tokens[b, valid[b]][None]  # (1, n + steps), no padding
            full = model(real)[0]  # (n + steps, V)
            for step, logits in enumerate(got):
                diff = (logits[b] - full[prompt_lens[b] - 1 + step]).abs().max().item()
                assert diff < 1e-5, (b, step, diff)


# --- seeds, stop strings, eos ---------------------------------------------------------------------------


def test_the_same_seed_gives_the_same_text_and_another_seed_another():
    torch.manual_seed(0)
    m = build()  # the init's nearly flat logits: sampling at temperature 1 is close to uniform
    s = SamplerSpec(temperature=1.0)
    a = generate(m, TOK, ["hello", "x"], 24, s, seed=3)
    assert generate(m, TOK, ["hello", "x"], 24, s, seed=3) == a
    assert generate(m, TOK, ["hello", "x"], 24, s, seed=4) != a


def test_eos_ends_a_sequence_and_is_not_emitted():
    m = cycle_model("ghij")  # bos -> g -> h -> i -> j -> eos
    # Row 0 ends at eos after 4 steps and then yields ""; row 1 (prompt: the bos character) runs one more.
    steps = list(stream(m, TOK, ["g", "^"], 10, GREEDY))
    assert steps == [["h", "g"], ["i", "h"], ["j", "i"], ["", "j"], ["", ""]]
    assert generate(m, TOK, ["g"], 10, GREEDY) == ["hij"]


def test_an_empty_prompt_starts_from_bos():
    assert generate(cycle_model("abc"), TOK, [""], 10, GREEDY) == ["abc"]


def test_stop_strings_cut_the_text_and_end_the_sequence_without_emitting_it():
    m = cycle_model("abcdefghij")
    # "d" could start the stop string "de", so it is held back until "e" decides.
    assert list(stream(m, TOK, ["a"], 20, GREEDY, stop=["de"])) == [["b"], ["c"], [""], [""]]
    # A held-back tail that turns out not to be the stop string is released with the next character.
    assert list(stream(m, TOK, ["a"], 5, GREEDY, stop=["cdx"])) == [["b"], [""], [""], ["cde"], ["f"]]
    # The earliest stop string wins; a stopped row yields "" while the others go on.
    steps = list(stream(m, TOK, ["a", "f"], 20, GREEDY, stop=["hi", "cd"]))
    assert ["".join(d[0] for d in steps), "".join(d[1] for d in steps)] == ["b", "g"]
    assert len(steps) == 3  # row 0 stops at "bcd", row 1 at "ghi"
    # Only the generated text is searched: the prompt "g" holds the stop string but is not cut.
    assert generate(m, TOK, ["a", "g"], 20, GREEDY, stop=["g"]) == ["bcdef", "hij"]
    assert generate(m, TOK, ["a"], 20, GREEDY, stop=["zz"]) == ["bcdefghij"]  # never met: ends at eos


def test_incomplete_utf8_characters_are_held_back_until_complete():
    tok = ByteTokenizer()
    ids = [tok.bos_id] + tok.encode("hé!")  # é is two bytes
    m = chain_model({**dict(zip(ids, ids[1:])), ids[-1]: tok.eos_id}, tok.vocab_size)
    assert list(stream(m, tok, [""], 10, GREEDY)) == [["h"], [""], ["é"], ["!"], [""]]


# --- requests refused up front -----------------------------------------------------------------------


def test_a_prompt_longer_than_the_context_is_refused_before_any_work(model):
    with pytest.raises(GenerationError) as err:
        stream(model, TOK, ["ok", "x" * 65], 1, GREEDY)  # raises on the call, not at the first step
    msg = str(err.value)
    assert "Prompt 1" in msg and "65 tokens" in msg and "64" in msg and "Shorten" in msg


def test_a_sequence_past_the_learned_positions_is_refused_with_the_largest_allowed_length(model):
    with pytest.raises(GenerationError) as err:
        generate(model, TOK, ["x" * 60], 10, GREEDY)
    msg = str(err.value)
    assert "Prompt 0" in msg and "60 tokens" in msg and "lower max_new_tokens to 4" in msg and "rope" in msg
    assert len(generate(model, TOK, ["x" * 60], 4, GREEDY)[0]) <= 4  # the suggested fix works


def test_no_prompts_are_refused(model):
    with pytest.raises(GenerationError, match="No prompts"):
        generate(model, TOK, [], 5, GREEDY)
