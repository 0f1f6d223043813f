"""LoRA: PEFT's initialisation, frozen base, exact resume, merge/unmerge, adapter files, PEFT export."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from aic_core.cli import main
from aic_core.generate import generate
from aic_core.model.convert import export_hf
from aic_core.model.loading import load_adapter, load_checkpoint_model
from aic_core.plugins.registry import get_registry
from aic_core.spec import SamplerSpec
from aic_core.train.checkpoint import list_checkpoints
from aic_plugins.adapters.lora import LoRALinear, LoRAOptions
from tests.conftest import tiny_spec, write_spec
from tests.core.test_run import losses

LLAMA = {"type": "llama", "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 32, "mlp_hidden": 64, "block_size": 32}
GPT2 = {"type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "tie_embeddings": False}


@pytest.fixture(scope="module")
def bases(tmp_path_factory, corpus):
    """A trained llama+rope and gpt2+learned base run."""
    root = tmp_path_factory.mktemp("bases")
    out = {}
    for name, model in (("llama", LLAMA), ("gpt2", GPT2)):
        spec = tiny_spec(corpus, root / name, train={"steps": 12}, generate={"prompts": []})
        spec["model"] = model
        assert main(["run", str(write_spec(root / f"{name}.json", spec))]) == 0
        out[name] = root / name
    return out


def lora_spec(corpus, run_dir, base, **adapter):
    spec = tiny_spec(
        corpus, run_dir, train={"steps": 8, "lr": 1e-2, "warmup_steps": 0}, adapter={"type": "lora", "r": 4, **adapter}
    )
    spec["model"] = {"init_from": str(base)}
    del spec["tokenizer"]
    return spec


def lora(tmp_path, corpus, base, name="ft", **adapter):
    assert (
        main(["run", str(write_spec(tmp_path / f"{name}.json", lora_spec(corpus, tmp_path / name, base, **adapter)))])
        == 0
    )
    return tmp_path / name


def test_init_is_peft_s_and_the_adapted_model_starts_equal_to_the_base():
    torch.manual_seed(0)
    base = torch.nn.Linear(48, 24)
    x = torch.randn(3, 48)
    expected = base(x)
    wrapped = LoRALinear(base, r=8, alpha=16, dropout=0.0, use_rslora=False)
    assert torch.equal(wrapped(x), expected)  # B = 0
    assert torch.count_nonzero(wrapped.lora_B) == 0 and wrapped.scaling == 2.0
    bound = 1 / math.sqrt(
        48
    )  # kaiming_uniform_(a=sqrt(5)) on (r, in): U(-1/sqrt(in), 1/sqrt(in)), as nn.Linear and PEFT
    assert wrapped.lora_A.abs().max() <= bound and wrapped.lora_A.abs().max() > 0.8 * bound
    assert LoRALinear(base, r=16, alpha=16, dropout=0.0, use_rslora=True).scaling == 4.0  # alpha / sqrt(r)


def test_merge_is_within_1e5_and_unmerge_restores_the_base_exactly():
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 32)
    weight = base.weight.detach().clone()
    wrapped = LoRALinear(base, r=4, alpha=8, dropout=0.0, use_rslora=False)
    torch.nn.init.normal_(wrapped.lora_B)
    x = torch.randn(5, 64, dtype=torch.float64)
    reference = (
        torch.nn.functional.linear(x, weight.double(), base.bias.double())
        + x @ wrapped.lora_A.double().T @ wrapped.lora_B.double().T * 2
    )
    unmerged = wrapped(x.float())
    wrapped.merge()
    merged = wrapped(x.float())
    assert (merged - unmerged).abs().max() < 1e-5
    assert (merged.double() - reference).abs().max() < 1e-4  # against float64 math
    wrapped.unmerge()
    assert torch.equal(wrapped.weight, weight)


def test_targets_select_layers_and_all_linear_skips_the_head(bases):
    plugin = get_registry().get("adapter", "lora")
    model = load_checkpoint_model(bases["gpt2"]).model
    assert plugin.apply(model, LoRAOptions(targets=["mlp.*"])) == [
        f"blocks.{i}.mlp.{p}" for i in range(2) for p in ("fc", "proj")
    ]
    model = load_checkpoint_model(bases["gpt2"]).model
    names = plugin.apply(model, LoRAOptions(targets=["all-linear"]))
    assert len(names) == 8 and "lm_head" not in names
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {f"{n}.lora_{x}" for n in names for x in "AB"}


def test_a_target_matching_nothing_is_refused_before_any_work(bases, tmp_path, corpus, capsys):
    spec = lora_spec(corpus, tmp_path / "ft", bases["llama"], targets=["attn.q_proj"])
    assert main(["run", str(write_spec(tmp_path / "ft.json", spec))]) == 2
    err = capsys.readouterr().err
    assert "adapter.targets: 'attn.q_proj' matches no linear layer" in err
    assert "attn.qkv, attn.proj, mlp.fc, mlp.proj, lm_head" in err and "all-linear" in err
    assert not (tmp_path / "ft").exists()  # refused before the tokenizer stage wrote anything


def test_lora_run_trains_only_the_adapter_and_writes_adapter_files(bases, tmp_path, corpus, capsys):
    run = lora(tmp_path, corpus, bases["llama"], targets=["attn.qkv", "mlp.fc"])
    out = capsys.readouterr().out
    assert "lora: 2,048 trainable (" in out  # 2 layers x r 4 x ((32 in + 64 qkv out) + (32 in + 128 gate|up out))
    tuned, base = load_checkpoint_model(run), load_checkpoint_model(bases["llama"])
    tuned_state, base_state = tuned.model.state_dict(), base.model.state_dict()
    assert all(torch.equal(tuned_state[k], v) for k, v in base_state.items())  # the base is frozen
    ckpt = list_checkpoints(run)[-1]
    adapter = load_file(str(ckpt / "adapter.safetensors"))
    assert set(adapter) == {f"blocks.{i}.{m}.lora_{x}" for i in range(2) for m in ("attn.qkv", "mlp.fc") for x in "AB"}
    assert all(torch.equal(adapter[k], tuned_state[k]) for k in adapter) and any(
        adapter[k].abs().sum() > 0 for k in adapter if "lora_B" in k
    )
    meta = json.loads((ckpt / "adapter.json").read_text())
    assert (
        meta["adapter"]["r"] == 4 and meta["base"] == str(bases["llama"].resolve()) and len(meta["base_sha256"]) == 64
    )


def test_lora_resume_is_exact(bases, tmp_path, corpus):
    spec = lora_spec(corpus, tmp_path / "straight", bases["gpt2"], targets=["all-linear"], dropout=0.1)
    assert main(["run", str(write_spec(tmp_path / "a.json", spec)), "--stage", "tokenizer,train"]) == 0
    spec["output_dir"] = str(tmp_path / "resumed")
    write_spec(tmp_path / "b.json", spec)
    assert main(["run", str(tmp_path / "b.json"), "--stage", "tokenizer,train", "--stop-at", "4"]) == 0
    assert main(["run", str(tmp_path / "b.json"), "--stage", "tokenizer,train", "--resume"]) == 0
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(straight) == sorted(resumed) == list(range(1, 9))
    for step in straight:
        assert resumed[step] == pytest.approx(straight[step], abs=1e-6), step
    a, b = (
        load_checkpoint_model(tmp_path / "straight").model.state_dict(),
        load_checkpoint_model(tmp_path / "resumed").model.state_dict(),
    )
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_merge_cli_writes_a_plain_checkpoint_and_hf_export(bases, tmp_path, corpus, capsys):
    run = lora(tmp_path, corpus, bases["llama"], targets=["all-linear"])
    capsys.readouterr()
    assert main(["merge", str(run), str(tmp_path / "merged")]) == 0
    printed = capsys.readouterr().out
    diff = float(printed.split("adapted model: ")[1].split()[0])
    assert diff < 1e-5
    merged = load_checkpoint_model(tmp_path / "merged")
    assert merged.spec.adapter is None and not any("lora" in k for k in merged.model.state_dict())
    adapted = load_checkpoint_model(run)
    greedy = SamplerSpec(temperature=0)
    assert generate(merged.model, merged.tokenizer, ["Anne"], 10, greedy) == generate(
        adapted.model, adapted.tokenizer, ["Anne"], 10, greedy
    )
    assert (tmp_path / "merged" / "hf" / "config.json").is_file()
    assert main(["merge", str(bases["llama"]), str(tmp_path / "again")]) == 2
    assert "holds no adapter" in capsys.readouterr().err


def test_adapter_loads_onto_its_base_and_refuses_another(bases, tmp_path, corpus, capsys):
    run = lora(tmp_path, corpus, bases["llama"])
    adapted = load_checkpoint_model(run)
    base = load_checkpoint_model(bases["llama"])
    assert load_adapter(base.model, run)
    ids = torch.arange(24)[None] % 300
    with torch.no_grad():
        assert torch.equal(base.model(ids), adapted.model(ids))
    capsys.readouterr()
    assert main(["generate", str(bases["gpt2"]), "--adapter", str(run), "--prompt", "Anne"]) == 2
    err = capsys.readouterr().err
    assert "trained on another base model" in err and str(bases["llama"].resolve()) in err


@pytest.mark.parametrize(
    ("family", "adapter"),
    [
        ("llama", {"targets": ["all-linear"]}),
        ("llama", {"targets": ["attn.qkv"], "use_rslora": True, "r": 2}),
        ("gpt2", {"targets": ["attn.qkv", "mlp.*"]}),
        ("gpt2", {"targets": ["all-linear", "lm_head"]}),
    ],
)
def test_peft_export_matches_aic_in_peft(bases, tmp_path, corpus, family, adapter, capsys):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    run = lora(tmp_path, corpus, bases[family], **adapter)
    assert main(["export", str(run), "--format", "peft", str(tmp_path / "peft")]) == 0
    assert {p.name for p in (tmp_path / "peft").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    export_hf(bases[family], tmp_path / "base-hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base-hf"), dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "peft")).eval()
    adapted = load_checkpoint_model(run).model
    base = load_checkpoint_model(bases[family]).model
    ids = torch.randint(0, adapted.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours, theirs, plain = adapted(ids), model(ids).logits, base(ids)
    assert (ours - plain).abs().max() > 1e-3  # the adapter does change the model, so the comparison means something
    assert (ours - theirs).abs().max() < 1e-4


@pytest.mark.gpu
def test_lora_trains_on_cuda_in_bf16_and_merges_on_cpu(bases, tmp_path, corpus):
    spec = lora_spec(corpus, tmp_path / "ft", bases["llama"], targets=["all-linear"])
    spec["train"]["trainer"] = {"type": "torch", "device": "cuda", "precision": "bf16"}
    assert main(["run", str(write_spec(tmp_path / "ft.json", spec))]) == 0
    adapted = load_checkpoint_model(tmp_path / "ft", device="cpu")
    assert any(v.abs().sum() > 0 for k, v in adapted.model.state_dict().items() if k.endswith("lora_B"))
    assert main(["merge", str(tmp_path / "ft"), str(tmp_path / "merged")]) == 0


def test_lora_from_an_hf_folder_fits_the_same_base_in_aic_format(bases, tmp_path, corpus):
    """The base hash is over the tensors, not the file: an adapter trained from the HF export of a base loads onto
    the aic base."""
    export_hf(bases["gpt2"], tmp_path / "base-hf")
    run = lora(tmp_path, corpus, tmp_path / "base-hf", targets=["mlp.*"])
    assert json.loads((list_checkpoints(run)[-1] / "adapter.json").read_text())["base"] == str(
        (tmp_path / "base-hf").resolve()
    )
    base = load_checkpoint_model(bases["gpt2"])
    load_adapter(base.model, run)
    ids = torch.arange(16)[None]
    with torch.no_grad():
        assert torch.equal(base.model(ids), load_checkpoint_model(run).model(ids))
