"""What other tools read from aic's exports: the keys llama.cpp's convert_hf_to_gguf.py reads, and PEFT adapters
whose base_model_name_or_path names the HF export of their base, loaded by peft.AutoPeftModelForCausalLM."""

from __future__ import annotations

import json

import pytest
import sentencepiece as spm
import torch

from aic_core.cli import main
from aic_core.model.loading import load_checkpoint_model
from tests.conftest import tiny_spec, write_spec

transformers = pytest.importorskip("transformers")

LLAMA = {"type": "llama", "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 32, "mlp_hidden": 64, "block_size": 32}
GPT2 = {"type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 48}


def _run(root, corpus, name, model, **overrides):
    spec = tiny_spec(corpus, root / name, train={"steps": 6}, generate={"prompts": []}, **overrides)
    spec["model"] = model
    assert main(["run", str(write_spec(root / f"{name}.json", spec))]) == 0
    return root / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("export-interop")
    return {"llama": _run(root, corpus, "llama", LLAMA), "gpt2": _run(root, corpus, "gpt2", GPT2)}


def _export(run, out):
    assert main(["export", str(run), "--format", "hf", str(out)]) == 0
    return json.loads((out / "config.json").read_text()), json.loads((out / "tokenizer_config.json").read_text())


# --- llama.cpp ---------------------------------------------------------------------------------------------
# convert_hf_to_gguf.py (ggml-org/llama.cpp) reads, for LlamaForCausalLM: config.json's num_hidden_layers,
# max_position_embeddings, hidden_size, intermediate_size, num_attention_heads, num_key_value_heads, head_dim,
# rms_norm_eps, rope_theta, vocab_size, bos_token_id and eos_token_id; tokenizer.model through sentencepiece
# (pieces, scores, types); tokenizer_config.json's add_bos_token, add_eos_token, {bos,eos,unk}_token (looked up
# in tokenizer.json's added_tokens), added_tokens_decoder, and add_prefix_space (-> tokenizer.ggml.add_space_prefix,
# which is true unless set). For GPT2LMHeadModel: n_layer, n_ctx, n_embd, n_head, layer_norm_epsilon, with a
# feed-forward of 4 * n_embd; its tokenizer must be a GPT-2 byte-level BPE, which aic's sentencepiece is not.


def test_llama_export_carries_what_llama_cpp_reads(runs, tmp_path):
    config, tok_config = _export(runs["llama"], tmp_path / "hf")
    model = load_checkpoint_model(runs["llama"]).model.config
    assert {
        k: config[k] for k in ("num_hidden_layers", "max_position_embeddings", "hidden_size", "intermediate_size")
    } == {
        "num_hidden_layers": 2,
        "max_position_embeddings": 32,
        "hidden_size": 32,
        "intermediate_size": 64,
    }
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 8)
    assert config["vocab_size"] == model.vocab_size and config["rope_theta"] == 10000.0 and config["rms_norm_eps"] > 0
    # Tokenizer settings: llama.cpp must add no bos, no eos and no leading space, as aic does not.
    assert (tok_config["add_bos_token"], tok_config["add_eos_token"], tok_config["add_prefix_space"]) == (
        False,
        False,
        False,
    )
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "hf" / "tokenizer.model"))
    added = {
        t["content"]: t["id"] for t in json.loads((tmp_path / "hf" / "tokenizer.json").read_text())["added_tokens"]
    }
    for role, sp_id in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("unk", sp.unk_id())):
        assert added[tok_config[f"{role}_token"]] == sp_id == config.get(f"{role}_token_id", sp_id)
    assert sp.encode("Anne")[0] != sp.encode(" Anne")[0]  # tokenizer.model adds no dummy prefix either


def test_llama_cpp_s_gguf_reads_the_special_tokens_and_adds_none(runs, tmp_path):
    gguf = pytest.importorskip(
        "gguf"
    )  # llama.cpp's gguf-py (pip install gguf), whose SpecialVocab convert_hf_to_gguf.py uses
    _export(runs["llama"], tmp_path / "hf")
    vocab = gguf.SpecialVocab(tmp_path / "hf", n_vocab=load_checkpoint_model(runs["llama"]).model.config.vocab_size)
    assert vocab.special_token_ids == {"bos": 1, "eos": 2, "unk": 0}
    assert vocab.add_special_token == {"bos": False, "eos": False}


def test_gpt2_export_carries_n_ctx_for_llama_cpp(runs, tmp_path):
    config, tok_config = _export(runs["gpt2"], tmp_path / "hf")
    assert {k: config[k] for k in ("n_layer", "n_ctx", "n_positions", "n_embd", "n_head")} == {
        "n_layer": 2,
        "n_ctx": 48,
        "n_positions": 48,
        "n_embd": 32,
        "n_head": 2,
    }
    assert config["layer_norm_epsilon"] == 1e-5 and config["n_inner"] is None  # llama.cpp assumes 4 * n_embd
    assert load_checkpoint_model(runs["gpt2"]).model.config.hidden == 4 * 32
    assert tok_config["add_bos_token"] is False
    # transformers reads n_ctx back unchanged (an extra key of GPT2Config) and the model still loads.
    assert transformers.AutoConfig.from_pretrained(str(tmp_path / "hf")).n_ctx == 48


