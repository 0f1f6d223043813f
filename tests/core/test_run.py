"""`aic run` end to end on a tiny spec: the run directory, exact resume, and refusals that lose nothing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from aic_core.cli import main
from aic_core.train.checkpoint import list_checkpoints
from tests.conftest import tiny_spec, write_spec


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus) -> tuple[Path, Path]:
    """One finished tiny run, shared by the tests that only read it."""
    tmp = tmp_path_factory.mktemp("trained")
    spec = write_spec(tmp / "spec.json", tiny_spec(corpus, tmp / "run", train={"checkpoint_every": 4}))
    assert main(["run", str(spec)]) == 0
    return spec, tmp / "run"


def test_run_writes_the_run_directory(trained):
    _, run_dir = trained
    for name in ("spec.resolved.json", "tokenizer.model", "metrics.jsonl", "samples.txt", "eval.json"):
        assert (run_dir / name).is_file(), name
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-4", "step-8"]
    for ckpt in list_checkpoints(run_dir):
        assert {p.name for p in ckpt.iterdir()} == {
            "model.safetensors",
            "trainer_state.safetensors",
            "trainer_state.json",
            "state.json",
            "tokenizer.model",
        }
    resolved = json.loads((run_dir / "spec.resolved.json").read_text())
    assert resolved["model"]["positional"] == {"type": "learned"}
    assert resolved["train"]["trainer"]["type"] == "torch"
    assert set(resolved["versions"]) == {"aic", "torch", "plugins"}
    assert (run_dir / "samples.txt").read_text().count("=== sample") == 2


def test_eval_reports_loss_perplexity_and_bits_per_byte(trained):
    _, run_dir = trained
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["step"] == 8
    assert result["val_ppl"] == pytest.approx(math.exp(result["val_loss"]))
    # bits per byte = nats per token * tokens per byte / ln 2; a BPE token covers more than one byte.
    assert 0 < result["val_bpb"] < result["val_loss"] / math.log(2)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_resume_continues_exactly(tmp_path, corpus, device):
    spec = tiny_spec(
        corpus, tmp_path / "straight", train={"trainer": {"type": "torch", "device": device, "precision": "fp32"}}
    )
    write_spec(tmp_path / "a.json", spec)
    assert main(["run", str(tmp_path / "a.json"), "--stage", "tokenizer,train"]) == 0
    spec["output_dir"] = str(tmp_path / "resumed")
    write_spec(tmp_path / "b.json", spec)
    assert main(["run", str(tmp_path / "b.json"), "--stage", "tokenizer,train", "--stop-at", "4"]) == 0
    assert [p.name for p in list_checkpoints(tmp_path / "resumed")] == ["step-4"]
    assert main(["run", str(tmp_path / "b.json"), "--stage", "tokenizer,train", "--resume"]) == 0
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(straight) == sorted(resumed) == list(range(1, 9))
    for step in range(1, 9):
        assert resumed[step] == pytest.approx(straight[step], abs=1e-6), step


def test_stages_run_separately(tmp_path, corpus):
    spec = write_spec(tmp_path / "s.json", tiny_spec(corpus, tmp_path / "run", train={"steps": 2}))
    assert main(["run", str(spec), "--stage", "tokenizer"]) == 0
    assert (tmp_path / "run" / "tokenizer.model").is_file()
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert main(["run", str(spec), "--stage", "train"]) == 0
    assert main(["run", str(spec), "--stage", "eval", "--stage", "generate"]) == 0
    assert (tmp_path / "run" / "samples.txt").is_file()


def test_an_adapter_section_is_applied_to_the_model(tmp_path, corpus):
    """The adapter plugin named in the spec wraps the model before training (here a stand-in that freezes the MLPs)."""
    import types

    from aic_core.model.loading import build_model
    from aic_core.plugins.hookspecs import hookimpl
    from aic_core.plugins.kinds import AdapterPlugin, PluginOptions
    from aic_core.plugins.registry import Registry
    from aic_core.spec import parse_spec

    class FreezeMLP(AdapterPlugin):
        name = "freeze-mlp"

        class Options(PluginOptions):
            pass

        def apply(self, model, options):
            names = [n for n, m in model.named_modules() if n.endswith(".mlp")]
            for n in names:
                model.get_submodule(n).requires_grad_(False)
            return names

        def merge(self, model):
            pass

        def unmerge(self, model):
            pass

        def remove(self, model):
            pass

        def adapter_state(self, model):
            return {}

    module = types.ModuleType("fake_adapter")
    module.aic_register_adapters = hookimpl(lambda register: register(FreezeMLP))
    real = list(__import__("importlib.metadata").metadata.entry_points(group="aic"))
    fake = types.SimpleNamespace(name="freeze-mlp", value="fake_adapter", group="aic", dist=None, load=lambda: module)
    registry = Registry([*real, fake], strict=True)
    spec = parse_spec(tiny_spec(corpus, tmp_path, adapter={"type": "freeze-mlp"}), registry)
    model = build_model(spec, registry, 400)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(".mlp." in n for n in frozen)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_the_specs_decode_step_reaches_the_generate_stage_and_aic_generate(tmp_path, corpus, capsys):
    """generate.decode_step is what the generate stage and `aic generate` run; --decode-step overrides it."""
    spec = write_spec(
        tmp_path / "s.json", tiny_spec(corpus, tmp_path / "run", train={"steps": 2}, generate={"decode_step": "graph"})
    )
    assert main(["run", str(spec), "--stage", "tokenizer,train"]) == 0
    capsys.readouterr()
    assert main(["run", str(spec), "--stage", "generate"]) == 2  # a CUDA graph asked for, on the CPU
    assert "decode_step 'graph'" in capsys.readouterr().err
    assert not (tmp_path / "run" / "samples.txt").exists()
    assert main(["generate", str(tmp_path / "run"), "--prompt", "Anne", "--max-new-tokens", "3"]) == 2
    assert "generate.decode_step ('graph')" in capsys.readouterr().err
    assert (
        main(["generate", str(tmp_path / "run"), "--prompt", "Anne", "--max-new-tokens", "3", "--decode-step", "eager"])
        == 0
    )
    assert capsys.readouterr().out.startswith("Anne")
