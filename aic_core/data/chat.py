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
from typing import Any

from aic_core.errors import DataError
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
