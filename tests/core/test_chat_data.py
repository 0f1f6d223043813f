"""Chat data through the data stage and the loss: rows of conversations in JSONL and Parquet become ids and a loss mask
in the token cache (the same with worker processes), each batch row holds one conversation from its first token, and
the loss covers exactly the assistant turns: a batch's loss equals the sum of its conversations' losses computed
alone, and masked targets change neither the loss nor the gradients."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from aic_core.cli import main
from aic_core.data import encode as data_encode
from aic_core.data.chat import DEFAULT_SPECIALS, LEARN, ChatData, chat_template, targets
from aic_core.data.inputs import ReadOptions
from aic_core.data.tokens import encode_files, load_splits
from aic_core.files import file_sha256
from aic_core.model.loading import load_checkpoint_model
from aic_core.model.nn.loss import IGNORE
from aic_plugins.tokenizers.bpe import BPE
from tests.conftest import tiny_spec, write_spec

SPECIALS = list(DEFAULT_SPECIALS)


def rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        if i % 3 == 0:
            turns = [("human", f"What is {a} plus {b}?"), ("gpt", str(a + b))]
            out.append({"conversations": [{"from": f, "value": v} for f, v in turns]})
        elif i % 3 == 1:
            turns = [("system", "You add."), ("user", f"{a}+{b}"), ("assistant", str(a + b))]
            turns += [("user", "again?"), ("assistant", f"{a + b}, again")]
            out.append({"messages": [{"role": r, "content": c} for r, c in turns]})
        else:
            out.append({"instruction": "Add the numbers.", "input": f"{a} {b}", "output": str(a + b)})
    return out


def write_jsonl(path, items) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in items))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat-tok")
    text = root / "t.txt"
    text.write_text("".join(f"What is {i} plus {i + 3}? {2 * i + 3}. You add. again\n" for i in range(300)))
    tokenizer = BPE().train(BPE.Options(vocab_size=320, special_tokens=SPECIALS), [text], root / "tokenizer.json")
    return tokenizer, file_sha256(root / "tokenizer.json")


def read(**kw) -> ReadOptions:
    return ReadOptions(format="chat", **kw)


def test_the_cache_holds_ids_and_the_mask_of_each_conversation(tok, tmp_path):
    tokenizer, tok_hash = tok
    write_jsonl(tmp_path / "c.jsonl", rows(30))
    data = encode_files([str(tmp_path / "c.jsonl")], "data.train", tokenizer, tok_hash, tmp_path / "cache", read())
    chat = ChatData(data.ids, tokenizer, 64, "truncate", data.n_bytes)
    assert chat.n_conversations == 30
    template = chat_template(None, tokenizer)
    from aic_core.data.chat import messages_of

    for k, row in enumerate(rows(30)):
        enc = template.encode_with_mask(messages_of(row))
        s, n = int(chat.starts[k]), int(chat.lengths[k])
        seg = data.ids[s : s + n]
        assert [int(v) & ((1 << 30) - 1) for v in seg] == enc.ids
        assert [bool(int(v) & LEARN) for v in seg] == enc.mask
    replies = [
        r.get("output") or (r.get("messages") or r.get("conversations"))[-1].get("content", "") for r in rows(30)
    ]
    assert chat.n_bytes > sum(len(x) for x in replies[::3])  # the assistants' text, not the prompts'


def test_workers_give_the_same_cache_bytes(tok, tmp_path, monkeypatch):
    tokenizer, tok_hash = tok
    write_jsonl(tmp_path / "c.jsonl", rows(300))
    one = encode_files([str(tmp_path / "c.jsonl")], "data.train", tokenizer, tok_hash, tmp_path / "a", read(workers=1))
    monkeypatch.setattr(data_encode, "POOL_MIN_BYTES", 0)
    monkeypatch.setattr(data_encode, "TASK_BYTES", 4096)
    two = encode_files([str(tmp_path / "c.jsonl")], "data.train", tokenizer, tok_hash, tmp_path / "b", read(workers=2))
    assert one.ids.tobytes() == two.ids.tobytes() and one.n_bytes == two.n_bytes


def test_parquet_folders_and_globs(tok, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    tokenizer, tok_hash = tok
    items = [r for r in rows(40) if "messages" in r]
    (tmp_path / "shards").mkdir()
    pq.write_table(pa.Table.from_pylist(items), tmp_path / "shards" / "a.parquet")
    write_jsonl(tmp_path / "shards" / "b.jsonl", items)
    data = encode_files([str(tmp_path / "shards")], "data.train", tokenizer, tok_hash, tmp_path / "cache", read())
    half = len(data.ids) // 2
    assert data.ids[:half].tobytes() == data.ids[half:].tobytes()  # the Parquet rows encode as the JSONL ones


def _model(vocab: int, positional: str = "learned"):
    from aic_core.model.nn.positional import Positional  # noqa: F401
    from aic_core.plugins.registry import get_registry
    from aic_core.spec import parse_spec

    registry = get_registry()
    raw = {
        "name": "t",
        "model": {
            "type": "gpt2",
            "n_layer": 2,
            "n_head": 2,
            "n_embd": 32,
            "block_size": 64,
            "dropout": 0.0,
            "positional": {"type": positional},
        },
    }
    raw["tokenizer"] = {"type": "bpe"}
    spec = parse_spec(raw, registry, model_only=True)
    from aic_core.model.loading import build_model

    torch.manual_seed(0)
    return build_model(spec, registry, vocab).eval()


def test_a_batch_loss_is_the_sum_of_its_conversations_alone_and_masked_targets_change_nothing(tok, tmp_path):
    tokenizer, tok_hash = tok
    write_jsonl(tmp_path / "c.jsonl", rows(40))
    data = encode_files([str(tmp_path / "c.jsonl")], "data.train", tokenizer, tok_hash, tmp_path / "cache", read())
    chat = ChatData(data.ids, tokenizer, 63, "truncate", data.n_bytes, pack=False)
    model = _model(tokenizer.vocab_size)
    x, y = chat.batch(seed=3, stream=0, index=5, batch_size=8, seq_len=63)
    counted = (y != IGNORE).sum()
    total = model(x, y) * counted
    alone = 0.0
    for r in range(8):  # each row's conversation alone: no padding, a batch of one
        keep = int((x[r] != 0).nonzero().max()) + 2 if (y[r] != IGNORE).any() else 0
        n = int(min(keep, x.size(1)))
        xr, yr = x[r : r + 1, :n], y[r : r + 1, :n]
        alone = alone + model(xr, yr) * (yr != IGNORE).sum()
    assert torch.allclose(total, alone, rtol=1e-5, atol=1e-5)
    # every target the loss does not cover, changed: the same loss and gradients
    learn = (y != IGNORE).numpy()
    true_next = torch.cat([x[:, 1:], x[:, -1:]], dim=1).numpy()  # the next tokens (the masked ones as they are)
    true_next[learn] = y.numpy()[learn]
    noisy_next = np.where(learn, true_next, np.random.default_rng(0).integers(1, tokenizer.vocab_size, true_next.shape))
    assert (noisy_next != true_next).sum() > learn.size // 4
    results = []
    for nxt in (true_next, noisy_next):
        model.zero_grad()
        loss = model(x, torch.from_numpy(targets(nxt, learn)))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
    assert torch.equal(torch.from_numpy(targets(true_next, learn)), y)


@pytest.mark.parametrize("positional", ["learned", "rope", "alibi"])
def test_a_packed_batch_is_the_sum_of_its_conversations_alone(tok, tmp_path, positional):
    """Several conversations a row: the loss summed over a packed batch, and its gradients, equal those of each
    conversation run alone from position 0 (fp32, 1e-5), whatever the positional encoding."""
    tokenizer, tok_hash = tok
    write_jsonl(tmp_path / "c.jsonl", rows(60))
    data = encode_files([str(tmp_path / "c.jsonl")], "data.train", tokenizer, tok_hash, tmp_path / "cache", read())
    chat = ChatData(data.ids, tokenizer, 63, "truncate", data.n_bytes)
    assert chat.n_rows < chat.n_conversations / 2  # rows hold several conversations
    model = _model(tokenizer.vocab_size, positional)
    x, y, docs = chat.batch(seed=3, stream=0, index=5, batch_size=4, seq_len=63)
    assert int(docs.max()) >= 2
    model.zero_grad()
    packed = model(x, y, docs) * (y != IGNORE).sum()
    packed.backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    alone = torch.zeros(())
    n_alone = 0
    for r in range(x.size(0)):
        for d in docs[r].unique():
            at = (docs[r] == d).nonzero()[:, 0]
            xr, yr = x[r : r + 1, at], y[r : r + 1, at]
            if (yr != IGNORE).any():  # a conversation (the padding has no targets)
                loss = model(xr, yr) * (yr != IGNORE).sum()
                loss.backward()
                alone = alone + loss.detach()
                n_alone += 1
    assert n_alone > x.size(0)
    assert torch.allclose(packed.detach(), alone, rtol=1e-5, atol=1e-5)
    for a, p in zip(packed_grads, model.parameters()):
        assert torch.allclose(a, p.grad, rtol=1e-4, atol=1e-5)


def test_packing_fills_rows_and_keeps_every_conversation_once(tok, tmp_path):
    from aic_core.data.chat import best_fit

    lengths = np.array([64, 10, 50, 3, 30, 30, 4, 60, 1, 64])
    rows_ = best_fit(lengths, 64)
    assert sorted(c for row in rows_ for c in row) == list(range(len(lengths)))
    assert all(lengths[row].sum() <= 64 for row in rows_)
    assert len(rows_) == int(np.ceil(lengths.sum() / 64))  # as few rows as the tokens need, here
    tokenizer, tok_hash = tok
    write_jsonl(tmp_path / "c.jsonl", rows(60))
    data = encode_files([str(tmp_path / "c.jsonl")], "data.train", tokenizer, tok_hash, tmp_path / "cache", read())
    chat = ChatData(data.ids, tokenizer, 63, "truncate", data.n_bytes)
    assert chat.fill > 0.85  # the last row is the only one part empty
    x, y, docs = chat.batch(seed=0, stream=0, index=0, batch_size=8, seq_len=63)
    starts = torch.ones_like(docs, dtype=torch.bool)
    starts[:, 1:] = docs[:, 1:] != docs[:, :-1]
    assert (y[starts.roll(-1, dims=1) & (torch.arange(x.size(1)) < x.size(1) - 1)] == IGNORE).all()  # no target
    # crosses into the next conversation


def test_the_targets_are_the_assistant_turns_only(tok, tmp_path):
    tokenizer, tok_hash = tok
    write_jsonl(tmp_path / "c.jsonl", rows(12))
    data = encode_files([str(tmp_path / "c.jsonl")], "data.train", tokenizer, tok_hash, tmp_path / "cache", read())
    chat = ChatData(data.ids, tokenizer, 63, "truncate", data.n_bytes, pack=False)
    x, y = chat.batch(seed=0, stream=0, index=0, batch_size=16, seq_len=63)
    end, user = tokenizer.special_ids["<|end|>"], tokenizer.special_ids["<|user|>"]
    learned = y[y != IGNORE]
    assert (learned == end).any() and not (learned == user).any()
    assert (x[:, 0] == tokenizer.special_ids["<|system|>"]).sum() + (x[:, 0] == user).sum() == 16  # rows start a turn


def test_overlong_conversations_are_cut_or_dropped_and_counted(tok, tmp_path):
    tokenizer, tok_hash = tok
    write_jsonl(tmp_path / "c.jsonl", rows(30))
    data = encode_files([str(tmp_path / "c.jsonl")], "data.train", tokenizer, tok_hash, tmp_path / "cache", read())
    lengths = ChatData(data.ids, tokenizer, 1000, "truncate").lengths
    limit = int(sorted(lengths)[len(lengths) // 2])
    cut = ChatData(data.ids, tokenizer, limit - 1, "truncate")
    dropped = ChatData(data.ids, tokenizer, limit - 1, "drop")
    over = int((lengths > limit).sum())
    assert cut.n_overlong == dropped.n_overlong == over > 0
    assert len(cut.starts) == 30 and len(dropped.starts) == 30 - over and max(cut.lengths) == limit
    assert len(dropped) < len(cut) < len(ChatData(data.ids, tokenizer, 1000, "truncate"))


def test_splits_log_the_trained_tokens(tok, tmp_path):
    tokenizer, tok_hash = tok
    write_jsonl(tmp_path / "c.jsonl", rows(40))
    lines = []
    train, val = load_splits(
        [str(tmp_path / "c.jsonl")], [], 0.1, tokenizer, tok_hash, tmp_path / "cache", 63, read(), lines.append
    )
    assert len(train.starts) == 36 and len(val.starts) == 4
    assert any(line.startswith("data.train: 36 conversations") and "trained on" in line for line in lines)


# --- runs and bad input -------------------------------------------------------------------------------


def chat_spec(tmp_path, items, **overrides):
    write_jsonl(tmp_path / "chat.jsonl", items)
    spec = tiny_spec(tmp_path / "chat.jsonl", tmp_path / "run", **overrides)
    spec["data"] = {"train": [str(tmp_path / "chat.jsonl")], "format": "chat", **spec.get("data_extra", {})}
    spec["tokenizer"] = {"type": "bpe", "vocab_size": 400, "special_tokens": SPECIALS}
    spec["generate"] = {"prompts": []}
    return spec


def test_a_chat_run_trains_on_the_assistant_turns(tmp_path, capsys):
    spec = chat_spec(tmp_path, rows(120))
    assert main(["run", str(write_spec(tmp_path / "s.json", spec))]) == 0
    out = capsys.readouterr().out
    assert "conversations" in out and "of their tokens trained on (train.loss_on 'assistant')" in out
    loaded = load_checkpoint_model(tmp_path / "run")
    assert loaded.spec.data.format == "chat"


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"train": {"loss_on": "assistant"}, "plain": True}, "train.loss_on: 'assistant' needs chat data"),
        ({"bad": {"messages": [{"role": "user", "content": "q"}]}}, "no assistant turn"),
        (
            {"bad": {"messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": "a"}]}},
            "not a string",
        ),
        (
            {"bad": {"messages": [{"role": "cat", "content": "q"}, {"role": "assistant", "content": "a"}]}},
            "unknown role",
        ),
        (
            {"bad": {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}},
            "out of order",
        ),
        ({"template": "{{ raise_exception('broken') }}"}, "failed to render: broken"),
        ({"template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}, "holds no end-of-turn token"),
        ({"specials": []}, "the tokenizer will have no chat template"),
    ],
)
def test_bad_chat_input_is_one_paragraph_and_exit_2(tmp_path, capsys, change, says):
    items = rows(60)
    if "bad" in change:
        items.insert(7, change["bad"])
    spec = chat_spec(tmp_path, items)
    if change.get("plain"):
        spec["data"] = {"train": [str(tmp_path / "chat.jsonl")]}
        spec["train"]["loss_on"] = "assistant"
    if "template" in change:
        spec["tokenizer"]["chat_template"] = change["template"]
    if "specials" in change:
        spec["tokenizer"]["special_tokens"] = change["specials"]
    code = main(["run", str(write_spec(tmp_path / "s.json", spec))])
    err = capsys.readouterr().err
    assert code == 2 and says in err and "Traceback" not in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()
    if "specials" in change or change.get("plain"):  # refused by the spec's checks: nothing at all written
        assert not (tmp_path / "run").exists()
    if "bad" in change:
        assert "chat.jsonl:8" in err  # the file and line of the bad row


def greedy(model, ids: list[int], n: int, ends: set[int]) -> list[int]:
    """The plainest greedy loop: the whole sequence through the model, argmax, until one of `ends`."""
    new: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(torch.tensor([ids + new]))[0, -1].argmax())
            if token in ends:
                break
            new.append(token)
    return new


def test_aic_chat_message_prints_the_greedy_reply_and_stops_at_the_end_of_turn(tmp_path, capsys, monkeypatch):
    from aic_core.data.chat import ChatTemplate

    spec = chat_spec(tmp_path, rows(120), train={"steps": 30})
    assert main(["run", str(write_spec(tmp_path / "s.json", spec))]) == 0
    loaded = load_checkpoint_model(tmp_path / "run")
    template = chat_template(None, loaded.tokenizer)
    end, eos = template.end_of_turn(), loaded.tokenizer.eos_id
    assert end == loaded.tokenizer.special_ids["<|end|>"]
    messages = [{"role": "system", "content": "You add."}, {"role": "user", "content": "12+30"}]
    ids = template.encode(messages, add_generation_prompt=True)
    args = ["chat", str(tmp_path / "run"), "--system", "You add.", "--message", "12+30", "--temperature", "0"]
    args += ["--max-new-tokens", "12"]
    for stops in ({end, eos}, {eos}):  # as it is; and, to see a long reply from this small model, past the end
        if stops == {eos}:
            monkeypatch.setattr(ChatTemplate, "end_of_turn", lambda self: -1)
        new = greedy(loaded.model, ids, 12, stops)
        capsys.readouterr()
        assert main(args) == 0
        assert capsys.readouterr().out == loaded.tokenizer.decode(new) + "\n"
    assert len(new) == 12 and end in new  # the second reply ran past the end-of-turn token the first stopped at


def test_aic_chat_refuses_a_model_without_a_template(tmp_path, capsys, corpus):
    spec = tiny_spec(corpus, tmp_path / "plain", train={"steps": 1, "warmup_steps": 0}, generate={"prompts": []})
    assert main(["run", str(write_spec(tmp_path / "p.json", spec))]) == 0
    capsys.readouterr()
    assert main(["chat", str(tmp_path / "plain"), "--message", "hi"]) == 2
    err = capsys.readouterr().err
    assert "has no chat template" in err and "Traceback" not in err


def test_the_generate_stage_replies_to_generate_messages(tmp_path, capsys):
    spec = chat_spec(tmp_path, rows(120), train={"steps": 2, "warmup_steps": 0})
    second = [{"role": "system", "content": "s"}, {"role": "user", "content": "3+4"}]
    spec["generate"] = {
        "prompts": ["12"],
        "messages": [[{"role": "user", "content": "1+2"}], second],
        "max_new_tokens": 6,
        "sampler": {"temperature": 0},
    }
    assert main(["run", str(write_spec(tmp_path / "s.json", spec))]) == 0
    samples = (tmp_path / "run" / "samples.txt").read_text()
    assert (
        "=== sample 1" in samples and "=== conversation 2" in samples and "system: s\nuser: 3+4\nassistant: " in samples
    )
    loaded = load_checkpoint_model(tmp_path / "run")
    template = chat_template(None, loaded.tokenizer)
    from aic_core.generate.decode import generate
    from aic_core.spec import SamplerSpec

    ids = template.encode([{"role": "user", "content": "1+2"}], add_generation_prompt=True)
    reply = generate(
        loaded.model, loaded.tokenizer, [ids], 6, SamplerSpec(temperature=0), stop_ids=[template.end_of_turn()]
    )
    assert f"user: 1+2\nassistant: {reply[0]}\n" in samples
    spec["generate"]["messages"] = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]]
    capsys.readouterr()
    assert main(["validate", str(write_spec(tmp_path / "bad.json", spec))]) == 2
    assert "generate.messages[0]: a conversation to reply to ends with a user turn" in capsys.readouterr().err


def train_base(tmp_path, corpus) -> None:
    """A base trained on text, its tokenizer holding the chat tokens, in tmp_path / "base"."""
    base = tiny_spec(corpus, tmp_path / "base", train={"steps": 2, "warmup_steps": 0}, generate={"prompts": []})
    base["tokenizer"] = {"type": "bpe", "vocab_size": 400, "special_tokens": SPECIALS}
    assert main(["run", str(write_spec(tmp_path / "base.json", base))]) == 0


def test_lora_on_chat_data_from_a_base_run(tmp_path, capsys, corpus):
    """The usual path: a base trained on text (its tokenizer has the chat tokens), then LoRA on conversations from it
    (model.init_from); the base's weights stay as they were, and aic chat answers from the adapted run."""
    train_base(tmp_path, corpus)
    write_jsonl(tmp_path / "chat.jsonl", rows(80))
    spec = {
        "name": "lora-chat",
        "output_dir": str(tmp_path / "ft"),
        "data": {"train": [str(tmp_path / "chat.jsonl")], "format": "chat"},
        "model": {"init_from": str(tmp_path / "base")},
        "adapter": {"type": "lora", "r": 4},
        "train": {"steps": 3, "batch_size": 4, "lr": 1e-2, "warmup_steps": 0},
        "eval": {"batches": 2},
        "generate": {"messages": [[{"role": "user", "content": "1+1"}]], "max_new_tokens": 4},
    }
    assert main(["run", str(write_spec(tmp_path / "ft.json", spec))]) == 0
    out = capsys.readouterr().out
    assert "of their tokens trained on" in out and "lora" in out
    before, after = load_checkpoint_model(tmp_path / "base"), load_checkpoint_model(tmp_path / "ft")
    assert after.spec.adapter.type == "lora"
    assert torch.equal(before.model.state_dict()["wte.weight"], after.model.state_dict()["wte.weight"])
    assert "=== conversation 1" in (tmp_path / "ft" / "samples.txt").read_text()


