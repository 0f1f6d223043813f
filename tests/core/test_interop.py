"""`aic import hf`, `aic export --format hf` and `model.init_from`, checked against transformers."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from aic_core.cli import main
from aic_core.generate import generate
from aic_core.model.convert import export_hf
from aic_core.model.loading import import_hf, load_checkpoint_model
from aic_core.spec import SamplerSpec
from tests.conftest import tiny_spec, write_spec

transformers = pytest.importorskip("transformers")

LLAMA = {"type": "llama", "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 32, "mlp_hidden": 64, "block_size": 32}
GPT2 = {"type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32}


def _train(tmp_path, corpus, name, model, steps=4, **overrides):
    spec = tiny_spec(corpus, tmp_path / name, model=model, train={"steps": steps}, **overrides)
    spec["model"] = model
    assert main(["run", str(write_spec(tmp_path / f"{name}.json", spec))]) == 0
    return tmp_path / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
    """A trained llama+rope run and a gpt2+learned run, shared by the tests of this module."""
    base = tmp_path_factory.mktemp("interop")
    return {
        "llama": _train(base, corpus, "llama", {**LLAMA, "positional": {"type": "rope", "theta": 5000.0}}),
        "gpt2": _train(base, corpus, "gpt2", {**GPT2, "positional": {"type": "learned"}}),
    }


def _hf_logits(folder, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_export_loads_in_transformers_and_round_trip_is_exact(runs, tmp_path, family, capsys):
    out = tmp_path / "hf"
    assert main(["export", str(runs[family]), "--format", "hf", str(out)]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"against transformers \d\.\d\de[-+]\d\d", printed)
    assert {p.name for p in out.iterdir()} == {
        "config.json",
        "model.safetensors",
        "tokenizer.model",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert re.search(r"AutoTokenizer: aic's ids and text on \d+ fixed texts", printed)
    loaded = load_checkpoint_model(runs[family])
    ids = torch.randint(0, loaded.model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = loaded.model(ids)
    assert (_hf_logits(out, ids) - ours).abs().max().item() < 1e-4  # transformers alone, no aic code
    # aic -> HF -> aic: every tensor comes back bit for bit.
    back = import_hf(out).model.state_dict()
    original = loaded.model.state_dict()
    assert set(back) == set(original)
    assert all(torch.equal(back[k], original[k]) for k in original)
    # Greedy decoding in transformers (its own cache) gives aic's greedy text.
    prompt = loaded.tokenizer.encode("Anne was")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    hf_ids = hf_model.generate(
        torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0
    )[0]
    ours_text = generate(loaded.model, loaded.tokenizer, ["Anne was"], 10, SamplerSpec(temperature=0))[0]
    assert loaded.tokenizer.decode(hf_ids[len(prompt) :].tolist()) == ours_text
    # The tokenizer file travels unchanged.
    assert (out / "tokenizer.model").read_bytes() == loaded.checkpoint.tokenizer_path.read_bytes()


def test_import_cli_writes_a_checkpoint_that_generates(runs, tmp_path, capsys):
    hf = tmp_path / "hf"
    export_hf(runs["llama"], hf)
    out = tmp_path / "imported"
    assert main(["import", "hf", str(hf), str(out)]) == 0
    assert "against transformers" in capsys.readouterr().out
    assert main(["generate", str(out), "--prompt", "Anne", "--max-new-tokens", "5", "--temperature", "0"]) == 0
    original = load_checkpoint_model(runs["llama"])
    imported = load_checkpoint_model(out)
    ids = torch.arange(20)[None] % original.model.config.vocab_size
    with torch.no_grad():
        assert torch.equal(original.model(ids), imported.model(ids))
    assert imported.spec.model.positional.theta == 5000.0


def test_init_from_an_hf_folder_trains_from_its_weights(runs, tmp_path, corpus):
    hf = tmp_path / "hf"
    export_hf(runs["llama"], hf)
    spec = tiny_spec(
        corpus, tmp_path / "ft", train={"steps": 2, "lr": 1e-12, "warmup_steps": 0}, generate={"prompts": []}
    )
    spec["model"] = {"init_from": str(hf)}  # the architecture and tokenizer come from the source
    del spec["tokenizer"]
    assert main(["run", str(write_spec(tmp_path / "ft.json", spec))]) == 0
    tuned, source = load_checkpoint_model(tmp_path / "ft"), load_checkpoint_model(runs["llama"])
    assert tuned.spec.model.type == "llama" and tuned.spec.model.init_from == str(hf.resolve())
    assert (tmp_path / "ft" / "tokenizer.model").read_bytes() == source.checkpoint.tokenizer_path.read_bytes()
    # lr 1e-12 for 2 steps: the weights are still the source's (to float32 rounding).
    diff = max((tuned.model.state_dict()[k] - v).abs().max().item() for k, v in source.model.state_dict().items())
    assert diff < 1e-6


def test_init_from_an_aic_run_starts_where_it_ended(runs, tmp_path, corpus):
    spec = tiny_spec(corpus, tmp_path / "ft", train={"steps": 2}, generate={"prompts": []})
    spec["model"] = {"init_from": str(runs["gpt2"]), "dropout": 0.0}
    del spec["tokenizer"]
    assert main(["run", str(write_spec(tmp_path / "ft.json", spec))]) == 0
    first = [
        json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line
    ][0]
    scratch = [
        json.loads(line) for line in (runs["gpt2"] / "metrics.jsonl").read_text().splitlines() if '"loss"' in line
    ][0]
    assert first["loss"] < scratch["loss"] - 0.3  # it starts from trained weights, not from a random init


def test_init_from_refuses_a_shape_the_weights_do_not_have(runs, tmp_path, corpus, capsys):
    spec = tiny_spec(corpus, tmp_path / "ft", train={"steps": 2})
    spec["model"] = {"init_from": str(runs["gpt2"]), "n_layer": 3}
    del spec["tokenizer"]
    assert main(["run", str(write_spec(tmp_path / "ft.json", spec))]) == 2
    err = capsys.readouterr().err
    assert "init_from" in err and "blocks.2" in err and "Traceback" not in err


def test_init_from_refuses_another_model_type_and_a_missing_source(runs, tmp_path, corpus, capsys):
    spec = tiny_spec(corpus, tmp_path / "ft")
    spec["model"] = {"type": "llama", "init_from": str(runs["gpt2"])}
    assert main(["validate", str(write_spec(tmp_path / "a.json", spec))]) == 2
    assert "model.type: 'llama'" in capsys.readouterr().err
    spec["model"] = {"init_from": str(tmp_path / "nowhere")}
    assert main(["validate", str(write_spec(tmp_path / "b.json", spec))]) == 2
    assert "model.init_from" in capsys.readouterr().err


def test_export_refuses_what_hf_cannot_represent(tmp_path, corpus, capsys):
    run = _train(tmp_path, corpus, "alibi", {**GPT2, "positional": {"type": "alibi"}}, steps=1)
    out = tmp_path / "hf"
    assert main(["export", str(run), "--format", "hf", str(out)]) == 2
    err = capsys.readouterr().err
    assert "learned positions only" in err and "alibi" in err and not out.exists()
    run = _train(
        tmp_path, corpus, "partial", {**LLAMA, "positional": {"type": "rope", "rotary_fraction": 0.5}}, steps=1
    )
    assert main(["export", str(run), str(out)]) == 2
    assert "rotary_fraction 0.5" in capsys.readouterr().err and not out.exists()


def test_export_never_overwrites(runs, tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(runs["gpt2"]), str(out)]) == 2
    assert "not empty" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"


def _copy(folder, dest):
    shutil.copytree(folder, dest)
    return dest


def test_import_names_missing_and_extra_tensors(runs, tmp_path, capsys):
    hf = tmp_path / "hf"
    export_hf(runs["llama"], hf)
    bad = _copy(hf, tmp_path / "missing")
    state = load_file(str(bad / "model.safetensors"))
    del state["model.layers.1.self_attn.k_proj.weight"]
    state["model.layers.1.self_attn.extra.weight"] = torch.zeros(2)
    save_file(state, str(bad / "model.safetensors"))
    assert main(["import", "hf", str(bad), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "missing tensors: model.layers.1.self_attn.k_proj.weight" in err
    assert "unexpected tensors: model.layers.1.self_attn.extra.weight" in err
    assert not (tmp_path / "out").exists() and "Traceback" not in err


def test_import_refuses_an_unsupported_architecture(runs, tmp_path, capsys):
    hf = tmp_path / "hf"
    export_hf(runs["gpt2"], hf)
    config = json.loads((hf / "config.json").read_text())
    config["architectures"] = ["MambaForCausalLM"]
    (hf / "config.json").write_text(json.dumps(config))
    assert main(["import", "hf", str(hf), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "MambaForCausalLM" in err and "LlamaForCausalLM" in err and "GPT2LMHeadModel" in err


def test_import_of_a_folder_without_a_tokenizer(runs, tmp_path, corpus, capsys):
    hf = tmp_path / "hf"
    export_hf(runs["gpt2"], hf)
    for name in ("tokenizer.model", "tokenizer.json"):  # the sentencepiece file, and the tokenizer.json made of it
        (hf / name).unlink()
    out = tmp_path / "imported"
    assert main(["import", "hf", str(hf), str(out)]) == 0
    assert "tokenizer: none" in capsys.readouterr().out
    assert main(["generate", str(out), "--prompt", "Anne"]) == 2
    assert "holds no tokenizer" in capsys.readouterr().err
    assert main(["export", str(out), str(tmp_path / "again")]) == 0  # weights alone still convert
    spec = tiny_spec(corpus, tmp_path / "ft")
    spec["model"] = {"init_from": str(out)}
    del spec["tokenizer"]
    assert main(["validate", str(write_spec(tmp_path / "ft.json", spec))]) == 2
    assert "carries no tokenizer" in capsys.readouterr().err


def test_a_learned_model_refuses_generation_past_its_positions_up_front(tmp_path, corpus, capsys):
    spec = tiny_spec(corpus, tmp_path / "run", generate={"prompts": ["Anne"], "max_new_tokens": 40})  # block_size 32
    assert main(["validate", str(write_spec(tmp_path / "s.json", spec))]) == 2
    err = capsys.readouterr().err
    assert "generate.max_new_tokens" in err and "cannot extrapolate" in err and "rope or alibi" in err
    spec["model"] = {**GPT2, "positional": {"type": "rope"}}
    assert main(["validate", str(write_spec(tmp_path / "s.json", spec))]) == 0


def test_a_positional_without_kv_cache_support_needs_use_cache_off(corpus, tmp_path):
    import types

    from aic_core.errors import SpecError
    from aic_core.plugins.hookspecs import hookimpl
    from aic_core.plugins.kinds import PositionalPlugin
    from aic_core.plugins.registry import Registry
    from aic_core.spec import parse_spec

    class NoCache(PositionalPlugin):
        name = "no-cache"
        supports_kv_cache = False

        def build(self, options, config):
            from aic_core.plugins.kinds import Positional

            return Positional()

    module = types.ModuleType("fake_no_cache")
    module.aic_register_positional_encodings = hookimpl(lambda register: register(NoCache))
    real = list(__import__("importlib.metadata").metadata.entry_points(group="aic"))
    fake = types.SimpleNamespace(name="no-cache", value="fake_no_cache", group="aic", dist=None, load=lambda: module)
    registry = Registry([*real, fake], strict=True)
    spec = tiny_spec(corpus, tmp_path, model={"positional": {"type": "no-cache"}})
    with pytest.raises(
        SpecError, match="generate.use_cache: the 'no-cache' positional encoding does not work with the KV cache"
    ):
        parse_spec(spec, registry)
    spec["generate"]["use_cache"] = False
    assert parse_spec(spec, registry).model.positional.type == "no-cache"
