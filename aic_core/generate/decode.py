"""Text generation: one sampler chain and one decoding loop, used by the CLI, streaming and batches.

Prompts of different lengths are left-padded into one batch: slot s of every row is step s of the
loop, so one KV-cache write index serves the whole batch. Padding slots are masked out of attention and
every real token gets its absolute position (0 at its prompt's first real token), so a prompt decodes
the same alone as inside a batch.

With the KV cache the prompt is one forward pass and every later token one call of the static decode
step (Transformer.decode, then the sampler chain): fixed shapes, the slot, the tokens and the sampling
state kept on the device, so on CUDA the step is captured once in a CUDA graph and replayed. The host
reads the new tokens once per block of steps and makes text incrementally, decoding a window of recent
tokens rather than the whole text.
"""

from __future__ import annotations

import functools
import typing
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence

import torch

from aic_core.errors import GenerationError
from aic_core.generate.sampling import sample_next
from aic_core.model.nn.transformer import Transformer
from aic_core.plugins.kinds import Tokenizer
from aic_core.spec import DecodeStep, SamplerSpec

# --- decoding ------------------------------------------------------------------------------------

# How the cached path runs its one-token step (Transformer.decode, then the sampler chain):
#   eager    called from Python at every step (any device)
#   graph    captured once in a CUDA graph and replayed: one launch per step
#   compile  torch.compile'd (fused kernels; inductor without CUDA graphs of its own), then captured
#   auto     on CUDA: CUDA_STEP, falling back (with a warning) to the simpler ones if capture fails, as it
#            does for a positional plugin that syncs with the host; elsewhere: eager
DECODE_STEPS: tuple[str, ...] = typing.get_args(DecodeStep)
CUDA_STEP = "graph"  # its first call is quick; "compile" adds seconds of compilation to every new process
SYNC_EVERY = 16  # on an accelerator: decode steps between two reads of the new tokens
CACHE_MULTIPLE = 64  # the cache length is rounded up to this: aligned attention masks, fewer distinct shapes


def generate(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: list[str | list[int]],
    max_new_tokens: int,
    sampler: SamplerSpec,
    stop: Sequence[str] = (),
    seed: int = 0,
    use_cache: bool = True,
    decode_step: str = "auto",
    stop_ids: Sequence[int] = (),
) -> list[str]:
    """The generated text of each prompt (without the prompt). See `stream`."""
    texts = [""] * len(prompts)
    args = (stop, seed, use_cache, decode_step, stop_ids)
    for deltas in stream(model, tokenizer, prompts, max_new_tokens, sampler, *args):
        texts = [t + d for t, d in zip(texts, deltas)]
    return texts


def stream(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: list[str | list[int]],
    max_new_tokens: int,
    sampler: SamplerSpec,
    stop: Sequence[str] = (),
    seed: int = 0,
    use_cache: bool = True,
    decode_step: str = "auto",
    stop_ids: Sequence[int] = (),
) -> Iterator[list[str]]:
    """Yield, for each decoding step, one text delta per prompt ("" when it has nothing new). A prompt is a text, or
    the ids of one (a conversation rendered by its chat template, special tokens and all).

    A sequence ends at eos or one of `stop_ids` (an end-of-turn token; neither emitted), when its generated text
    contains a stop string (the text is cut before it), or after max_new_tokens. The model is expected in eval mode.
    Bad requests raise GenerationError here, before any work, not at the first step.

    use_cache=False recomputes the whole sequence at every step (the reference). With the cache, the
    prompt is one forward pass and every later token one static decode step run as `decode_step` says
    (DECODE_STEPS). On an accelerator the device runs up to SYNC_EVERY steps ahead: the deltas come in
    bursts, one list per step all the same, and a seed gives the same tokens on every path.
    """
    prompt_ids = _encode_prompts(model, tokenizer, prompts, max_new_tokens)
    step_modes = _step_modes(decode_step, use_cache, model.wte.weight.device)
    stops = [s for s in stop if s]
    return _decode(
        model, tokenizer, prompt_ids, max_new_tokens, sampler, stops, seed, use_cache, step_modes, tuple(stop_ids)
    )


