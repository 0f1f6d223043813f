"""The `deepspeed` trainer on the CPU: 2 gloo processes under ZeRO stages 0-3 (fp32) train exactly as the `torch`
trainer's one process, resume exactly, and write a consolidated model.safetensors that aic reads without DeepSpeed."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from safetensors.torch import load_file

from aic_core.cli import main
from tests.conftest import tiny_spec, write_spec

RTOL = 1e-5  # fp32; measured agreement is ~1e-7 (summation order of gloo's all-reduce vs one process)


def ds_spec(corpus, run_dir, stage: int, **trainer) -> dict:
    t = {"type": "deepspeed", "stage": stage, "device": "cpu", "precision": "fp32", **trainer}
    return tiny_spec(
        corpus,
        run_dir,
        model={"dropout": 0.0},
        train={"trainer": t, "grad_accum": 2, "steps": 4, "checkpoint_every": 2},
        eval={"batches": 2},
    )


def torch_spec(corpus, run_dir) -> dict:
    spec = ds_spec(corpus, run_dir, 0)
    spec["train"]["trainer"] = {"type": "torch", "device": "cpu", "precision": "fp32"}
    return spec


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus):
    """The torch trainer, one process: the losses and validation losses every stage must reproduce."""
    run_dir = tmp_path_factory.mktemp("torch") / "run"
    path = write_spec(run_dir.parent / "torch.json", torch_spec(corpus, run_dir))
    assert main(["run", str(path), "--stage", "tokenizer,train"]) == 0
    from tests.core.test_multiprocess import losses, records

    return losses(run_dir), [r["val_loss"] for r in records(run_dir) if "val_loss" in r], run_dir


def run_two(tmp_path, spec: dict, *args: str):
    from tests.core.test_multiprocess import torchrun

    path = write_spec(tmp_path / f"{spec['output_dir'].rsplit('/', 1)[-1]}.json", spec)
    result = torchrun(path, "--stage", "tokenizer,train", *args)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


# The tests that launch processes need DeepSpeed; the import and refusal tests below do not.
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="DeepSpeed is not installed: "
    'pip install --no-cache-dir --no-build-isolation "aic[deepspeed]" (CI installs it)',
)


@needs_deepspeed
@pytest.mark.slow
@pytest.mark.parametrize("stages", [(0, 2), (1, 3)])
def test_zero_stages_train_as_the_torch_trainer(tmp_path, corpus, reference, stages):
    from tests.core.test_multiprocess import losses, records

    want, want_val, _ = reference
    for stage in stages:
        run_dir = tmp_path / f"stage{stage}"
        run_two(tmp_path, ds_spec(corpus, run_dir, stage))
        got = losses(run_dir)
        assert list(got) == list(want) == [1, 2, 3, 4]
        assert got == pytest.approx(want, rel=RTOL), f"stage {stage}"
        assert [r["val_loss"] for r in records(run_dir) if "val_loss" in r] == pytest.approx(want_val, rel=RTOL)
        assert (run_dir / "checkpoints" / "step-4" / "deepspeed" / "latest").is_file()


@needs_deepspeed
@pytest.mark.slow
def test_stage3_resume_is_exact_and_weights_load_without_deepspeed(tmp_path, corpus, reference, capsys):
    from tests.core.test_multiprocess import losses, records

    want, _, torch_run = reference
    run_dir = tmp_path / "resumed"
    # Threshold 0: every parameter is sharded, however small (by default tiny tensors stay whole on each rank).
    spec = ds_spec(corpus, run_dir, 3, config={"zero_optimization": {"stage3_param_persistence_threshold": 0}})
    run_two(tmp_path, spec, "--stop-at", "2")
    assert list(losses(run_dir)) == [1, 2]
    # ZeRO-3 really shards: the model was built sharded (zero.Init) and each of the 2 ranks holds about half.
    zero = [r for r in records(run_dir) if r.get("event") == "zero"]
    assert len(zero) == 1 and zero[0]["built_sharded"] is True
    total, held = zero[0]["params"], zero[0]["params_held"]
    assert total == sum(
        v.numel() for v in load_file(str(run_dir / "checkpoints" / "step-2" / "model.safetensors")).values()
    )
    assert len(held) == 2 and all(0.49 * total <= h <= 0.52 * total for h in held), (held, total)
    assert not list((run_dir / "checkpoints").glob(".ds-*"))  # the staging folder moved into step-2
    run_two(tmp_path, spec, "--resume")
    got = losses(run_dir)
    assert got == pytest.approx(want, rel=RTOL)

    # The consolidated weights: full fp32 tensors equal to the torch trainer's at the same step, read by aic alone.
    ds = load_file(str(run_dir / "checkpoints" / "step-4" / "model.safetensors"))
    ref = load_file(str(torch_run / "checkpoints" / "step-4" / "model.safetensors"))
    assert ds.keys() == ref.keys()
    for name in ref:
        assert ds[name].dtype == torch.float32 and ds[name].shape == ref[name].shape
        torch.testing.assert_close(ds[name], ref[name], rtol=1e-4, atol=1e-5, msg=name)
    blocked = {name: None for name in list(sys.modules) if name == "deepspeed" or name.startswith("deepspeed.")}
    saved = {name: sys.modules[name] for name in blocked}
    try:
        sys.modules.update(blocked)  # `import deepspeed` now fails: generate must not need it
        assert main(["generate", str(run_dir), "--prompt", "Anne", "--max-new-tokens", "5"]) == 0
    finally:
        sys.modules.update(saved)
    assert capsys.readouterr().out.strip()


@needs_deepspeed
@pytest.mark.slow
def test_engine_weights_equal_the_consolidated_file(tmp_path, corpus):
    """In one process (no launcher) under ZeRO-3: what the checkpoint holds is what the engine trained."""
    run_dir = tmp_path / "one"
    path = write_spec(tmp_path / "one.json", ds_spec(corpus, run_dir, 3))
    import aic_plugins.trainers.deepspeed as plugin

    captured = {}
    original = plugin.consolidated

    def spy(engine, stage, keep):
        out = original(engine, stage, keep)
        captured["engine"] = {k: v.clone() for k, v in out.items()}
        return out

    plugin.consolidated = spy
    try:
        assert main(["run", str(path), "--stage", "tokenizer,train"]) == 0
    finally:
        plugin.consolidated = original
    saved = load_file(str(run_dir / "checkpoints" / "step-4" / "model.safetensors"))
    assert saved.keys() == captured["engine"].keys()
    for name, value in saved.items():
        assert torch.equal(value, captured["engine"][name]), name


def test_a_config_key_the_spec_owns_is_refused(tmp_path, corpus, capsys):
    pytest.importorskip(
        "deepspeed", reason='DeepSpeed is not installed: pip install --no-build-isolation "aic[deepspeed]"'
    )
    spec = ds_spec(corpus, tmp_path / "bad", 2, config={"train_micro_batch_size_per_gpu": 8})
    assert main(["run", str(write_spec(tmp_path / "bad.json", spec))]) == 2
    err = capsys.readouterr().err
    assert "train.trainer.config.train_micro_batch_size_per_gpu" in err and "train.batch_size" in err
    spec = ds_spec(corpus, tmp_path / "bad2", 2, config={"zero_optimization": {"stage": 3}})
    assert main(["run", str(write_spec(tmp_path / "bad2.json", spec))]) == 2
    assert "zero_optimization.stage" in (err := capsys.readouterr().err) and "train.trainer.stage" in err
    spec = ds_spec(corpus, tmp_path / "bad3", 2, config={"zero_optimisation": {"stage": 2}})
    assert main(["run", str(write_spec(tmp_path / "bad3.json", spec))]) == 2
    assert "zero_optimisation" in (err := capsys.readouterr().err) and "zero_optimization" in err
    spec = ds_spec(corpus, tmp_path / "bad4", 2, config={"zero_optimization": {"reduce_bucket_sise": 10}})
    assert main(["run", str(write_spec(tmp_path / "bad4.json", spec))]) == 2
    assert "reduce_bucket_sise" in capsys.readouterr().err
    spec = ds_spec(corpus, tmp_path / "bad5", 2, offload_params=True)
    assert main(["run", str(write_spec(tmp_path / "bad5.json", spec))]) == 2
    assert "stage 3" in capsys.readouterr().err
    spec = ds_spec(corpus, tmp_path / "bad6", 2, precision="fp16")
    assert main(["run", str(write_spec(tmp_path / "bad6.json", spec))]) == 2
    assert "train.trainer.precision: 'fp16' needs a CUDA device" in capsys.readouterr().err
    spec = ds_spec(corpus, tmp_path / "bad7", 3, compile=True)
    assert main(["run", str(write_spec(tmp_path / "bad7.json", spec))]) == 2
    assert "train.trainer.compile" in (err := capsys.readouterr().err) and "stage 0, 1 or 2" in err
    spec = ds_spec(corpus, tmp_path / "bad8", 4)
    assert main(["run", str(write_spec(tmp_path / "bad8.json", spec))]) == 2
    assert "train.trainer.stage" in (err := capsys.readouterr().err) and "4" in err
    spec = ds_spec(corpus, tmp_path / "bad9", 2, config={"fp16": {"enabled": True}})
    assert main(["run", str(write_spec(tmp_path / "bad9.json", spec))]) == 2
    assert "fp16.enabled" in (err := capsys.readouterr().err) and "train.trainer.precision" in err
    assert not (tmp_path / "bad").exists()  # refused before any work


def test_imports_and_explains_the_install_without_deepspeed(tmp_path, corpus, monkeypatch, capsys):
    for name in [n for n in sys.modules if n == "deepspeed" or n.startswith("deepspeed.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # `import deepspeed` raises ImportError
    monkeypatch.delitem(sys.modules, "aic_plugins.trainers.deepspeed", raising=False)
    plugin = importlib.import_module("aic_plugins.trainers.deepspeed")
    assert plugin.DeepSpeedTrainer.name == "deepspeed"
    spec = ds_spec(corpus, tmp_path / "run", 2)
    assert main(["run", str(write_spec(tmp_path / "run.json", spec))]) == 2
    err = capsys.readouterr().err
    assert 'pip install --no-build-isolation "aic[deepspeed]"' in err and "--no-build-isolation" in err


@needs_deepspeed
@pytest.mark.slow
def test_stage2_checkpoint_resumes_at_world_size_1_from_the_consolidated_weights(tmp_path, corpus, reference):
    from tests.core.test_multiprocess import losses

    want, _, _ = reference
    run_dir = tmp_path / "run"
    spec = ds_spec(corpus, run_dir, 2)
    run_two(tmp_path, spec, "--stop-at", "2")
    with pytest.warns(UserWarning, match=r"written by 2 process\(es\) and this run has 1.*AdamW's moments restart"):
        assert main(["run", str(tmp_path / "run.json"), "--stage", "tokenizer,train", "--resume"]) == 0
    got = losses(run_dir)
    assert list(got) == [1, 2, 3, 4] and {k: got[k] for k in (1, 2)} == {k: want[k] for k in (1, 2)}
    assert got[3] == pytest.approx(
        want[3], rel=1e-5
    )  # the weights carry over exactly: step 3's loss is before any new update
    assert got[4] != pytest.approx(want[4], rel=1e-7)  # after it, the fresh moments show


@pytest.fixture(scope="module")
def lora_base(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("lora-base")
    spec = tiny_spec(
        corpus,
        root / "base",
        model={"dropout": 0.0, "tie_embeddings": False},
        train={"steps": 6},
        generate={"prompts": []},
    )
    assert main(["run", str(write_spec(root / "base.json", spec))]) == 0
    return root / "base"


def lora_spec(corpus, run_dir, base, trainer: dict) -> dict:
    spec = tiny_spec(
        corpus,
        run_dir,
        adapter={"type": "lora", "r": 4, "targets": ["attn.qkv", "mlp.fc"]},
        train={"trainer": trainer, "grad_accum": 2, "steps": 4, "lr": 1e-2, "warmup_steps": 0},
        eval={"batches": 2},
    )
    spec["model"] = {"init_from": str(base), "dropout": 0.0}
    del spec["tokenizer"]
    return spec


@needs_deepspeed
@pytest.mark.slow
def test_lora_under_zero_2_and_3_writes_the_torch_trainer_s_adapter(tmp_path, corpus, lora_base):
    from tests.core.test_multiprocess import losses

    ref_dir = tmp_path / "torch"
    path = write_spec(
        tmp_path / "torch.json",
        lora_spec(corpus, ref_dir, lora_base, {"type": "torch", "device": "cpu", "precision": "fp32"}),
    )
    assert main(["run", str(path), "--stage", "tokenizer,train"]) == 0
    want = load_file(str(ref_dir / "checkpoints" / "step-4" / "adapter.safetensors"))
    base = load_file(str(ref_dir / "checkpoints" / "step-4" / "model.safetensors"))
    assert want and all("lora_" in k for k in want)
    for stage in (2, 3):
        run_dir = tmp_path / f"zero{stage}"
        run_two(
            tmp_path,
            lora_spec(
                corpus, run_dir, lora_base, {"type": "deepspeed", "stage": stage, "device": "cpu", "precision": "fp32"}
            ),
        )
        assert losses(run_dir) == pytest.approx(losses(ref_dir), rel=RTOL)
        ckpt = run_dir / "checkpoints" / "step-4"
        got = load_file(str(ckpt / "adapter.safetensors"))
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=f"zero-{stage} {name}")
        # Only the adapter trained: the base tensors are the ones the run started from, bit for bit.
        weights = load_file(str(ckpt / "model.safetensors"))
        assert all(torch.equal(weights[k], base[k]) for k in base if "lora_" not in k), f"zero-{stage}"


@needs_deepspeed
def test_a_checkpoint_of_another_stage_is_refused_at_resume_and_nothing_is_lost(tmp_path, corpus, capsys):
    run_dir = tmp_path / "run"
    spec = ds_spec(corpus, run_dir, 2)
    spec["train"]["steps"] = 2
    path = write_spec(tmp_path / "run.json", spec)
    assert main(["run", str(path), "--stage", "tokenizer,train", "--stop-at", "1"]) == 0
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    spec["train"]["trainer"]["stage"] = 3
    write_spec(path, spec)
    assert main(["run", str(path), "--stage", "tokenizer,train", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "train.trainer.stage: 2 -> 3" in err and "init_from" in err and "step-1" in err and "Traceback" not in err
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


@needs_deepspeed
@pytest.mark.slow
def test_offload_bf16_checkpointing_and_compile_train_as_plain_zero(tmp_path, corpus, reference):
    """One process: optimizer (and parameter) offload and activation checkpointing under every stage give the plain
    fp32 losses; bf16 stays within bf16's rounding; engine.compile() (stage 2) gives them too."""
    from tests.core.test_multiprocess import losses

    want, _, _ = reference
    cases = [
        ("offload2", 2, {"offload_optimizer": True}, {}, RTOL),
        ("offload3", 3, {"offload_optimizer": True, "offload_params": True}, {}, RTOL),
        ("bf16", 2, {"precision": "bf16"}, {}, 1e-3),
        ("compile2", 2, {"compile": True}, {}, RTOL),
        *[(f"ckpt{stage}", stage, {}, {"activation_checkpointing": True}, RTOL) for stage in (0, 1, 2, 3)],
    ]
    for name, stage, trainer, train, tol in cases:
        spec = ds_spec(corpus, tmp_path / name, stage, **trainer)
        spec["train"].update(train)
        assert main(["run", str(write_spec(tmp_path / f"{name}.json", spec)), "--stage", "tokenizer,train"]) == 0, name
        assert losses(tmp_path / name) == pytest.approx(want, rel=tol), name


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@needs_deepspeed
def test_resume_refuses_a_deepspeed_file_that_would_run_code(tmp_path, corpus, capsys):
    run_dir = tmp_path / "run"
    spec = ds_spec(corpus, run_dir, 1)
    spec["train"]["steps"] = 2
    path = write_spec(tmp_path / "run.json", spec)
    assert main(["run", str(path), "--stage", "tokenizer,train", "--stop-at", "1"]) == 0
    [optim] = (run_dir / "checkpoints" / "step-1" / "deepspeed" / "state").glob("*optim_states.pt")
    state = torch.load(optim, weights_only=False)
    state["payload"] = _Payload(str(tmp_path / "marker"))
    torch.save(state, optim)
    assert main(["run", str(path), "--stage", "tokenizer,train", "--resume"]) == 2
    err = capsys.readouterr().err
    assert optim.name in err and "does not unpickle" in err and "Traceback" not in err
    assert not (tmp_path / "marker").exists()


