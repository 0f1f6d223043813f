"""Chat templates and chat rows (aic_core/data/chat.py), against transformers: on the HF export of a run,
`AutoTokenizer.apply_chat_template` gives exactly aic's ids for many conversations, with and without a system turn and
a generation prompt, for the built-in template and a template of HF's own style; the loss mask covers each assistant
turn through its end-of-turn token; rows in the OpenAI, ShareGPT and Alpaca forms, and the bad ones."""

from __future__ import annotations

import json
import random

import pytest

from aic_core.cli import main
from aic_core.data.chat import DEFAULT_SPECIALS, DEFAULT_TEMPLATE, chat_template, messages_of
from aic_core.errors import DataError
from aic_core.model.loading import hf_tokenizer, load_checkpoint_model
from aic_core.plugins.registry import get_registry
from tests.conftest import EXAMPLE_CORPUS, tiny_spec, write_spec

transformers = pytest.importorskip("transformers")

# A template as Hugging Face models write them: bos at the start, role headers, eos after each assistant turn.
HF_STYLE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>\n{{ message['content'] }}<|end|>\n"
    "{% elif message['role'] == 'user' %}<|user|>\n{{ message['content'] }}<|end|>\n"
    "{% else %}<|assistant|>{{ message['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WORDS = ["Anne", "Elliot", "  spaced", "naïve", "日本", "😀", "1234", "\n", "line\r\n", "Wentworth,", "<|user", "end|>"]


def conversations(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)

    def text() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))

    out = []
    for i in range(n):
        turns = [{"role": "system", "content": text()}] if i % 2 else []
        for _ in range(rng.randint(1, 3)):
            turns += [{"role": "user", "content": text()}, {"role": "assistant", "content": text()}]
        out.append(turns)
    return out


def _run(root, name, tokenizer):
    spec = tiny_spec(EXAMPLE_CORPUS, root / name, train={"steps": 1, "warmup_steps": 0}, generate={"prompts": []})
    spec["tokenizer"] = tokenizer
    assert main(["run", str(write_spec(root / f"{name}.json", spec))]) == 0
    assert main(["export", str(root / name), "--format", "hf", str(root / f"{name}-hf")]) == 0
    return root / name, root / f"{name}-hf"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    specials = list(DEFAULT_SPECIALS)
    return {
        "bpe": _run(root, "bpe", {"type": "bpe", "vocab_size": 800, "special_tokens": specials}),
        "sentencepiece": _run(root, "sp", {"type": "sentencepiece", "vocab_size": 800, "special_tokens": specials}),
        "hf-style": _run(
            root,
            "hfstyle",
            {
                "type": "bpe",
                "vocab_size": 800,
                "bos_token": "<|bos|>",
                "special_tokens": specials,
                "chat_template": HF_STYLE,
            },
        ),
    }


def _apply(hf, messages, add_generation_prompt):
    out = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece", "hf-style"])
def test_apply_chat_template_gives_aic_ids(runs, kind):
    run, folder = runs[kind]
    loaded = load_checkpoint_model(run)
    template = chat_template(loaded.spec.tokenizer.chat_template, loaded.tokenizer)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["chat_template"] == (HF_STYLE if kind == "hf-style" else DEFAULT_TEMPLATE)
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    for messages in conversations(60):
        for prompt in (True, False):
            assert template.encode(messages, prompt) == _apply(hf, messages, prompt), (messages, prompt)
        assert hf.apply_chat_template(messages, tokenize=False) == template.render(messages)


def test_the_template_travels_back_in_on_import(runs, tmp_path):
    _, folder = runs["hf-style"]
    found = hf_tokenizer(folder, get_registry())
    assert found.section["chat_template"] == HF_STYLE
    assert main(["import", "hf", str(folder), str(tmp_path / "imported")]) == 0
    assert load_checkpoint_model(tmp_path / "imported").spec.tokenizer.chat_template == HF_STYLE


@pytest.mark.parametrize("kind", ["bpe", "hf-style"])
def test_the_mask_covers_each_assistant_turn_through_its_end(runs, kind):
    loaded = load_checkpoint_model(runs[kind][0])
    tok = loaded.tokenizer
    template = chat_template(loaded.spec.tokenizer.chat_template, tok)
    end = tok.special_ids["<|end|>"] if kind == "bpe" else tok.eos_id
    assert template.end_of_turn() == end
    for messages in conversations(30, seed=1):
        enc = template.encode_with_mask(messages)
        assert enc.ids == template.encode(messages)
        learned = [i for i, m in zip(enc.ids, enc.mask) if m]
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        tail = [end] if kind == "bpe" else [end, *tok.encode("\n")]  # hf-style turns end with eos and a newline
        assert learned == [i for r in replies for i in [*tok.encode(r), *tail]]
        last = template.encode_with_mask(messages, "last_assistant")
        assert [i for i, m in zip(last.ids, last.mask) if m] == [*tok.encode(replies[-1]), *tail]
        assert all(template.encode_with_mask(messages, "all").mask)


def test_a_template_that_never_ends_the_turn_is_refused(runs):
    tok = load_checkpoint_model(runs["bpe"][0]).tokenizer
    bad = chat_template("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}", tok)
    with pytest.raises(DataError, match="holds no end-of-turn token"):
        bad.encode_with_mask(conversations(1)[0])
    with pytest.raises(DataError, match="not a valid Jinja template"):
        chat_template("{% for m in messages %}", tok)
    failing = chat_template("{{ raise_exception('no system turns, please') }}", tok)
    with pytest.raises(DataError, match="failed to render: no system turns, please"):
        failing.render([])
    sandboxed = chat_template("{{ messages.__class__.__mro__ }}", tok)
    with pytest.raises(DataError, match="failed to render"):
        sandboxed.render([{"role": "user", "content": "x"}])


def test_a_tokenizer_without_the_specials_has_no_template(tmp_path, corpus):
    from aic_plugins.tokenizers.bpe import BPE

    tok = BPE().train(BPE.Options(vocab_size=300), [corpus], tmp_path / "t.json")
    with pytest.raises(DataError, match="has no chat template"):
        chat_template(None, tok)


# --- rows ---------------------------------------------------------------------------------------------


def test_rows_in_the_three_forms():
    turns = [("system", "s"), ("user", "q"), ("assistant", "a")]
    openai = {"messages": [{"role": r, "content": c} for r, c in turns]}
    sharegpt = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    alpaca = {"instruction": "Add", "input": "2 3", "output": "5"}
    assert [m["role"] for m in messages_of(openai)] == ["system", "user", "assistant"]
    assert messages_of(sharegpt) == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert messages_of(alpaca) == [{"role": "user", "content": "Add\n\n2 3"}, {"role": "assistant", "content": "5"}]
    custom = {"dialog": [{"from": "asker", "value": "q"}, {"from": "answerer", "value": "a"}]}
    assert len(messages_of(custom, "dialog", {"asker": "user", "answerer": "assistant"})) == 2


@pytest.mark.parametrize(
    ("row", "says"),
    [
        ({"messages": [{"role": "user", "content": "q"}]}, "no assistant turn"),
        ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}, "out of order"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]}, "unknown role 'robot'"),
        ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}, "not a string"),
        ({"messages": [{"role": "user", "content": "<|end|>"}, {"role": "assistant", "content": "a"}]}, "as text"),
        ({"text": "plain"}, "no conversation"),
        ({"messages": []}, "non-empty list"),
    ],
)
def test_bad_rows_say_what_is_wrong(row, says):
    with pytest.raises(ValueError, match=says):
        messages_of(row, specials=DEFAULT_SPECIALS)
