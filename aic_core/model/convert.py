"""Format maps: an aic model or adapter to and from Hugging Face's and PEFT's formats.

    aic import hf DIR OUT              an HF model folder -> an aic checkpoint folder
    aic export RUN --format hf OUT     config.json + model.safetensors + the tokenizer's files for transformers
    aic export RUN --format peft OUT   adapter_config.json + adapter_model.safetensors for PEFT
    aic merge RUN OUT                  the adapter folded into its base: a plain checkpoint (and its HF export)

The model plugin maps its options and tensor names to and from the HF ones; this module writes the files,
checks that every tensor is used, and compares logits (against transformers or PEFT where installed, and
against the folder read back) before it reports success. Reading sources and building models is loading.py's.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from aic_core.data.chat import default_template
from aic_core.errors import CheckpointError, PluginError
from aic_core.files import file_sha256
from aic_core.model.loading import (
    HF_CONFIG,
    TOKENIZER_PROBES,
    build_from_section,
    check_tokenizer_fits,
    hf_tokenizer,
    import_hf,
    is_hf_folder,
    load_checkpoint_model,
    model_spec,
    open_source,
    read_hf_config,
)
from aic_core.model.nn.transformer import Transformer
from aic_core.plugins.kinds import Tokenizer
from aic_core.plugins.registry import Registry, get_registry
from aic_core.spec import parse_spec, resolved_dict
from aic_core.train.checkpoint import STATE, load_weights, model_state, write_checkpoint_dir

# Logits of a conversion must agree with the source's to this, times max(1, the largest |logit|).
TOLERANCE = 1e-4


# --- comparing logits ------------------------------------------------------------------------------------


def probe_ids(vocab_size: int, block_size: int) -> torch.Tensor:
    """The fixed inputs every conversion is checked on: 2 sequences of up to 32 tokens."""
    return torch.randint(0, vocab_size, (2, min(32, block_size)), generator=torch.Generator().manual_seed(0))


def max_logit_diff(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """(max abs difference, the tolerance it is held to)."""
    diff = (reference.float() - other.float()).abs().max().item()
    return diff, TOLERANCE * max(1.0, reference.abs().max().item())


@torch.no_grad()
def aic_logits(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    return model.eval()(ids.to(model.wte.weight.device)).float().cpu()


def transformers_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor | None:
    """Logits of `transformers.AutoModelForCausalLM.from_pretrained(folder)` in float32; None without transformers."""
    try:
        import transformers
    except ImportError:
        return None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - whatever transformers raises, the conversion has failed
        raise CheckpointError(
            f"{folder}: transformers {transformers.__version__} could not load it ({type(exc).__name__}: {exc}); "
            f"nothing was written to the output folder."
        ) from None
    with torch.no_grad():
        return model.eval()(ids).logits.float()


def _check(what: str, reference: torch.Tensor, other: torch.Tensor | None, where: str) -> float | None:
    if other is None:
        return None
    diff, tol = max_logit_diff(reference, other)
    if not diff <= tol:  # also catches NaN
        raise CheckpointError(
            f"{what}: logits differ from the source by {diff:.3g} (max abs), above the tolerance {tol:.3g}; "
            f"the conversion is wrong, so {where} was not written. Please report this with the model's config."
        )
    return diff


# --- import ---------------------------------------------------------------------------------------------


@dataclass
class ConversionReport:
    out: Path
    parameters: int
    vs_transformers: float | None  # max abs logit difference against transformers' own load (None: not installed)
    vs_reload: float | None  # max abs logit difference after reading back what was written
    tokenizer: str | None  # the tokenizer file carried along (export: all tokenizer files, comma-separated)
    vs_tokenizer: int | None = None  # export: probe texts on which transformers.AutoTokenizer gave aic's ids and text
    notes: list[str] = field(default_factory=list)  # what the user should know: files not written, and why
    base: str | None = None  # PEFT export: its base_model_name_or_path


def _prepare_out(out: Path) -> Path:
    """A temporary sibling of `out` to write into; `out` must not hold anything yet."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(
            f"{out}: already exists and is not empty; nothing was written. "
            "Choose a new output folder, or remove it first."
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    return tmp