@needs_deepspeed
@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_resume_is_exact_for_each_stage(tmp_path, corpus, stage):
    """One process: a run stopped after step 2 and resumed gives the straight run's losses bit for bit (the stage-3
    case runs on 2 processes above)."""
    from tests.core.test_multiprocess import losses

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert (
        main(
            [
                "run",
                str(write_spec(tmp_path / "straight.json", ds_spec(corpus, straight, stage))),
                "--stage",
                "tokenizer,train",
            ]
        )
        == 0
    )
    path = write_spec(tmp_path / "resumed.json", ds_spec(corpus, resumed, stage))
    assert main(["run", str(path), "--stage", "tokenizer,train", "--stop-at", "2"]) == 0
    assert main(["run", str(path), "--stage", "tokenizer,train", "--resume"]) == 0
    assert losses(resumed) == losses(straight) and list(losses(straight)) == [1, 2, 3, 4]


class _ByName:
    """Pickles as getattr(cls, name): how Python 3.11.0-3.11.4 pickle an enum member (Debian 12's python3 is 3.11.2)."""

    def __init__(self, cls, name: str) -> None:
        self.cls, self.name = cls, name

    def __reduce__(self):
        return getattr, (self.cls, self.name)


@needs_deepspeed
def test_an_enum_member_pickled_by_name_resumes_and_nothing_else_does(tmp_path):
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from aic_core.errors import SpecError
    from aic_plugins.trainers.deepspeed import _load_without_pickle

    good = tmp_path / "states.pt"
    torch.save({"zero_stage": _ByName(ZeroStageEnum, "optimizer_states"), "x": torch.ones(2)}, good)
    loaded = _load_without_pickle(str(good))
    assert loaded["zero_stage"] is ZeroStageEnum.optimizer_states and torch.equal(loaded["x"], torch.ones(2))
    bad = tmp_path / "crafted.pt"
    torch.save({"f": _ByName(ZeroStageEnum, "__class__")}, bad)  # an attribute, not a member: refused
    with pytest.raises(SpecError, match="aic does not unpickle"):
        _load_without_pickle(str(bad))


