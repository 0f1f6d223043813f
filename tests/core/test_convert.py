"""Importing a Hugging Face GPT2LMHeadModel folder (config.json + model.safetensors)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from aic_core.errors import AicError
from aic_core.model.loading import import_hf

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=1000, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    folder = tmp_path_factory.mktemp("hf-gpt2")
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model


def test_imported_gpt2_folder_matches_transformers_logits(hf_folder):
    folder, hf = hf_folder
    imported = import_hf(folder)
    assert imported.options["type"] == "gpt2" and imported.options["n_layer"] == 2
    idx = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (imported.model(idx) - hf(idx).logits).abs().max().item()
    assert diff < 1e-4


def test_missing_tensor_is_named(hf_folder, tmp_path):
    folder, _ = hf_folder
    for f in folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["transformer.h.1.mlp.c_fc.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(AicError, match=r"missing tensors: transformer\.h\.1\.mlp\.c_fc\.weight"):
        import_hf(tmp_path)


def test_unsupported_architecture_is_refused(hf_folder, tmp_path):
    folder, _ = hf_folder
    for f in folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["MambaForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(AicError, match="MambaForCausalLM.*GPT2LMHeadModel"):
        import_hf(tmp_path)