def test_a_chat_run_resumes_exactly(tmp_path):
    import json as _json

    items = rows(100)
    for name in ("straight", "resumed"):
        (tmp_path / name).mkdir()
        spec = chat_spec(tmp_path / name, items, train={"steps": 6, "checkpoint_every": 3, "warmup_steps": 0})
        write_spec(tmp_path / f"{name}.json", spec)
    assert main(["run", str(tmp_path / "straight.json"), "--stage", "tokenizer,train"]) == 0
    assert main(["run", str(tmp_path / "resumed.json"), "--stage", "tokenizer,train", "--stop-at", "3"]) == 0
    assert main(["run", str(tmp_path / "resumed.json"), "--stage", "tokenizer,train", "--resume"]) == 0

    def losses(run):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["loss"] for r in map(_json.loads, lines) if "loss" in r}

    assert losses(tmp_path / "resumed" / "run") == losses(tmp_path / "straight" / "run")


def test_last_turns_are_the_template_prompt_and_the_last_reply(tok, tmp_path):
    from aic_core.data.chat import messages_of

    tokenizer, tok_hash = tok
    items = rows(30)
    write_jsonl(tmp_path / "c.jsonl", items)
    data = encode_files([str(tmp_path / "c.jsonl")], "data.train", tokenizer, tok_hash, tmp_path / "cache", read())
    chat = ChatData(data.ids, tokenizer, 63, "truncate", data.n_bytes)
    template = chat_template(None, tokenizer)
    end = template.end_of_turn()
    pairs = chat.last_turns(20)
    assert len(pairs) == 20
    for (prompt, answer), row in zip(pairs, items):
        messages = messages_of(row)
        assert prompt == template.encode(messages[:-1], add_generation_prompt=True)
        assert answer[-1] == end and tokenizer.decode(answer[:-1]) == messages[-1]["content"]