def _finish(tmp: Path, out: Path) -> None:
    if out.exists():
        out.rmdir()  # empty, checked by _prepare_out
    os.replace(tmp, out)


def import_hf_folder(folder: Path, out: Path, registry: Registry | None = None) -> ConversionReport:
    """`aic import hf DIR OUT`: an aic checkpoint folder from an HF folder, checked against transformers."""
    registry = registry or get_registry()
    folder, out = Path(folder), Path(out)
    imported = import_hf(folder, registry)
    ids = probe_ids(imported.model.config.vocab_size, imported.model.config.block_size)
    reference = aic_logits(imported.model, ids)
    vs_hf = _check(f"import of {folder}", reference, transformers_logits(folder, ids), str(out))
    tok = hf_tokenizer(folder, registry)
    raw: dict[str, Any] = {"name": _run_name(out.name), "model": imported.options}
    tokenizer = None
    if tok is not None:
        raw["tokenizer"] = tok.section
        tokenizer = tok.load()
        check_tokenizer_fits(tokenizer, imported.model.config.vocab_size, folder, tok)
    spec = parse_spec(raw, registry, source=str(folder / HF_CONFIG), model_only=True)
    tmp = _prepare_out(out)
    try:
        state = {
            "step": 0,
            "spec": resolved_dict(spec, registry),
            "tokenizer_hash": file_sha256(tok.path) if tok else None,
            "tokens": tokenizer.roles() if tokenizer else None,
            "model_config": imported.model.config.to_dict(),
            "metrics": {},
            "imported_from": {
                "format": "hf",
                "path": str(folder.resolve()),
                "architectures": read_hf_config(folder).get("architectures"),
            },
        }
        write_checkpoint_dir(tmp, model_state(imported.model), None, state, tok.path if tok else None)
        reloaded = open_source(tmp, registry)
        model = build_from_section(reloaded.model_section, registry, reloaded.vocab_size, str(tmp))
        load_weights(model, reloaded.weights(model.config), str(tmp), "the imported model")
        vs_reload = _check(f"import of {folder}", reference, aic_logits(model, ids), str(out))
        _finish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tok_files = ", ".join(tok.files) if tok else None
    return ConversionReport(out, imported.model.num_params(), vs_hf, vs_reload, tok_files)


def _run_name(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]", "-", name).strip("-.") or "imported"


# --- export ---------------------------------------------------------------------------------------------


