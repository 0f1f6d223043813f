"""The sampler chain: repetition penalty, temperature, top-k, top-p, min-p, then a draw. One chain for the CLI,
streaming, batches and the static decode step (whose draws come from noise made outside the step)."""

from __future__ import annotations

import torch

from aic_core.spec import SamplerSpec


def process_logits(
    logits: torch.Tensor, prev_ids: torch.Tensor, prev_mask: torch.Tensor | None, sampler: SamplerSpec
) -> torch.Tensor:
    """logits (B, V), prev_ids (B, T) long, prev_mask (B, T) bool or None (all real) -> float32 logits
    (B, V) after repetition penalty, temperature, top-k, top-p and min-p. Filtered tokens get -inf."""
    logits = logits.to(torch.float32, copy=True)  # float32: the penalties and cumulative sums need the precision
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
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits (B, V) -> the next token of each row (B,) long. Temperature 0 is greedy (argmax).

    Otherwise a draw from the filtered distribution as torch.multinomial(probs, 1, generator) makes it:
    argmax(probs / noise) with noise ~ Exp(1) (B, V) float32, drawn here from `generator` unless given.
    Given, it lets a captured decode step take its random numbers from a buffer filled outside the graph,
    in the same order, so a seed gives the same tokens on every path."""
    if sampler.temperature == 0 and not changes_logits(sampler):
        return logits.argmax(dim=-1)  # nothing to process: bf16 -> float32 is exact, so the argmax is the same
    logits = process_logits(logits, prev_ids, prev_mask, sampler)
    if sampler.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits, dim=-1)
    if noise is None:
        noise = torch.empty_like(probs).exponential_(generator=generator)
    return probs.div(noise).argmax(dim=-1)


def changes_logits(sampler: SamplerSpec) -> bool:
    """Whether process_logits changes anything but the temperature."""
    return (
        sampler.repetition_penalty != 1.0
        or sampler.top_k is not None
        or (sampler.top_p is not None and sampler.top_p < 1.0)
        or bool(sampler.min_p)
    )