@needs_deepspeed
@pytest.mark.slow
def test_packed_chat_data_under_zero_2_trains_as_the_torch_trainer(tmp_path, corpus):
    """Chat data (packed rows, batches with documents) through DeepSpeed's engine: the losses of the torch trainer."""
    from aic_core.data.chat import DEFAULT_SPECIALS
    from tests.core.test_chat_data import rows, write_jsonl
    from tests.core.test_multiprocess import losses

    write_jsonl(tmp_path / "chat.jsonl", rows(160))

    def chat(spec: dict) -> dict:
        spec["data"] = {"train": [str(tmp_path / "chat.jsonl")], "format": "chat"}
        spec["tokenizer"] = {"type": "bpe", "vocab_size": 400, "special_tokens": list(DEFAULT_SPECIALS)}
        return spec

    ref_dir = tmp_path / "torch"
    assert main(["run", str(write_spec(tmp_path / "t.json", chat(torch_spec(corpus, ref_dir)))), "--stage",
                 "tokenizer,train"]) == 0  # fmt: skip
    run_dir = tmp_path / "zero2"
    run_two(tmp_path, chat(ds_spec(corpus, run_dir, 2)))
    want, got = losses(ref_dir), losses(run_dir)
    assert list(got) == [1, 2, 3, 4] and got == pytest.approx(want, rel=RTOL)