def _step_modes(decode_step: str, use_cache: bool, device: torch.device) -> tuple[str, ...]:
    """The ways to run the decode step to try, in order (see DECODE_STEPS)."""
    if decode_step not in DECODE_STEPS:
        raise GenerationError(f"decode_step is {decode_step!r}; use one of {', '.join(map(repr, DECODE_STEPS))}.")
    if decode_step == "auto":
        if device.type != "cuda":
            return ("eager",)
        simpler = ("compile", "graph", "eager")
        return simpler[simpler.index(CUDA_STEP) :]
    if not use_cache:
        raise GenerationError(
            f"decode_step is {decode_step!r} but use_cache is false: without the KV cache every step recomputes the "
            "whole sequence and there is no decode step to run. Leave decode_step at 'auto', or set use_cache to true."
        )
    if decode_step in ("graph", "compile") and device.type != "cuda":
        raise GenerationError(
            f"decode_step {decode_step!r} captures the step in a CUDA graph, but the model is on {device.type}. "
            "Use decode_step 'eager' (or 'auto'), or move the model to a CUDA device."
        )
    return (decode_step,)


def _encode_prompts(
    model: Transformer, tokenizer: Tokenizer, prompts: list[str], max_new_tokens: int
) -> list[list[int]]:
    if not prompts:
        raise GenerationError(
            "No prompts to generate from: give at least one prompt (an empty string starts from the "
            "beginning-of-text token)."
        )
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens is {max_new_tokens}; it must be at least 1.")
    start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    context, max_positions = model.config.block_size, model.positional.max_positions
    out = []
    for i, prompt in enumerate(prompts):
        ids = [int(i) for i in prompt] if isinstance(prompt, list) else tokenizer.encode(prompt)
        if not ids:
            if start is None:
                raise GenerationError(
                    f"Prompt {i} is empty and the tokenizer has no bos or eos token to start from; "
                    "give a non-empty prompt."
                )
            ids = [start]
        n = len(ids)
        if n > context and max_positions is not None:  # rope, alibi (max_positions None) run past block_size
            raise GenerationError(
                f"Prompt {i} is {n} tokens long, more than the model's context of {context} tokens (block_size). "
                f"Shorten the prompt to at most {context} tokens."
            )
        if max_positions is not None and n + max_new_tokens > max_positions:
            fix = (
                f"lower max_new_tokens to {max_positions - n}"
                if max_positions > n
                else f"shorten the prompt below {max_positions} tokens"
            )
            raise GenerationError(
                f"Prompt {i} is {n} tokens long and max_new_tokens is {max_new_tokens}, "
                f"so the sequence would reach {n + max_new_tokens} tokens, past the {max_positions} positions the "
                f"positional encoding can represent (learned positions cannot extrapolate). To fix: {fix}, "
                "or use an extrapolating positional encoding such as rope or alibi."
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
    step_modes: tuple[str, ...],
    stop_ids: tuple[int, ...] = (),
) -> Iterator[list[str]]:
    device = model.wte.weight.device
    generator = torch.Generator(device).manual_seed(seed)
    if use_cache:
        steps: _CachedSteps | _RecomputeSteps = _CachedSteps.for_call(
            model, prompt_ids, max_new_tokens, sampler, step_modes
        )
    else:
        steps = _RecomputeSteps(len(prompt_ids), max(map(len, prompt_ids)) + max_new_tokens, sampler, device)
    batch = steps.batch
    batch.fill(prompt_ids, model.positional.max_positions)
    texts = [_TextStream(tokenizer, stop, stop_ids) for _ in prompt_ids]
    # With blocks of several steps, the next block is queued before the host turns the last one into text,
    # so the device does not wait for the host. On the CPU the host is the device: one step at a time.
    block = _sync_every(device)
    ahead = block > 1

    steps.in_use = True
    try:
        steps.first(model, generator)  # the prompt, and the first new token
        read, queued = 0, 1  # decoding steps whose tokens the host has read / that are queued on the device
        while read < max_new_tokens:
            new_ids = batch.generated(read, queued)  # (B, queued - read) on the host: waits for those steps
            start, read = read, queued
            next_block = min(block, max_new_tokens - queued)
            # Not before the first token: it goes out before the step is captured (or compiled).
            run_ahead = ahead and start > 0
            if run_ahead:
                queued += steps.run(model, next_block)
            for step in range(start, read):
                last = step == max_new_tokens - 1
                yield [text.push(row[step - start], last) for text, row in zip(texts, new_ids)]
                if all(text.finished for text in texts):
                    return
            if not run_ahead:
                queued += steps.run(model, next_block)
    finally:
        steps.in_use = False  # a kept capture is free for the next call (not while another stream decodes in it)


def _sync_every(device: torch.device) -> int:
    return 1 if device.type == "cpu" else SYNC_EVERY


