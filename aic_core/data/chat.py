"""Conversations: rows of chat data read into messages, and the chat template that turns messages into token ids and
a loss mask. Training, `aic chat`, the generate stage (and later the server and the eval backend) render through
`ChatTemplate`, the one function.

The template is Jinja in Hugging Face's dialect (`messages`, `add_generation_prompt`, `bos_token`, `eos_token`,
`raise_exception`), rendered in jinja2's sandbox with the settings transformers uses (trim_blocks, lstrip_blocks),
never `eval`. The rendered text is encoded with the tokenizer's special tokens allowed (`encode_with_special`), as
transformers' apply_chat_template does: the template is what writes them. A message whose content types a special
token would be read as that token, so `messages_of` refuses such rows.

Which tokens an assistant turn covers is found by rendering the conversation as it grows: the text a turn adds after
the generation prompt (`add_generation_prompt=True` on the turns before it) is that turn, through its end-of-turn
token. This works for any template, and HF's `{% generation %}` blocks are not needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aic_core.errors import DataError

if TYPE_CHECKING:  # annotations only: the kinds import the training loop, which reads chat data
    from aic_core.plugins.kinds import Tokenizer

ROLES = ("system", "user", "assistant")
# The built-in template: ChatML-like, on four special tokens (tokenizer.special_tokens must list them). Each turn is
# <|role|>content<|end|>; the generation prompt is <|assistant|>. Content starts right after a special token and the
# turn ends with one, so a turn's tokens never merge with its neighbours'.
DEFAULT_SPECIALS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
DEFAULT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# ShareGPT's speakers, and other common names, as roles (data.role_map adds to or overrides this).
DEFAULT_ROLE_MAP = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant", "system": "system"}
LOSS_ON = ("assistant", "last_assistant", "all")


def _environment() -> Any:
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:  # jinja2 comes with torch; a core dependency all the same
        raise DataError('chat templates need jinja2: pip install "jinja2>=3.1.6"') from None
    import jinja2.ext

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
        import json

        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


@dataclass
class Encoded:
    ids: list[int]
    mask: list[bool]  # per token: True where the model learns to produce it (the loss's targets)


class ChatTemplate:
    """A compiled chat template for one tokenizer."""

    def __init__(self, source: str, tokenizer: Tokenizer, where: str = "tokenizer.chat_template") -> None:
        import jinja2

        self.source, self.tokenizer, self.where = source, tokenizer, where
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise DataError(
                f"{where}: not a valid Jinja template (line {exc.lineno}: {exc.message}). Fix the template."
            ) from None
        names = {i: t for t, i in tokenizer.special_ids.items()}
        self.bos_token = names.get(tokenizer.bos_id) if tokenizer.bos_id is not None else None
        self.eos_token = names.get(tokenizer.eos_id) if tokenizer.eos_id is not None else None

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False) -> str:
        import jinja2

        try:
            return self._template.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except jinja2.TemplateError as exc:
            raise DataError(f"{self.where}: the template failed to render: {exc}") from None

    def encode(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False) -> list[int]:
        """The ids of the rendered conversation, as transformers' apply_chat_template(..., tokenize=True) gives."""
        return self.tokenizer.encode_with_special(self.render(messages, add_generation_prompt))

    def encode_with_mask(self, messages: Sequence[Mapping[str, Any]], loss_on: str = "assistant") -> Encoded:
        """Ids and the loss mask of a conversation: "assistant" every assistant turn (through its end-of-turn token),
        "last_assistant" the last one, "all" every token. Raises DataError (the caller adds the row's place) where the
        template cannot be split into turns at token boundaries or an assistant turn holds no special token after its
        content (its end of turn)."""
        full = self.render(messages)
        spans: list[tuple[int, int]] = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True)
            through = self.render(messages[: i + 1])
            if not (through.startswith(prompt) and full.startswith(through)):
                raise DataError(
                    f"{self.where}: the template renders the start of a conversation differently as the conversation "
                    "grows (the text before an assistant turn, with add_generation_prompt, is not where that turn "
                    "starts), so the assistant's tokens cannot be told apart. Use a template whose generation prompt "
                    "is exactly what precedes each assistant turn."
                )
            spans.append((len(prompt), len(through)))
        if not spans and loss_on != "all":
            raise DataError("the conversation has no assistant turn, so nothing would be trained on")
        chosen = spans[-1:] if loss_on == "last_assistant" else spans
        cuts = sorted({0, len(full), *(c for span in spans for c in span)})
        ids: list[int] = []
        mask: list[bool] = []
        specials = set(self.tokenizer.special_ids.values())
        for start, end in zip(cuts, cuts[1:]):
            part = self.tokenizer.encode_with_special(full[start:end])
            in_turn = any(a <= start and end <= b for a, b in spans)
            if in_turn and not any(i in specials for i in part):
                raise DataError(
                    f"{self.where}: an assistant turn holds no end-of-turn token (a special token of the tokenizer "
                    f"after the content): it ends {full[max(start, end - 40) : end]!r}. The model would never learn "
                    "to stop; end each assistant turn with a special token, e.g. <|end|> or the eos."
                )
            ids += part
            learn = loss_on == "all" or any(a <= start and end <= b for a, b in chosen)
            mask += [learn] * len(part)
        if ids != self.tokenizer.encode_with_special(full):
            raise DataError(
                f"{self.where}: an assistant turn does not start or end at a token boundary (its first or last "
                "characters merge with the template's text around it), so its tokens cannot be masked exactly. Put a "
                "special token right before each turn's content and end it with one, as the built-in template does."
            )
        return Encoded(ids, mask)

    def end_of_turn(self) -> int:
        """The id that ends an assistant turn (where generation stops): the first special token of a reply's turn."""
        enc = self.encode_with_mask([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
        specials = set(self.tokenizer.special_ids.values())
        return next(i for i, m in zip(enc.ids, enc.mask) if m and i in specials)


def default_template(tokenizer: Tokenizer) -> str | None:
    """The built-in template where the tokenizer has its special tokens, else None."""
    return DEFAULT_TEMPLATE if all(t in tokenizer.special_ids for t in DEFAULT_SPECIALS) else None


def chat_template(source: str | None, tokenizer: Tokenizer, where: str = "tokenizer.chat_template") -> ChatTemplate:
    """The model's chat template: tokenizer.chat_template, else the built-in one; refused where there is none."""
    source = source or default_template(tokenizer)
    if source is None:
        raise DataError(
            f"{where}: this model has no chat template: tokenizer.chat_template is unset, and the tokenizer lacks the "
            f"built-in template's special tokens ({', '.join(DEFAULT_SPECIALS)}). Set tokenizer.chat_template to a "
            "Jinja template, or train the tokenizer with those tokens in tokenizer.special_tokens."
        )
    return ChatTemplate(source, tokenizer, where)


# --- rows ---------------------------------------------------------------------------------------------


def messages_of(
    row: Any,
    messages_field: str | None = None,
    role_map: Mapping[str, str] | None = None,
    specials: Sequence[str] = (),
) -> list[dict[str, str]]:
    """A row of chat data as messages [{"role", "content"}]: the OpenAI form ({"messages": [{"role", "content"}]}),
    ShareGPT's ({"conversations": [{"from", "value"}]}) or Alpaca's ({"instruction", "input", "output"}). Raises
    ValueError with what is wrong (the caller names the file and line)."""
    if not isinstance(row, dict):
        raise ValueError(f"a row is a JSON object, not {type(row).__name__}")
    roles = {**DEFAULT_ROLE_MAP, **(role_map or {})}
    field = messages_field or next((f for f in ("messages", "conversations") if f in row), None)
    if field is None and "instruction" in row and "output" in row:
        messages = [
            {"role": "user", "content": _alpaca_prompt(row)},
            {"role": "assistant", "content": row["output"]},
        ]
    elif field is None or field not in row:
        fields = ", ".join(repr(k) for k in list(row)[:6])
        raise ValueError(
            f"no conversation: expected a {messages_field or 'messages'!r} list (OpenAI), 'conversations' (ShareGPT) "
            f"or 'instruction' + 'output' (Alpaca); its fields: {fields} (data.messages_field names another)"
        )
    else:
        turns = row[field]
        if not isinstance(turns, list) or not turns:
            raise ValueError(f"{field!r} is not a non-empty list of turns")
        messages = []
        for k, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise ValueError(f"{field}[{k}] is not an object")
            role = turn.get("role", turn.get("from"))
            content = turn.get("content", turn.get("value"))
            if not isinstance(role, str):
                raise ValueError(f"{field}[{k}] has no role ('role' or 'from')")
            role = role if role in ROLES else roles.get(role, role)
            if role not in ROLES:
                raise ValueError(
                    f"{field}[{k}]: unknown role {role!r} (known: {', '.join(ROLES)}, and through data.role_map: "
                    f"{', '.join(sorted(roles))})"
                )
            messages.append({"role": role, "content": content})
    for k, message in enumerate(messages):
        if not isinstance(message["content"], str):
            raise ValueError(
                f"turn {k} ({message['role']}): content is {type(message['content']).__name__}, not a string"
            )
        typed = next((t for t in specials if t in message["content"]), None)
        if typed is not None:
            raise ValueError(
                f"turn {k} ({message['role']}): the content holds the special token {typed!r} as text, which the "
                "template's rendering would read as that token"
            )
    _check_order(messages)
    return messages


def _alpaca_prompt(row: dict[str, Any]) -> Any:
    instruction, extra = row["instruction"], row.get("input", "")
    if not isinstance(instruction, str) or not isinstance(extra, str):
        return instruction if not isinstance(instruction, str) else extra
    return f"{instruction}\n\n{extra}" if extra else instruction


def _check_order(messages: list[dict[str, str]]) -> None:
    body = messages[1:] if messages[0]["role"] == "system" else messages
    if not any(m["role"] == "assistant" for m in body):
        raise ValueError("no assistant turn: nothing to learn from this conversation")
    for k, message in enumerate(body):
        expected = "user" if k % 2 == 0 else "assistant"
        if message["role"] != expected:
            where = k + (len(messages) - len(body))
            raise ValueError(
                f"roles out of order: turn {where} is {message['role']!r} where {expected!r} was expected (a "
                "conversation is an optional system turn, then user and assistant turns in alternation)"
            )
    if body[-1]["role"] != "assistant":
        raise ValueError("the conversation ends with a user turn: the last turn must be the assistant's")


# --- chat data: encoding (in the data stage's workers) and batches ------------------------------------

ID_BITS = 30
IDS = (1 << ID_BITS) - 1
START = 1 << ID_BITS  # the first token of a conversation
LEARN = 1 << (ID_BITS + 1)  # a token the loss covers


def pack(enc: Encoded) -> list[int]:
    """A conversation's ids as the token cache stores chat data: uint32, the id in the low 30 bits, LEARN where the
    loss covers the token, START on its first token."""
    return [i | (LEARN if m else 0) | (START if k == 0 else 0) for k, (i, m) in enumerate(zip(enc.ids, enc.mask))]


def _chat_rows(kind: str, payload: Any) -> Any:
    """(line or row within the task, the row, what is wrong or None) of a JSONL block or Parquet rows."""
    import json

    if kind == "parquet-rows":
        yield from ((k, row, None) for k, row in enumerate(payload))
        return
    if kind != "jsonl":
        raise DataError("data.format is 'chat', but a text file was given: chat data is JSONL or Parquet rows")
    for k, raw in enumerate(payload.split(b"\n")):
        if not raw.strip():
            continue
        try:
            yield k, json.loads(raw.decode("utf-8")), None
        except UnicodeDecodeError as exc:
            yield k, None, f"not UTF-8 ({exc.reason} at byte {exc.start} of the line)"
        except ValueError as exc:
            yield k, None, f"not JSON ({getattr(exc, 'msg', exc)} at column {getattr(exc, 'colno', '?')})"


def chat_texts(task: Any, read: Any) -> Any:
    """For the tokenizer's training text: each conversation's contents, a blank line apart, as the data stage's
    `rows` gives documents (text, bytes, ends a document, line or row, problem)."""
    kind, _, _, payload = task
    for k, row, problem in _chat_rows(kind, payload):
        if problem is None:
            try:
                messages = messages_of(row, read.messages_field, dict(read.role_map))
            except ValueError as exc:
                problem = str(exc)
        if problem is not None:
            yield "", 0, False, k, problem
            continue
        text = "\n\n".join(m["content"] for m in messages)
        yield text, len(text.encode("utf-8")), True, k, None


def encode_chat_task(encoder: Any, task: Any) -> tuple[bytes, int, int, list[tuple[int, int, str]], int]:
    """The data stage's Encoder.run for chat data: each row rendered by the chat template, its ids packed with the
    loss mask (`pack`); the bytes counted are those of the text the loss covers (for bits per byte)."""
    import numpy as np

    kind, index, first, payload = task
    tokenizer, (source, loss_on, field, role_map) = encoder.tokenizer, encoder.settings.chat
    if getattr(encoder, "chat", None) is None:
        encoder.chat = chat_template(source, tokenizer)
    template, specials = encoder.chat, set(tokenizer.special_ids.values())
    values: list[int] = []
    n_docs = n_bytes = n_bad = 0
    bad: list[tuple[int, int, str]] = []
    for k, row, problem in _chat_rows(kind, payload):
        if problem is None:
            try:
                messages = messages_of(row, field, dict(role_map), tuple(tokenizer.special_ids))
                enc = template.encode_with_mask(messages, loss_on)
            except (ValueError, DataError) as exc:
                problem = str(exc)
        if problem is not None:
            n_bad += 1
            if len(bad) < 5:
                bad.append((index, first + k, problem))
            continue
        values += pack(enc)
        n_docs += 1
        learned = [i for i, m in zip(enc.ids[1:], enc.mask[1:]) if m and i not in specials]
        n_bytes += len(tokenizer.decode(learned).encode("utf-8"))
    return np.array(values, dtype=np.uint32).tobytes(), n_docs, n_bytes, bad, n_bad


def targets(next_ids: Any, learn: Any) -> Any:
    """The loss's targets: the next token where the loss covers it, else -1 (ignored)."""
    import numpy as np

    return np.where(learn, next_ids, -1)


def best_fit(lengths: Any, capacity: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: the conversations (by index) of each row, every row's lengths summing to at
    most `capacity`. Longest first, each into the fullest row it still fits (else a new row): rows come out nearly
    full, with the few short conversations filling the gaps. Deterministic (ties go by index)."""
    import bisect

    import numpy as np

    order = np.argsort(-np.asarray(lengths), kind="stable")
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    for c in order.tolist():
        n = int(lengths[c])
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, r = free.pop(k)
            rows[r].append(c)
        else:
            room, r = capacity, len(rows)
            rows.append([c])
        if room - n > 0:
            bisect.insort(free, (room - n, r))
    return rows


class ChatData:
    """Conversations from the token cache, as batches of rows of at most seq_len + 1 tokens.

    Packed (`pack`, the default): the conversations are packed once into rows (`best_fit`), several to a row, and
    a batch is `(inputs, targets, documents)`: `documents` numbers each token's conversation, so the model attends
    within a conversation only and restarts positions at each one (`Transformer.forward`), whatever the
    positional encoding: every conversation computes what it would alone. Unpacked: one conversation a row, and a
    batch is `(inputs, targets)`; a row starts at its conversation's first token, and causal attention never
    looks ahead to the padding. Either way a batch is padded to its longest row; the padding, the tokens the loss
    does not cover and a conversation's first token get target -1. `len` is the number of targets the loss
    covers; `n_bytes` the UTF-8 bytes of their text (bits per byte)."""

    def __init__(
        self,
        raw: Any,
        tokenizer: Tokenizer,
        seq_len: int,
        overlong: str,
        n_bytes: int | None = None,
        pack: bool = True,
    ) -> None:
        import numpy as np

        self.raw, self.pack, self.limit = raw, pack, seq_len + 1
        starts = np.flatnonzero(raw & START)
        lengths = np.diff(np.append(starts, len(raw)))
        limit = seq_len + 1
        over = lengths > limit
        self.n_conversations, self.n_overlong = len(starts), int(over.sum())
        keep = ~over if overlong == "drop" else np.ones(len(starts), dtype=bool)
        self.starts, self.lengths = starts[keep], np.minimum(lengths[keep], limit)
        self.whole = lengths[keep] <= limit  # not cut by data.overlong
        self.dropped = overlong == "drop"
        learn = (raw & LEARN) != 0
        if self.n_overlong:  # conversations cut or left out: count what is kept
            self.n_targets = sum(int(learn[s + 1 : s + n].sum()) for s, n in zip(self.starts, self.lengths))
        else:  # a conversation's first token is no target
            self.n_targets = int(learn.sum() - learn[self.starts].sum())
        if n_bytes is None or self.n_overlong:
            specials = np.array(sorted(tokenizer.special_ids.values()) or [-1])
            n_bytes = 0
            for s, n in zip(self.starts, self.lengths):
                seg = raw[s + 1 : s + n]
                ids = seg[(seg & LEARN) != 0] & IDS
                ids = ids[~np.isin(ids, specials)]
                n_bytes += len(tokenizer.decode(ids.tolist()).encode("utf-8"))
        self.n_bytes = n_bytes
        # The rows: each a list of conversations (one each, unpacked), as offsets into `row_convs`.
        rows = best_fit(self.lengths, limit) if pack else [[c] for c in range(len(self.starts))]
        self.row_convs = np.array([c for row in rows for c in row], dtype=np.int64)
        self.row_offsets = np.cumsum([0] + [len(row) for row in rows])
        self.row_tokens = np.array([int(self.lengths[row].sum()) for row in rows], dtype=np.int64)

    def __len__(self) -> int:
        return self.n_targets

    @property
    def n_rows(self) -> int:
        return len(self.row_tokens)

    @property
    def fill(self) -> float:
        """The fraction of the rows' seq_len + 1 tokens that hold conversation tokens (packing's efficiency)."""
        return float(self.row_tokens.sum()) / max(1, self.n_rows * self.limit)

    def last_turns(self, n: int) -> list[tuple[list[int], list[int]]]:
        """(prompt, answer) ids of the first `n` conversations that are whole (not cut by data.overlong) and end with a
        turn the loss covers: the answer is that last run of trained tokens (the last assistant turn and its
        end-of-turn token), the prompt everything before it (through the template's generation prompt)."""
        import numpy as np

        out: list[tuple[list[int], list[int]]] = []
        for s, length, whole in zip(self.starts, self.lengths, self.whole):
            if len(out) == n:
                break
            if not whole:
                continue
            seg = np.asarray(self.raw[s : s + length], dtype=np.int64)
            learn = np.flatnonzero((seg & LEARN) != 0)
            if not len(learn):
                continue
            last = int(learn[-1])
            first = last
            while first > 0 and seg[first - 1] & LEARN:
                first -= 1
            ids = (seg & IDS).tolist()
            out.append((ids[:first], ids[first : last + 1]))
        return out

    def subset(self, lo: int, hi: int, tokenizer: Tokenizer, seq_len: int) -> ChatData:
        """Conversations lo..hi (in cache order) as their own ChatData."""
        a = int(self.starts[lo])
        b = int(self.starts[hi]) if hi < len(self.starts) else len(self.raw)
        return ChatData(self.raw[a:b], tokenizer, seq_len, "drop" if self.dropped else "truncate", pack=self.pack)

    def batch(self, seed: int, stream: int, index: int, batch_size: int, seq_len: int, device: Any = "cpu") -> Any:
        import numpy as np
        import torch

        rng = np.random.default_rng([seed, stream, index])
        pick = rng.integers(0, self.n_rows, size=batch_size)
        width = int(min(self.row_tokens[pick].max(), seq_len + 1))
        w = np.zeros((batch_size, width), dtype=np.int64)
        m = np.zeros((batch_size, width), dtype=bool)
        d = np.zeros((batch_size, width), dtype=np.int64)
        for r, row in enumerate(pick):
            at = 0
            convs = self.row_convs[self.row_offsets[row] : self.row_offsets[row + 1]]
            for k, c in enumerate(convs):
                s, n = int(self.starts[c]), int(min(self.lengths[c], width - at))
                seg = np.asarray(self.raw[s : s + n], dtype=np.int64)
                w[r, at : at + n], m[r, at : at + n], d[r, at : at + n] = seg & IDS, (seg & LEARN) != 0, k
                at += n
            d[r, at:] = len(convs)  # the padding: a document of its own
        same = d[:, 1:] == d[:, :-1]  # a target in the token's own conversation
        x = torch.from_numpy(w[:, :-1].copy())
        y = torch.from_numpy(targets(w[:, 1:], m[:, 1:] & same))
        batch = (x, y, torch.from_numpy(d[:, :-1].copy())) if self.pack else (x, y)
        if torch.device(device).type == "cuda":
            return tuple(t.pin_memory().to(device, non_blocking=True) for t in batch)
        return batch