# --- PEFT ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(runs, tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("lora")
    spec = tiny_spec(
        corpus,
        root / "ft",
        train={"steps": 6, "lr": 1e-2, "warmup_steps": 0},
        generate={"prompts": []},
        adapter={"type": "lora", "r": 4, "targets": ["all-linear"]},
    )
    spec["model"] = {"init_from": str(runs["llama"])}
    del spec["tokenizer"]
    assert main(["run", str(write_spec(root / "ft.json", spec))]) == 0
    return root / "ft"


def _close(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    return (ours - theirs).abs().max().item() <= 1e-5 * max(1.0, ours.abs().max().item())


def test_auto_peft_model_loads_the_export_onto_the_base_s_hf_export(runs, lora_run, tmp_path, monkeypatch, capsys):
    peft = pytest.importorskip("peft")
    monkeypatch.chdir(tmp_path)  # a relative base_model_name_or_path is read from the current folder
    capsys.readouterr()
    assert main(["export", str(lora_run), "--format", "peft", "peft/ft"]) == 0
    printed = capsys.readouterr().out
    base = json.loads((tmp_path / "peft/ft/adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == "hf/llama"  # the base run's name under hf/, not the aic run folder
    assert (
        "is not a folder here; write the base's export there with `aic export " in printed
        and "--format hf hf/llama`" in printed
    )
    assert main(["export", str(runs["llama"]), "--format", "hf", base]) == 0
    model = peft.AutoPeftModelForCausalLM.from_pretrained("peft/ft", dtype=torch.float32).eval()
    adapted = load_checkpoint_model(lora_run).model
    ids = torch.randint(0, adapted.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        ours, theirs, plain = adapted(ids), model(ids).logits, load_checkpoint_model(runs["llama"]).model(ids)
    assert (ours - plain).abs().max() > 1e-3  # the adapter changes the model, so the comparison means something
    assert _close(ours, theirs)
    # With the base's export in place, a second export is checked by PEFT on that very folder.
    assert main(["export", str(lora_run), "--format", "peft", "peft/again"]) == 0
    assert "is not a folder here" not in capsys.readouterr().out


def test_base_name_is_written_as_given_and_checked_when_it_is_a_folder(runs, lora_run, tmp_path, monkeypatch, capsys):
    pytest.importorskip("peft")
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(lora_run), "--format", "peft", "--base-name", "someone/tiny-llama", "a"]) == 0
    assert (
        json.loads((tmp_path / "a/adapter_config.json").read_text())["base_model_name_or_path"] == "someone/tiny-llama"
    )
    # An aic run is no base transformers can load.
    capsys.readouterr()
    assert main(["export", str(lora_run), "--format", "peft", "--base-name", str(runs["llama"]), "b"]) == 2
    err = capsys.readouterr().err
    assert "is not a Hugging Face model folder" in err and "Traceback" not in err and not (tmp_path / "b").exists()
    # The HF export of another model is refused too: PEFT's logits on it are not aic's.
    assert main(["export", str(runs["gpt2"]), "--format", "hf", "other"]) == 0
    capsys.readouterr()
    assert main(["export", str(lora_run), "--format", "peft", "--base-name", "other", "c"]) == 2
    err = capsys.readouterr().err
    assert (
        "is not the base this adapter was trained on" in err
        and "Traceback" not in err
        and not (tmp_path / "c").exists()
    )
    # So is a llama of the right shape with other weights (the adapter merged in already).
    assert main(["merge", str(lora_run), "merged"]) == 0
    capsys.readouterr()
    assert main(["export", str(lora_run), "--format", "peft", "--base-name", "merged/hf", "e"]) == 2
    assert "PEFT's logits differ from aic's" in capsys.readouterr().err and not (tmp_path / "e").exists()
    assert main(["export", str(runs["llama"]), "--format", "hf", "--base-name", "x", "d"]) == 2
    assert "only for --format peft" in capsys.readouterr().err


def test_default_base_is_the_hf_folder_the_run_started_from(runs, tmp_path, corpus, monkeypatch):
    peft = pytest.importorskip("peft")
    monkeypatch.chdir(tmp_path)
    _export(runs["gpt2"], tmp_path / "bases" / "gpt2-hf")
    spec = tiny_spec(
        corpus,
        tmp_path / "ft",
        train={"steps": 3, "lr": 1e-2, "warmup_steps": 0},
        generate={"prompts": []},
        adapter={"type": "lora", "r": 2, "targets": ["mlp.*"]},
    )
    spec["model"] = {"init_from": "bases/gpt2-hf"}
    del spec["tokenizer"]
    assert main(["run", str(write_spec(tmp_path / "ft.json", spec))]) == 0
    assert main(["export", "ft", "--format", "peft", "peft-ft"]) == 0
    assert (
        json.loads((tmp_path / "peft-ft/adapter_config.json").read_text())["base_model_name_or_path"] == "bases/gpt2-hf"
    )
    model = peft.AutoPeftModelForCausalLM.from_pretrained("peft-ft", dtype=torch.float32).eval()
    ids = torch.arange(40)[None] % 300
    with torch.no_grad():
        assert _close(load_checkpoint_model(tmp_path / "ft").model(ids), model(ids).logits)