class _Batch:
    """The slots of a left-padded batch on the device: tokens, real-token mask, absolute positions (B, slots).

    The prompts end at slot L (the longest prompt's length), the generated tokens follow. `fill` writes a
    new batch into the same tensors, so that a captured decode step can read it.
    """

    def __init__(self, batch_size: int, slots: int, device: torch.device) -> None:
        self.tokens = torch.zeros(batch_size, slots, dtype=torch.long, device=device)  # padding id 0: never attended to
        self.valid = torch.zeros(batch_size, slots, dtype=torch.bool, device=device)
        self.positions = torch.zeros(batch_size, slots, dtype=torch.long, device=device)
        self.slot_ids = torch.arange(slots, device=device)  # (slots,)
        self.prompt_len = 0
        self.padded = False

    def fill(self, prompt_ids: list[list[int]], max_positions: int | None = None) -> None:
        device = self.tokens.device
        L = self.prompt_len = max(len(ids) for ids in prompt_ids)
        tokens = torch.zeros(len(prompt_ids), L, dtype=torch.long)
        for b, ids in enumerate(prompt_ids):
            tokens[b, L - len(ids) :] = torch.tensor(ids)
        self.tokens[:, :L] = tokens.to(device)
        lengths = torch.tensor([len(ids) for ids in prompt_ids], device=device)  # (B,)
        # Slot s of row b holds position s - (L - length_b); padding slots get 0 (a valid, masked, position).
        pads = (L - lengths)[:, None]
        # Slots past the last generated token (the cache rounds its length up, and a graph's scratch slot) are
        # never attended to, but a captured step still looks up their positions: keep them in range for an
        # encoding that has a last position (learned embeddings would index past their table).
        self.positions.copy_(
            (self.slot_ids[None, :] - pads).clamp(min=0, max=None if max_positions is None else max_positions - 1)
        )
        self.valid.copy_(self.slot_ids[None, :] >= pads)  # every generated token is real too
        # Without padding, no mask at all lets attention take its fast causal path.
        self.padded = any(len(ids) < L for ids in prompt_ids)

    def mask(self, end: int) -> torch.Tensor | None:
        """The attention mask of slots [0, end) for a forward pass, None when nothing is padded."""
        return self.valid[:, :end] if self.padded else None

    def generated(self, start: int, stop: int) -> list[list[int]]:
        """The tokens of decoding steps [start, stop), one list per row, on the host."""
        L = self.prompt_len
        return self.tokens[:, L + start : L + stop].tolist()


class _RecomputeSteps:
    """Decoding without a cache: every step runs the whole sequence again. The reference path."""

    def __init__(self, batch_size: int, slots: int, sampler: SamplerSpec, device: torch.device) -> None:
        self.batch, self.sampler = _Batch(batch_size, slots, device), sampler
        self.in_use = False

    def first(self, model: Transformer, generator: torch.Generator) -> None:
        self.generator, self.end = generator, self.batch.prompt_len  # slots [0, end) are known
        self._step(model)

    def run(self, model: Transformer, n: int) -> int:
        for _ in range(n):
            self._step(model)
        return n

    def _step(self, model: Transformer) -> None:
        b, end = self.batch, self.end
        logits = model(b.tokens[:, :end], positions=b.positions[:, :end], attention_mask=b.mask(end), last_only=True)[
            :, -1
        ]
        b.tokens[:, end] = sample_next(logits, b.tokens[:, :end], b.valid[:, :end], self.sampler, self.generator)
        self.end = end + 1


# The last captured decode step of each model, for the next call with the same shapes: capture costs a
# few eager steps, a large share of a short generation. Weak keys: it goes when the model goes.
_CAPTURED: weakref.WeakKeyDictionary[Transformer, _CachedSteps] = weakref.WeakKeyDictionary()


