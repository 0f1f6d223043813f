"""Text generation: one sampler chain and one decoding loop, used by the CLI, streaming and batches.

Prompts of different lengths are left-padded into one batch: slot s of every row is step s of the
loop, so one KV-cache write index serves the whole batch. Padding slots are masked out of attention and
every real token gets its absolute position (0 at its prompt's first real token), so a prompt decodes
the same alone as inside a batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from aic_core.errors import GenerationError
from aic_core.kinds import Tokenizer
from aic_core.nn.transformer import Transformer
from aic_core.spec import SamplerSpec

# --- the sampler chain ---------------------------------------------------------------------------


def process_logits(
    logits: torch.Tensor, prev_ids: torch.Tensor, prev_mask: torch.Tensor | None, sampler: SamplerSpec
) -> torch.Tensor:
    """logits (B, V), prev_ids (B, T) long, prev_mask (B, T) bool or None (all real) -> float32 logits
    (B, V) after repetition penalty, temperature, top-k, top-p and min-p. Filtered tokens get -inf."""
    logits = logits.float().clone()  # float32: the penalties and cumulative sums need the precision
    neg_inf = float("-inf")

    # Repetition penalty (CTRL / HF): make every token already seen less likely, whatever its sign.
    if sampler.repetition_penalty != 1.0 and prev_ids.numel() > 0:
        real = torch.ones_like(prev_ids, dtype=torch.float32) if prev_mask is None else prev_mask.float()
        seen = torch.zeros_like(logits).scatter_add_(1, prev_ids, real) > 0  # (B, V); padding counts 0
        penalized = torch.where(logits > 0, logits / sampler.repetition_penalty, logits * sampler.repetition_penalty)
        logits = torch.where(seen, penalized, logits)

    if sampler.temperature > 0:  # 0 is greedy: the caller takes the argmax, scaling would change nothing
        logits = logits / sampler.temperature

    # Top-k. Tokens tied with the k-th largest logit are all kept, so the result never depends on sort order.
    if sampler.top_k is not None and sampler.top_k < logits.size(-1):
        kth = torch.topk(logits, sampler.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, neg_inf)

    # Top-p (nucleus): the smallest prefix of the sorted tokens whose mass reaches p. A token is kept
    # when the mass *before* it is still < p, so the top token always stays; ties with the last kept
    # token stay too. p = 1 keeps everything (skipped: rounding in the cumsum could drop tiny tokens).
    if sampler.top_p is not None and sampler.top_p < 1.0:
        sorted_logits, _ = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs  # (B, V), non-decreasing
        n_keep = (mass_before < sampler.top_p).sum(-1, keepdim=True)  # (B, 1), >= 1
        threshold = sorted_logits.gather(-1, n_keep - 1)  # (B, 1): the smallest kept logit
        logits = logits.masked_fill(logits < threshold, neg_inf)

    # Min-p: drop tokens much less likely than the most likely one (the bar scales with confidence).
    if sampler.min_p:
        probs = torch.softmax(logits, dim=-1)  # (B, V)
        bar = sampler.min_p * probs.max(dim=-1, keepdim=True).values  # (B, 1)
        logits = logits.masked_fill(probs < bar, neg_inf)
    return logits


def sample_next(
    logits: torch.Tensor,
    prev_ids: torch.Tensor,
    prev_mask: torch.Tensor | None,
    sampler: SamplerSpec,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """logits (B, V) -> the next token of each row (B,) long. Temperature 0 is greedy (argmax)."""
    logits = process_logits(logits, prev_ids, prev_mask, sampler)
    if sampler.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


# --- decoding ------------------------------------------------------------------------------------


def generate(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    sampler: SamplerSpec,
    stop: Sequence[str] = (),
    seed: int = 0,
    use_cache: bool = True,
) -> list[str]:
    """The generated text of each prompt (without the prompt). See `stream`."""
    texts = [""] * len(prompts)
    for deltas in stream(model, tokenizer, prompts, max_new_tokens, sampler, stop, seed, use_cache):
        texts = [t + d for t, d in zip(texts, deltas)]
    return texts


def stream(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    sampler: SamplerSpec,
    stop: Sequence[str] = (),
    seed: int = 0,
    use_cache: bool = True,
) -> Iterator[list[str]]:
    """Yield, for each decoding step, one text delta per prompt ("" when it has nothing new).

    A sequence ends at eos (not emitted), when its generated text contains a stop string (the text is
    cut before it), or after max_new_tokens. The model is expected in eval mode. Bad requests raise
    GenerationError here, before any work, not at the first step.
    """
    prompt_ids = _encode_prompts(model, tokenizer, prompts, max_new_tokens)
    return _decode(model, tokenizer, prompt_ids, max_new_tokens, sampler, [s for s in stop if s], seed, use_cache)


def _encode_prompts(model: Transformer, tokenizer: Tokenizer, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    if not prompts:
        raise GenerationError("No prompts to generate from: give at least one prompt (an empty string starts from the beginning-of-text token).")
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens is {max_new_tokens}; it must be at least 1.")
    start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    context, max_positions = model.config.block_size, model.positional.max_positions
    out = []
    for i, prompt in enumerate(prompts):
        ids = tokenizer.encode(prompt)
        if not ids:
            if start is None:
                raise GenerationError(f"Prompt {i} is empty and the tokenizer has no bos or eos token to start from; give a non-empty prompt.")
            ids = [start]
        n = len(ids)
        if n > context and max_positions is not None:  # rope, alibi (max_positions None) run past block_size
            raise GenerationError(
                f"Prompt {i} is {n} tokens long, more than the model's context of {context} tokens (block_size). "
                f"Shorten the prompt to at most {context} tokens."
            )
        if max_positions is not None and n + max_new_tokens > max_positions:
            fix = f"lower max_new_tokens to {max_positions - n}" if max_positions > n else f"shorten the prompt below {max_positions} tokens"
            raise GenerationError(
                f"Prompt {i} is {n} tokens long and max_new_tokens is {max_new_tokens}, so the sequence would reach "
                f"{n + max_new_tokens} tokens, past the {max_positions} positions the positional encoding can represent "
                f"(learned positions cannot extrapolate). To fix: {fix}, or use an extrapolating positional encoding such as rope or alibi."
            )
        out.append(ids)
    return out


@torch.inference_mode()  # on a generator function: active only while it runs, not in the consumer
def _decode(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt_ids: list[list[int]],
    max_new_tokens: int,
    sampler: SamplerSpec,
    stop: list[str],
    seed: int,
    use_cache: bool,
) -> Iterator[list[str]]:
    device = model.wte.weight.device
    generator = torch.Generator(device).manual_seed(seed)
    B, L = len(prompt_ids), max(len(ids) for ids in prompt_ids)
    total = L + max_new_tokens

    # The whole batch, prompt and generated slots: tokens, real-token mask and absolute positions (B, total).
    tokens = torch.zeros(B, total, dtype=torch.long, device=device)  # padding id 0: never attended to
    valid = torch.zeros(B, total, dtype=torch.bool, device=device)
    lengths = torch.tensor([len(ids) for ids in prompt_ids], device=device)  # (B,)
    for b, ids in enumerate(prompt_ids):
        tokens[b, L - len(ids) : L] = torch.tensor(ids, device=device)
        valid[b, L - len(ids) : L] = True
    # Slot s of row b holds position s - (L - length_b); padding slots get 0 (a valid, masked, position).
    positions = (torch.arange(total, device=device)[None, :] - (L - lengths)[:, None]).clamp(min=0)  # (B, total)
    # Without padding, no mask at all lets attention take its fast causal path.
    padded = bool((lengths < L).any())

    cache = model.new_cache(B, total) if use_cache else None
    eos = tokenizer.eos_id
    generated: list[list[int]] = [[] for _ in range(B)]
    emitted = [""] * B
    finished = [False] * B

    for step in range(max_new_tokens):
        end = L + step  # slots [0, end) are known
        # With a cache, feed only what it does not hold yet: the prompt at step 0, then one token.
        # Without one, recompute the whole sequence (the reference path).
        first = cache.length if cache is not None else 0
        logits = model(
            tokens[:, first:end],
            positions=positions[:, first:end],
            attention_mask=valid[:, first:end] if padded else None,
            cache=cache,
            last_only=True,
        )[:, -1]  # (B, V)
        nxt = sample_next(logits, tokens[:, :end], valid[:, :end], sampler, generator)  # (B,)
        tokens[:, end], valid[:, end] = nxt, True

        deltas = [""] * B
        for b, token in enumerate(nxt.tolist()):
            if finished[b]:
                continue
            if token == eos:
                finished[b] = True
            else:
                generated[b].append(token)
            text, hit = _cut_at_stop(tokenizer.decode(generated[b]), stop)
            finished[b] = finished[b] or hit or step == max_new_tokens - 1
            if not finished[b]:
                text = _hold_back(text, stop)
            # Emit only what extends the emitted text (earlier text is never taken back).
            if len(text) > len(emitted[b]) and text.startswith(emitted[b]):
                deltas[b] = text[len(emitted[b]) :]
                emitted[b] = text
        yield deltas
        if all(finished):
            return


def _cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """The text before the earliest stop string, and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _hold_back(text: str, stop: list[str]) -> str:
    """The part of an unfinished text that is safe to emit: without a trailing '\ufffd' (a byte-fallback
    character whose other bytes are still to come) and without a tail that could start a stop string."""
    text = text.rstrip("\ufffd")
    longest = max((len(s) for s in stop), default=1)
    for k in range(min(len(text), longest - 1), 0, -1):
        if any(s.startswith(text[-k:]) for s in stop):
            return text[:-k]
    return text