def test_eval_exact_match_reports_greedy_replies(tmp_path, capsys):
    spec = chat_spec(tmp_path, rows(120))
    spec["eval"] = {**spec.get("eval", {}), "exact_match": 6}
    assert main(["run", str(write_spec(tmp_path / "s.json", spec))]) == 0
    assert "eval: exact match" in capsys.readouterr().out
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    answers = [json.loads(line) for line in (tmp_path / "run" / "answers.jsonl").read_text().splitlines()]
    assert result["exact_match_n"] == len(answers) == 6
    assert result["exact_match"] == sum(a["got"] == a["expected"] for a in answers) / 6
    loaded = load_checkpoint_model(tmp_path / "run")
    from aic_core.generate import generate
    from aic_core.spec import SamplerSpec

    template = chat_template(None, loaded.tokenizer)
    got = generate(
        loaded.model.eval(),
        loaded.tokenizer,
        [loaded.tokenizer.encode_with_special(answers[0]["prompt"])],
        20,
        SamplerSpec(temperature=0),
        stop_ids=[template.end_of_turn()],
        use_cache=False,
    )
    assert got[0].strip() == answers[0]["got"][: len(got[0].strip())]


def test_exact_match_needs_chat_data(tmp_path, capsys):
    spec = chat_spec(tmp_path, rows(20))
    spec["eval"] = {"exact_match": 5}
    spec["train"] = {**spec["train"], "loss_on": "all"}
    assert main(["run", str(write_spec(tmp_path / "s.json", spec))]) == 2
    assert "eval.exact_match: 5" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_full_fine_tuning_on_chat_data_from_an_exported_hf_folder(tmp_path, capsys, corpus):
    """A base exported to a Hugging Face folder (its tokenizer and template in tokenizer.json/tokenizer_config.json),
    then full fine-tuning on conversations from that folder (model.init_from): the folder's tokenizer renders the
    conversations, the weights start as the base's and move."""
    train_base(tmp_path, corpus)
    assert main(["export", str(tmp_path / "base"), "--format", "hf", str(tmp_path / "hf")]) == 0
    write_jsonl(tmp_path / "chat.jsonl", rows(80))
    spec = {
        "name": "hf-chat",
        "output_dir": str(tmp_path / "ft"),
        "data": {"train": [str(tmp_path / "chat.jsonl")], "format": "chat"},
        "model": {"init_from": str(tmp_path / "hf")},
        "train": {"steps": 3, "batch_size": 4, "lr": 1e-2, "warmup_steps": 0},
        "eval": {"batches": 2},
        "generate": {"messages": [[{"role": "user", "content": "1+1"}]], "max_new_tokens": 4},
    }
    assert main(["run", str(write_spec(tmp_path / "ft.json", spec))]) == 0
    assert "of their tokens trained on" in capsys.readouterr().out
    before, after = load_checkpoint_model(tmp_path / "base"), load_checkpoint_model(tmp_path / "ft")
    assert after.tokenizer.special_ids == before.tokenizer.special_ids
    from aic_core.data.chat import DEFAULT_TEMPLATE

    assert after.spec.tokenizer.chat_template in (None, DEFAULT_TEMPLATE)  # the folder's template is the default
    assert not torch.equal(before.model.state_dict()["wte.weight"], after.model.state_dict()["wte.weight"])
    assert "=== conversation 1" in (tmp_path / "ft" / "samples.txt").read_text()