def export_hf(source: Path, out: Path, registry: Registry | None = None) -> ConversionReport:
    """`aic export RUN_OR_CKPT --format hf OUT`: config.json + model.safetensors + the tokenizer's files that
    `transformers.AutoModelForCausalLM.from_pretrained(OUT)` and `AutoTokenizer.from_pretrained(OUT)` load with
    no aic code, checked by logits and by the token ids of fixed texts."""
    registry = registry or get_registry()
    src = open_source(source, registry)
    if src.format == "hf":
        raise CheckpointError(
            f"{source}: is already a Hugging Face model folder; export takes an aic run directory or checkpoint."
        )
    out = Path(out)
    spec = model_spec(src.model_section, registry, str(src.path / STATE), src.tokenizer_section)
    plugin = registry.get("model", spec.model.type)
    model = build_from_section(src.model_section, registry, src.vocab_size, str(src.path / STATE))
    load_weights(model, src.weights(model.config), str(src.path), "the model in its spec")
    model.eval()
    hf_config = plugin.hf_config(spec.model, model.config)
    tokenizer = None
    if src.tokenizer_path is not None and spec.tokenizer is not None:
        tok_plugin = registry.get("tokenizer", spec.tokenizer.type)
        tokenizer = (tok_plugin, tok_plugin.load(spec.tokenizer, src.tokenizer_path))
        for role in ("bos", "eos", "pad"):
            if getattr(tokenizer[1], f"{role}_id") is not None or role != "pad":
                hf_config.setdefault(f"{role}_token_id", getattr(tokenizer[1], f"{role}_id"))
    hf_state = plugin.state_dict_to_hf(model_state(model), model.config)
    ids = probe_ids(model.config.vocab_size, model.config.block_size)
    reference = aic_logits(model, ids)
    tmp = _prepare_out(out)
    tok_names: list[str] = []
    notes: list[str] = []
    vs_tok = None
    try:
        tmp.mkdir()
        (tmp / HF_CONFIG).write_text(json.dumps(hf_config, indent=2) + "\n")
        save_file(hf_state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            if tokenizer[0].hf_files:
                tok_names.append(tokenizer[0].hf_files[0])
                shutil.copyfile(src.tokenizer_path, tmp / tok_names[0])
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                files = tokenizer[0].hf_tokenizer_files(spec.tokenizer, src.tokenizer_path, model.config.block_size)
            notes += [str(w.message) for w in caught]
            template = spec.tokenizer.chat_template or default_template(tokenizer[1])
            if template and "tokenizer_config.json" in files:  # the chat template travels with the tokenizer
                tok_config = json.loads(files["tokenizer_config.json"])
                files["tokenizer_config.json"] = (
                    json.dumps({**tok_config, "chat_template": template}, indent=2, ensure_ascii=False) + "\n"
                ).encode()
            for name, data in files.items():
                (tmp / name).write_bytes(data)
            tok_names += sorted(files)
            if files and not caught:  # complete, as the plugin did not warn: AutoTokenizer must load it
                vs_tok = transformers_tokenizer_check(tmp, tokenizer[1], f"export of {src.path}", str(out))
        vs_hf = _check(f"export of {src.path}", reference, transformers_logits(tmp, ids), str(out))
        vs_reload = _check(
            f"export of {src.path}", reference, aic_logits(import_hf(tmp, registry).model, ids), str(out)
        )
        _finish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ConversionReport(out, model.num_params(), vs_hf, vs_reload, ", ".join(tok_names) or None, vs_tok, notes)


def transformers_tokenizer_check(folder: Path, tokenizer: Tokenizer, what: str, where: str) -> int | None:
    """Load `transformers.AutoTokenizer` from `folder` and compare its ids and decoded text with aic's tokenizer on
    TOKENIZER_PROBES and on a text that holds every special token: the number of texts compared, or None without
    transformers. transformers matches special tokens in a text unless asked not to (`split_special_tokens=True`): its
    default is aic's `encode_with_special`, and split_special_tokens is aic's `encode`, which reads them as text."""
    try:
        import transformers
    except ImportError:
        return None
    transformers.logging.set_verbosity_error()
    try:
        hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 - whatever transformers raises, the tokenizer export has failed
        raise CheckpointError(
            f"{what}: transformers {transformers.__version__} could not load the exported tokenizer "
            f"({type(exc).__name__}: {exc}); {where} was not written. Please report this with the tokenizer file."
        ) from None
    specials = " and ".join(sorted(tokenizer.special_ids))
    cases = [(text, tokenizer.encode, True) for text in TOKENIZER_PROBES]
    if specials:
        text = f"{specials}, typed:\n{specials}"
        cases += [(text, tokenizer.encode, True), (text, tokenizer.encode_with_special, False)]
    for text, encode, split in cases:
        ours = encode(text)
        theirs = list(hf(text, split_special_tokens=split, add_special_tokens=False)["input_ids"])
        if theirs != ours or hf.decode(theirs) != tokenizer.decode(ours):
            how = "as text (split_special_tokens)" if split and specials else "with its special tokens"
            raise CheckpointError(
                f"{what}: transformers {transformers.__version__} AutoTokenizer gives other ids or text than aic's "
                f"tokenizer for {text!r} read {how} (aic: {ours[:16]}, transformers: {theirs[:16]}), so {where} was "
                "not written. Please report this with the tokenizer file."
            )
    for role in ("bos", "eos", "pad"):
        ours = getattr(tokenizer, f"{role}_id")
        if ours is not None and getattr(hf, f"{role}_token_id") != ours:
            raise CheckpointError(
                f"{what}: transformers' {role}_token_id is {getattr(hf, f'{role}_token_id')}, aic's {role} id is "
                f"{ours}, so {where} was not written. Please report this with the tokenizer file."
            )
    return len(cases)


# --- adapters: merge, load onto a base, PEFT export --------------------------------------------------------


@dataclass
class MergeReport:
    out: Path
    vs_adapted: float  # max abs logit difference, merged plain model against the unmerged adapted one
    hf: Path | None  # the HF export written beside it, if the family has one
    hf_skipped: str | None  # why not


def merge_run(run: Path, out: Path, registry: Registry | None = None) -> MergeReport:
    """`aic merge RUN OUT`: fold a run's adapter into its base and write a plain checkpoint folder to OUT
    (and OUT/hf, the HF export, where the model family has one)."""
    registry = registry or get_registry()
    loaded = load_checkpoint_model(Path(run), registry)
    if loaded.spec.adapter is None:
        raise CheckpointError(
            f"{loaded.checkpoint.path}: holds no adapter, so there is nothing to merge; "
            "it already is a plain checkpoint."
        )
    plugin = registry.get("adapter", loaded.spec.adapter.type)
    model = loaded.model
    ids = probe_ids(model.config.vocab_size, model.config.block_size)
    reference = aic_logits(model, ids)
    plugin.remove(model)  # merged in place, wrappers gone
    weights = model_state(model)
    spec = {**loaded.checkpoint.state["spec"], "adapter": None}
    plain = build_from_section(spec["model"], registry, model.config.vocab_size, str(loaded.checkpoint.path))
    load_weights(plain, weights, str(loaded.checkpoint.path), "the base model without its adapter")
    diff = _check(f"merge of {loaded.checkpoint.path}", reference, aic_logits(plain, ids), str(out))
    tmp = _prepare_out(Path(out))
    try:
        state = {
            **{k: v for k, v in loaded.checkpoint.state.items() if k not in ("spec",)},
            "spec": spec,
            "merged_from": {
                "path": str(loaded.checkpoint.path.resolve()),
                "adapter": loaded.checkpoint.state["spec"]["adapter"],
            },
        }
        write_checkpoint_dir(tmp, weights, None, state, loaded.checkpoint.tokenizer_path)
        _finish(tmp, Path(out))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        export_hf(Path(out), Path(out) / "hf", registry)
        return MergeReport(Path(out), diff, Path(out) / "hf", None)
    except PluginError as exc:
        return MergeReport(Path(out), diff, None, str(exc))


def export_peft(
    run: Path, out: Path, registry: Registry | None = None, base_name: str | None = None
) -> ConversionReport:
    """`aic export RUN --format peft OUT [--base-name NAME]`: adapter_config.json + adapter_model.safetensors that
    `peft.AutoPeftModelForCausalLM.from_pretrained(OUT)` loads, its `base_model_name_or_path` naming the HF export
    of the base (`base_name`, by default `default_base_name`). Checked by logits in PEFT: on that folder when it
    exists here, else on a temporary HF export of the base."""
    registry = registry or get_registry()
    loaded = load_checkpoint_model(Path(run), registry)
    spec, model = loaded.spec, loaded.model.eval()
    if spec.adapter is None:
        raise CheckpointError(f"{loaded.checkpoint.path}: holds no adapter; export the model itself with --format hf.")
    model_plugin = registry.get("model", spec.model.type)
    adapter = registry.get("adapter", spec.adapter.type)
    hf_config = model_plugin.hf_config(spec.model, model.config)  # refuses a base HF cannot hold
    config, tensors = adapter.to_peft(
        model, spec.adapter, model_plugin.hf_linear_map(model.config), model_plugin.hf_fan_in_fan_out
    )
    base_name = base_name or default_base_name(spec.model.init_from)
    config["base_model_name_or_path"] = base_name
    base_dir, notes = (Path(base_name) if base_name and Path(base_name).exists() else None), []
    if base_dir is not None and not is_hf_folder(base_dir):
        raise CheckpointError(
            f"base_model_name_or_path {base_name}: is not a Hugging Face model folder (config.json + "
            "model.safetensors), so transformers cannot load it (an aic run or checkpoint is not one). "
            "Export the base with `aic export BASE --format hf DIR` and pass --base-name DIR, or a Hub model name; "
            "nothing was written."
        )
    if base_name is None:
        notes.append(
            "the run has no model.init_from, so its base exists only inside its checkpoints and "
            "base_model_name_or_path is unset: load the adapter with peft.PeftModel.from_pretrained(BASE_MODEL, OUT), "
            "or name the base with --base-name."
        )
    elif base_dir is None:
        write = (
            f"; write the base's export there with `aic export {_relative(Path(spec.model.init_from))} "
            f"--format hf {base_name}`"
            if spec.model.init_from
            else ""
        )
        notes.append(
            f"base_model_name_or_path {base_name} is not a folder here{write}. "
            "PEFT was checked on a temporary HF export of the base."
        )
    ids = probe_ids(model.config.vocab_size, model.config.block_size)
    reference = aic_logits(model, ids)
    base_state = {k: v for k, v in model_state(model).items() if k not in adapter.adapter_state(model)}
    tmp = _prepare_out(Path(out))
    try:
        tmp.mkdir()
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})

        def wrong_base(why: str) -> CheckpointError:
            return CheckpointError(
                f"base_model_name_or_path {base_name}: is not the base this adapter was trained on "
                f"({spec.model.init_from or 'the run itself'}): {why}. Export that base there, "
                f"or pass --base-name with its export; {out} was not written."
            )

        try:
            theirs = _peft_logits(
                hf_config, model_plugin.state_dict_to_hf(base_state, model.config), tmp, ids, base_dir
            )
        except Exception as exc:  # noqa: BLE001 - whatever PEFT raises on a folder the user named, it is the wrong base
            if base_dir is None:
                raise
            raise wrong_base(f"PEFT cannot put the adapter on it ({type(exc).__name__}: {exc})") from None
        diff, tol = max_logit_diff(reference, theirs) if base_dir is not None and theirs is not None else (0.0, 0.0)
        if not diff <= tol:
            raise wrong_base(f"with the adapter on it, PEFT's logits differ from aic's by {diff:.3g}")
        vs_peft = _check(f"PEFT export of {loaded.checkpoint.path}", reference, theirs, str(out))
        _finish(tmp, Path(out))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ConversionReport(
        Path(out), sum(t.numel() for t in tensors.values()), vs_peft, None, None, notes=notes, base=base_name
    )