class _CachedSteps:
    """Decoding with the KV cache: the prompt in one forward pass (the prefill), then the static one-token
    step: Transformer.decode and the sampler chain, reading and writing only fixed device buffers, the
    slot included, so that one CUDA graph replays it at every step.

    The batch has one slot more than the cache: the scratch slot, where a graph's warm-up and capture
    write (the cache's last slot and the token after it), which decoding never reads. Holds no reference
    to the model: a kept capture must not keep the model alive.
    """

    def __init__(
        self,
        model: Transformer,
        batch_size: int,
        cache_len: int,
        sampler: SamplerSpec,
        step_modes: tuple[str, ...],
        key: tuple,
    ) -> None:
        device = model.wte.weight.device
        self.sampler, self.step_modes, self.key = sampler, step_modes, key
        self.batch = _Batch(batch_size, cache_len + 1, device)
        self.cache = model.new_cache(batch_size, cache_len)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # the slot of the token the next step feeds
        # The step's random numbers, drawn from the generator outside the step (see sample_next).
        self.noise = torch.ones(batch_size, model.config.vocab_size, device=device) if sampler.temperature > 0 else None
        self._run: Callable[[Transformer], object] | None = None  # the step as it runs: built at the first step
        self.in_use = False

    @classmethod
    def for_call(
        cls,
        model: Transformer,
        prompt_ids: list[list[int]],
        max_new_tokens: int,
        sampler: SamplerSpec,
        step_modes: tuple[str, ...],
    ) -> _CachedSteps:
        """The kept capture when it fits this call and this model as it is now, else new steps."""
        cache_len = -(-(max(map(len, prompt_ids)) + max_new_tokens) // CACHE_MULTIPLE) * CACHE_MULTIPLE
        device = model.wte.weight.device
        # Everything a captured step depends on: the shapes, the sampler, and the model's modules and the
        # memory of its tensors (a graph reads them where they were at capture).
        key = (
            len(prompt_ids),
            cache_len,
            repr(sampler),
            step_modes,
            model.training,
            torch.is_autocast_enabled(device.type),
            tuple(map(id, model.modules())),
            tuple((t.data_ptr(), t.dtype, t.shape) for t in (*model.parameters(), *model.buffers())),
        )
        kept = _CAPTURED.get(model)
        if kept is not None and kept.key == key and not kept.in_use:
            return kept
        return cls(model, len(prompt_ids), cache_len, sampler, step_modes, key)

    def first(self, model: Transformer, generator: torch.Generator) -> None:
        b, L = self.batch, self.batch.prompt_len
        self.generator = generator
        self.cache.reset()
        logits = model(
            b.tokens[:, :L], positions=b.positions[:, :L], attention_mask=b.mask(L), cache=self.cache, last_only=True
        )[:, -1]
        b.tokens[:, L] = sample_next(logits, b.tokens[:, :L], b.valid[:, :L], self.sampler, generator, self._draw())
        self.slot.fill_(L)
        self.fed = L  # the host's count of `slot`, for an eager step's window

    def run(self, model: Transformer, n: int) -> int:
        if self._run is None and n > 0:
            self._run = self._build(model)
        for _ in range(n):
            self._draw()
            self._run(model)
        return n

    def _draw(self) -> torch.Tensor | None:
        return None if self.noise is None else self.noise.exponential_(generator=self.generator)

    def _step(self, model: Transformer, window: int | None = None) -> None:
        """Feed the token at `slot`, sample the next one into slot + 1, advance `slot`: device tensors only.
        `window` (eager steps): look at the first `window` slots only, those up to `slot`."""
        b, s, W = self.batch, self.slot, window
        logits = model.decode(b.tokens.index_select(1, s), b.positions.index_select(1, s), self.cache, s, W)  # (B, V)
        # (B, W): the tokens so far, for the repetition penalty (none without it: fewer kernels a step)
        known = (b.valid & (b.slot_ids <= s))[:, :W] if self.sampler.repetition_penalty != 1.0 else None
        nxt = sample_next(logits, b.tokens[:, :W], known, self.sampler, None, self.noise)  # (B,)
        b.tokens.index_copy_(1, s + 1, nxt[:, None])
        s.add_(1)

    def _eager_step(self, model: Transformer) -> None:
        # On the CPU, attention over the empty slots would cost as much as over full ones; elsewhere the
        # eager step is the very computation a graph replays, so the two give the same tokens.
        self._step(model, window=self.fed + 1 if self.slot.device.type == "cpu" else None)
        self.fed += 1

    def _build(self, model: Transformer) -> Callable[[Transformer], object]:
        for i, mode in enumerate(self.step_modes):
            if mode == "eager":
                return self._eager_step
            try:
                step = self._step if mode == "graph" else torch.compile(self._step, dynamic=False)
                replay = _capture(functools.partial(step, model), self.slot, self.cache.max_len - 1)
            except Exception as exc:  # any failure to compile or capture; re-raised when nothing is left to try
                if i == len(self.step_modes) - 1:
                    raise
                warnings.warn(
                    f"The decode step could not run as {mode!r} ({type(exc).__name__}: {exc}); "
                    f"trying {self.step_modes[i + 1]!r}, which is slower. "
                    f"Pass decode_step={self.step_modes[i + 1]!r} to skip the attempt.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                continue
            _CAPTURED[model] = self
            return lambda model: replay()
        raise AssertionError("step_modes ends with a mode that cannot fail")


def _capture(step: Callable[[], None], slot: torch.Tensor, scratch: int) -> Callable[[], None]:
    """`step` captured in a CUDA graph; the result replays it. The warm-up runs (where torch.compile
    compiles) and the capture feed the scratch slot, which decoding never attends to, so they leave the
    live cache and tokens as they were; `slot` is restored after."""
    live = slot.clone()
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                slot.fill_(scratch)
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        slot.fill_(scratch)
        rng = torch.cuda.default_generators[torch.cuda.current_device()]  # the generator a capture registers
        rng_state = rng.get_state()
        try:
            with torch.cuda.graph(graph):
                step()
        except BaseException:
            _release(rng, rng_state)
            raise
    finally:
        slot.copy_(live)
    return graph.replay


def _release(rng: torch.Generator, state: torch.Tensor) -> None:
    """Undo what a failed capture leaves in the device's default generator. The capture marks it as capturing
    and only a capture that ends well clears the mark; left marked, every later random draw outside a capture
    (dropout in training, a CUDA generator's sampling) raises "Offset increment outside graph capture
    encountered unexpectedly". A fresh state is put in its place, with the seed and offset it had before."""
    fresh = torch.Generator(rng.device)
    fresh.set_state(state)
    rng.graphsafe_set_state(fresh.graphsafe_get_state())


class _TextStream:
    """One row's generated text, made token by token without decoding the whole text again.

    Only a window of recent tokens is decoded (prefix offsets, as HF's TextStreamer and vLLM do): the
    text of ids[prefix:read] is known, so the window's text past it is the text of the new tokens, with
    the context the tokenizer needs for spaces and multi-byte characters. That text is confirmed once it
    does not end in '\ufffd' (a byte-fallback character whose other bytes are still to come). A new stop
    string can reach back at most longest - 1 characters into the confirmed text, and what was emitted
    never ends before that, so only those characters are kept: each token costs the same, however long
    the text.
    """

    def __init__(self, tokenizer: Tokenizer, stop: list[str], stop_ids: tuple[int, ...] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.ends = {i for i in (tokenizer.eos_id, *stop_ids) if i is not None}
        self.reach = max((len(s) for s in stop), default=1) - 1  # how far back a stop string can start
        self.ids: list[int] = []
        self.prefix = self.read = 0
        self.prefix_text = ""  # decode(ids[prefix:read])
        self.confirmed = 0  # the length of the confirmed text, that of ids[:read]
        self.recent = ""  # its last `reach` characters
        self.emitted = 0  # characters given out so far
        self.finished = False

    def push(self, token: int, last: bool) -> str:
        """Take the next token (last: the final step); return the new text safe to emit, maybe ""."""
        if self.finished:
            return ""
        if token in self.ends:
            self.finished = True
        else:
            self.ids.append(token)
        pending = (
            self.tokenizer.decode(self.ids[self.prefix :])[len(self.prefix_text) :] if self.read < len(self.ids) else ""
        )
        base = self.confirmed - len(self.recent)
        window = self.recent + pending  # the text from character `base` on
        cut = _find_stop(window, self.stop)
        if cut is not None:
            self.finished = True
            end = base + cut
        elif self.finished or last:
            self.finished = True
            end = base + len(window)
        else:
            end = base + len(_hold_back(window, self.stop))
        delta = window[self.emitted - base : end - base] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        if pending and not pending.endswith("\ufffd"):
            self.confirmed += len(pending)
            self.recent = window[len(window) - self.reach :] if self.reach else ""
            self.prefix, self.read = self.read, len(self.ids)
            self.prefix_text = self.tokenizer.decode(self.ids[self.prefix : self.read])
        return delta


def _find_stop(text: str, stop: list[str]) -> int | None:
    """Where the earliest stop string in `text` starts, or None."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(cuts) if cuts else None


def _hold_back(text: str, stop: list[str]) -> str:
    """The part of an unfinished text that is safe to emit: without a trailing '\ufffd' (a byte-fallback
    character whose other bytes are still to come) and without a tail that could start a stop string."""
    text = text.rstrip("\ufffd")
    longest = max((len(s) for s in stop), default=1)
    for k in range(min(len(text), longest - 1), 0, -1):
        if any(s.startswith(text[-k:]) for s in stop):
            return text[:-k]
    return text