def default_base_name(init_from: str | None) -> str | None:
    """A PEFT export's default base_model_name_or_path, relative to the current folder (transformers reads a relative
    path from there): the run's model.init_from when that is an HF folder; else hf/NAME, where `aic export BASE
    --format hf hf/NAME` puts the base's HF export (NAME: the base run's folder, -step-N added for a checkpoint).
    Never the aic run itself, which transformers cannot load."""
    if not init_from:
        return None
    path = Path(init_from)
    if is_hf_folder(path):
        return _relative(path)
    return "hf/" + (f"{path.parent.parent.name}-{path.name}" if path.parent.name == "checkpoints" else path.name)


def _relative(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:  # another drive
        return str(path)


def _peft_logits(
    hf_config: dict[str, Any],
    hf_state: dict[str, torch.Tensor],
    adapter_dir: Path,
    ids: torch.Tensor,
    base_dir: Path | None = None,
) -> torch.Tensor | None:
    """Logits of transformers' model of the base (`base_dir`, or one made from `hf_config` and `hf_state`) with PEFT's
    adapter loaded; None without transformers or peft."""
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return None
    import tempfile

    from peft import PeftModel

    with tempfile.TemporaryDirectory() as base, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if base_dir is None:
            (Path(base) / HF_CONFIG).write_text(json.dumps(hf_config))
            save_file(hf_state, str(Path(base) / "model.safetensors"), metadata={"format": "pt"})
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        model = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir or base), dtype=torch.float32)
        model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
        with torch.no_grad():
            return model(ids).logits.float()
