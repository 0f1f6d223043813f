"""The `aic` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from aic_core import __version__
from aic_core.devices import DEVICE_NAMES, device_named, is_device_name
from aic_core.errors import AicError, Interrupted
from aic_core.plugins import KINDS


def _cmd_run(args: argparse.Namespace) -> int:
    from aic_core.run import run

    stages = [s for group in args.stage or [] for s in group.split(",") if s]
    run(args.spec, stages=stages or None, resume=args.resume, stop_at=args.stop_at, output_dir=args.output_dir)
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from aic_core.model.loading import load_spec
    from aic_core.plugins.registry import get_registry
    from aic_core.spec import resolved_dict, warn_surprises

    registry = get_registry()
    spec = load_spec(args.spec, registry)
    warn_surprises(spec)
    from aic_core.data.tokens import check_data_files

    check_data_files(spec.data)  # the data files exist, are files (not folders), readable and not empty
    if args.resolved:
        print(json.dumps(resolved_dict(spec, registry), indent=2))
    else:
        print(
            f"{args.spec}: valid ({spec.model.type} + {spec.model.positional.type}, tokenizer {spec.tokenizer.type}, "
            f"trainer {spec.train.trainer.type})"
        )
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from aic_core.model.loading import load_spec
    from aic_core.plan.memory import fit_advice, format_plan, plan
    from aic_core.plugins.registry import get_registry

    if args.device is not None and not is_device_name(args.device):
        raise AicError(f"--device: {args.device!r}; plan for cpu or cuda (default: the spec's train.trainer.device).")
    registry = get_registry()
    spec = load_spec(args.spec, registry)
    p = plan(spec, registry, world_size=args.world_size, device_memory=args.device_memory, device=args.device)
    advice = fit_advice(spec, registry, p, args.device) if p.fits is False else None
    if args.json:
        print(json.dumps({**p.to_dict(), "advice": advice}, indent=2))
    else:
        print(format_plan(p))
        if advice:
            print(f"\n{advice}")
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    from aic_core.plugins.registry import get_registry
    from aic_core.spec import json_schema

    print(json.dumps(json_schema(get_registry()), indent=2))
    return 0


def _cmd_plugins(args: argparse.Namespace) -> int:
    from aic_core.plugins.registry import get_registry

    records = get_registry().records
    if args.json:
        print(json.dumps([r.to_dict() for r in records], indent=2))
        return 0
    header = ("NAME", "KIND", "DISTRIBUTION", "VERSION", "STATUS")
    rows = [(r.name, r.kind, r.distribution, r.version, r.status) for r in records]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in (header, *rows):
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())
    for r in records:
        if r.error:
            print(f"\n{r.name} ({r.source}): {r.status}: {r.error}")
    return 0


def _cmd_new_plugin(args: argparse.Namespace) -> int:
    from aic_core.authoring.scaffold import new_plugin

    folder = new_plugin(args.kind, args.name, Path(args.dir) if args.dir else None)
    print(f"wrote the {args.kind} plugin '{args.name}' to {folder}")
    print(f"  next: pip install -e {folder} && python -m pytest {folder}   (then `aic plugins` lists it)")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from aic_core.generate import stream

    loaded, sampler, max_new, options = _generation_setup(args)
    g = loaded.spec.generate
    prompts = args.prompt or g.prompts or [""]
    # stream() refuses a bad request when called (a prompt too long...): every prompt, before any is printed.
    stream(loaded.model, loaded.tokenizer, prompts, max_new, sampler, **options)
    for i, prompt in enumerate(prompts):
        if len(prompts) > 1:
            print(f"=== sample {i + 1} ===")
        sys.stdout.write(prompt)
        sys.stdout.flush()
        for deltas in stream(loaded.model, loaded.tokenizer, [prompt], max_new, sampler, **options):
            if deltas[0]:
                sys.stdout.write(deltas[0])
                sys.stdout.flush()
        sys.stdout.write("\n")
    return 0


def _generation_setup(args: argparse.Namespace):
    """The model on its device, the sampler, max_new_tokens and stream()'s options, from the flags and the spec's
    generate section: what `aic generate` and `aic chat` share."""
    from pydantic import ValidationError

    from aic_core.model.loading import load_checkpoint_model
    from aic_core.spec import SamplerSpec

    device = device_named(args.device, "--device")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise AicError(
            f"--max-new-tokens: {args.max_new_tokens}; "
            "give at least 1 (or leave it out for the spec's generate.max_new_tokens)."
        )
    loaded = load_checkpoint_model(Path(args.run), device="cpu")
    if args.adapter:
        from aic_core.model.loading import load_adapter

        if loaded.spec.adapter is not None:
            raise AicError(
                f"--adapter: {args.run} already holds a '{loaded.spec.adapter.type}' adapter; "
                "pass its plain base model instead."
            )
        load_adapter(loaded.model, Path(args.adapter))
    loaded.model.to(device=device, dtype=_generate_dtype(args.dtype, device)).eval()
    g = loaded.spec.generate
    overrides = {
        k: v
        for k, v in {
            "temperature": args.temperature,
            "top_k": args.top_k,
            "top_p": args.top_p,
            "min_p": args.min_p,
            "repetition_penalty": args.repetition_penalty,
        }.items()
        if v is not None
    }
    try:
        sampler = SamplerSpec(**{**g.sampler.model_dump(), **overrides})
    except ValidationError as exc:
        err = exc.errors()[0]
        raise AicError(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']} (got {err.get('input')!r}).") from None
    seed = args.seed if args.seed is not None else (loaded.spec.seed if g.seed is None else g.seed)
    max_new = args.max_new_tokens if args.max_new_tokens is not None else g.max_new_tokens
    stop = args.stop if args.stop is not None else g.stop
    decode_step = args.decode_step or g.decode_step
    if decode_step in ("graph", "compile") and device.type != "cuda":
        where = (
            f"--decode-step {decode_step}" if args.decode_step else f"the spec's generate.decode_step ({decode_step!r})"
        )
        raise AicError(
            f"{where}: that step runs in a CUDA graph, but the model is on {device.type}. "
            "Pass --decode-step eager (or auto), or --device cuda on a machine with a GPU."
        )
    options = dict(stop=stop, seed=seed, use_cache=not args.no_cache, decode_step=decode_step)
    return loaded, sampler, max_new, options


def _cmd_chat(args: argparse.Namespace) -> int:
    from aic_core.data.chat import chat_template
    from aic_core.generate import stream

    loaded, sampler, max_new, options = _generation_setup(args)
    template = chat_template(
        loaded.spec.tokenizer.chat_template, loaded.tokenizer, f"{args.run}: tokenizer.chat_template"
    )
    end = template.end_of_turn()
    context = loaded.model.config.block_size if loaded.model.positional.max_positions is not None else None
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []

    def reply(message: str, out) -> str:
        history.append({"role": "user", "content": message})
        ids = template.encode([*system, *history], add_generation_prompt=True)
        while context is not None and len(ids) + max_new > context and len(history) > 1:
            del history[:2]  # the oldest user turn and its reply
            ids = template.encode([*system, *history], add_generation_prompt=True)
        text = ""
        for deltas in stream(loaded.model, loaded.tokenizer, [ids], max_new, sampler, stop_ids=[end], **options):
            if deltas[0]:
                text += deltas[0]
                out.write(deltas[0])
                out.flush()
        out.write("\n")
        history.append({"role": "assistant", "content": text})
        return text

    if args.message is not None:
        reply(args.message, sys.stdout)
        return 0
    print("chat: /reset clears the history, /system TEXT sets the system message, /quit ends", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if line.strip() == "/quit":
            return 0
        if line.strip() == "/reset":
            history.clear()
            continue
        if line.startswith("/system"):
            text = line[len("/system") :].strip()
            system[:] = [{"role": "system", "content": text}] if text else []
            history.clear()
            continue
        if line.strip():
            reply(line, sys.stdout)


def _generation_flags(p: argparse.ArgumentParser) -> None:
    """The flags `aic generate` and `aic chat` share: sampling, length, device, precision, adapter."""
    p.add_argument(
        "--max-new-tokens",
        type=int,
        metavar="N",
        help="tokens to generate per prompt, at least 1 (default: generate.max_new_tokens, 200)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        metavar="T",
        help="softmax temperature; 0 is greedy (default: generate.sampler.temperature, 0.8)",
    )
    p.add_argument(
        "--top-k",
        type=int,
        metavar="K",
        help="sample from the K most likely tokens (default: generate.sampler.top_k, off)",
    )
    p.add_argument(
        "--top-p",
        type=float,
        metavar="P",
        help="nucleus sampling: the smallest set of tokens with probability >= P (default: "
        "generate.sampler.top_p, off)",
    )
    p.add_argument(
        "--min-p",
        type=float,
        metavar="P",
        help="drop tokens less likely than P times the most likely one (default: generate.sampler.min_p, off)",
    )
    p.add_argument(
        "--repetition-penalty",
        type=float,
        metavar="R",
        help="penalise tokens already in the text by R (>1 discourages repeats) (default: "
        "generate.sampler.repetition_penalty, 1.0)",
    )
    p.add_argument(
        "--stop",
        action="append",
        metavar="TEXT",
        help="stop a sample when its text contains TEXT; repeat for several (default: generate.stop, none)",
    )
    p.add_argument("--seed", type=int, help="sampling seed (default: generate.seed, else the spec's seed)")
    p.add_argument(
        "--no-cache", action="store_true", help="recompute the whole sequence each step instead of using the KV cache"
    )
    p.add_argument(
        "--device",
        default="auto",
        help=f"{DEVICE_NAMES} (default: auto)",
    )
    p.add_argument(
        "--decode-step",
        choices=["auto", "eager", "graph", "compile"],
        help="how each decode step runs: auto is a CUDA graph on a GPU and eager on the CPU; "
        "compile adds torch.compile, the fastest steps after a compile of 7-13 s, for long generations (default: "
        "generate.decode_step, auto)",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="precision of the weights and the KV cache: auto is bfloat16 on a CUDA GPU that supports it, "
        "else float32 (default: auto)",
    )
    p.add_argument(
        "--adapter",
        metavar="CKPT",
        help="put this adapter (a checkpoint of an adapter run) onto the model first (default: none)",
    )


def _generate_dtype(name: str, device):
    """--dtype as a torch dtype. auto: bfloat16 on a CUDA device that has it (a decode step reads every weight,
    so half the bytes is nearly twice the tokens per second), else float32."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def _report(verb: str, source: str, report) -> None:
    hf = (
        "transformers is not installed, not compared"
        if report.vs_transformers is None
        else f"{report.vs_transformers:.2e}"
    )
    print(
        f"{verb} {source} -> {report.out}: {report.parameters:,} parameters; tokenizer: "
        f"{report.tokenizer or 'none in the source'}"
    )
    back = "" if report.vs_reload is None else f"; after reading back {report.vs_reload:.2e}"
    print(f"  max abs logit difference on fixed inputs: against transformers {hf}{back}")


def _cmd_import(args: argparse.Namespace) -> int:
    from aic_core.model.convert import import_hf_folder

    report = import_hf_folder(Path(args.source), Path(args.out))
    _report("imported", args.source, report)
    print(f'  use it: `aic generate {args.out}`, or "model": {{"init_from": "{args.out}"}} in a spec')
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from aic_core.model.convert import export_hf, export_peft

    if args.format == "peft":
        report = export_peft(Path(args.run), Path(args.out), base_name=args.base_name)
        compared = (
            "peft or transformers is not installed, not compared"
            if report.vs_transformers is None
            else f"{report.vs_transformers:.2e}"
        )
        print(f"exported the adapter of {args.run} -> {report.out}: {report.parameters:,} adapter parameters")
        print(f"  base_model_name_or_path: {report.base}")
        print(f"  max abs logit difference on fixed inputs, PEFT on the base's HF export against aic: {compared}")
        for note in report.notes:
            print(f"  note: {note}")
        print(
            f"  load it: peft.AutoPeftModelForCausalLM.from_pretrained({str(args.out)!r}) "
            "(a relative base is read from the current folder)"
        )
        return 0
    if args.base_name is not None:
        raise AicError(
            f"--base-name {args.base_name}: only for --format peft (it names the base of an exported adapter)."
        )
    report = export_hf(Path(args.run), Path(args.out))
    _report("exported", args.run, report)
    if report.vs_tokenizer is not None:
        print(f"  transformers.AutoTokenizer: aic's ids and text on {report.vs_tokenizer} fixed texts")
    for note in report.notes:
        print(f"  note: {note}")
    tokenizer = (
        f", transformers.AutoTokenizer.from_pretrained({str(args.out)!r})"
        if "tokenizer.json" in (report.tokenizer or "")
        else ""
    )
    print(f"  load it: transformers.AutoModelForCausalLM.from_pretrained({str(args.out)!r}){tokenizer}")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from aic_core.model.convert import merge_run

    report = merge_run(Path(args.run), Path(args.out))
    print(f"merged the adapter of {args.run} -> {report.out} (a plain checkpoint)")
    print(f"  max abs logit difference, merged against the adapted model: {report.vs_adapted:.2e}")
    print(f"  Hugging Face export: {report.hf}" if report.hf else f"  no Hugging Face export: {report.hf_skipped}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from aic_core.report import write_report

    write_report(Path(args.run))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aic", description="Build, train and run GPT-style models from a JSON spec.")
    parser.add_argument(
        "--strict", action="store_true", help="fail if any plugin fails to load (also AIC_STRICT_PLUGINS=1)"
    )
    parser.add_argument("--version", action="version", version=f"aic {__version__}")
    # DeepSpeed's launcher passes --local_rank=N before the command; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    # --strict is accepted before or after the command.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--strict", action="store_true", default=argparse.SUPPRESS, help="fail if any plugin fails to load"
    )

    p = sub.add_parser("run", parents=[common], help="run a spec: tokenizer, train, eval, generate")
    p.add_argument("spec", help="the JSON run spec")
    p.add_argument(
        "--stage",
        action="append",
        metavar="STAGE",
        help="run only these stages (tokenizer, train, eval, generate); repeat or comma-separate",
    )
    p.add_argument("--resume", action="store_true", help="continue training from the run's latest checkpoint")
    p.add_argument(
        "--stop-at",
        type=int,
        metavar="STEP",
        help="stop training after this step (with a checkpoint); continue later with --resume",
    )
    p.add_argument(
        "--output-dir", metavar="DIR", help="the run directory, instead of the spec's output_dir (default: runs/<name>)"
    )
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("validate", parents=[common], help="check a spec without running it")
    p.add_argument("spec")
    p.add_argument("--resolved", action="store_true", help="print the spec with every default filled in")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser(
        "plan",
        parents=[common],
        help="parameters, FLOPs per token and per-device memory of a spec, and whether it fits",
        description="Plan a spec before running it: parameters, FLOPs per token, and per-device memory (weights, "
        "gradients, optimizer state, activations, logits/loss buffer, KV cache) "
        "for its trainer and for DeepSpeed ZeRO stages 1-3, and whether that fits the device. Nothing is allocated.",
    )
    p.add_argument("spec", help="the JSON run spec")
    p.add_argument(
        "--world-size", type=int, default=1, metavar="N", help="processes (devices) the run would use (default: 1)"
    )
    p.add_argument(
        "--device-memory",
        type=float,
        metavar="GiB",
        help="memory of one device in GiB (default: this machine's GPU, else the CPU's available memory)",
    )
    p.add_argument(
        "--device",
        metavar="DEVICE",
        help="plan for cpu or cuda (default: the spec's train.trainer.device as it resolves here)",
    )
    p.add_argument("--json", action="store_true", help="the plan as JSON (bytes), for tools")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser(
        "schema", parents=[common], help="print the JSON Schema of a spec, with the installed plugins' options"
    )
    p.set_defaults(func=_cmd_schema)

    p = sub.add_parser("plugins", parents=[common], help="list plugins: name, kind, distribution, version, status")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_plugins)

    p = sub.add_parser(
        "new-plugin",
        parents=[common],
        help="write a plugin package (entry point, plugin, contract tests) to start from",
    )
    p.add_argument("kind", metavar="KIND", help=f"{', '.join(KINDS[:-1])} or {KINDS[-1]}")
    p.add_argument(
        "name", metavar="NAME", help="the plugin's name, e.g. my-positions (package aic-NAME, import aic_NAME)"
    )
    p.add_argument("--dir", metavar="DIR", help="the folder to write (default: ./aic-NAME); must not exist or be empty")
    p.set_defaults(func=_cmd_new_plugin)

    p = sub.add_parser(
        "generate",
        parents=[common],
        help="generate text from a run, checkpoint or Hugging Face folder, streaming",
        description="Stream text from a model. Flags left out take their value from the spec's generate section "
        "(for a Hugging Face folder: aic's defaults).",
    )
    p.add_argument(
        "run",
        help="a run directory (its latest checkpoint), a checkpoints/step-N folder, "
        "an `aic import` folder or a Hugging Face model folder",
    )
    p.add_argument(
        "--prompt",
        action="append",
        help="a prompt; repeat for several (default: the spec's generate.prompts, else the empty prompt)",
    )
    _generation_flags(p)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser(
        "chat",
        parents=[common],
        help="chat with a model through its chat template, streaming the replies",
        description="An interactive chat in the terminal: /reset clears the history, /system TEXT sets the system "
        "message, /quit ends. With --message: one reply, printed, then exit. The history is cut from the oldest "
        "turn when it would not leave room for a reply in the model's context.",
    )
    p.add_argument(
        "run",
        help="a run directory (its latest checkpoint), a checkpoints/step-N folder, "
        "an `aic import` folder or a Hugging Face model folder",
    )
    p.add_argument("--message", metavar="TEXT", help="send this one message, print the reply and exit")
    p.add_argument("--system", metavar="TEXT", help="a system message at the start of the conversation")
    _generation_flags(p)
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser(
        "import", parents=[common], help="convert a model from another format into an aic checkpoint folder"
    )
    p.add_argument(
        "format", choices=["hf"], help="hf: a Hugging Face transformers folder (config.json + model.safetensors)"
    )
    p.add_argument("source", help="the folder to import")
    p.add_argument("out", help="the aic checkpoint folder to write (must not exist yet)")
    p.set_defaults(func=_cmd_import)

    p = sub.add_parser("export", parents=[common], help="convert an aic run or checkpoint into another format")
    p.add_argument("run", help="a run directory (its latest checkpoint) or a checkpoints/step-N folder")
    p.add_argument(
        "--format",
        choices=["hf", "peft"],
        default="hf",
        help="hf: config.json, model.safetensors and tokenizer files that transformers loads (default); peft: "
        "a LoRA run's adapter alone, for peft",
    )
    p.add_argument("out", help="the folder to write (must not exist yet)")
    p.add_argument(
        "--base-name",
        metavar="NAME",
        help="peft only: base_model_name_or_path in adapter_config.json, the HF export of the base that "
        "peft.AutoPeftModelForCausalLM loads (a folder, relative to where it is loaded from, or a Hub name). "
        "Default: the run's model.init_from if that is an HF folder, else hf/BASE_RUN_NAME, where "
        "`aic export BASE --format hf hf/BASE_RUN_NAME` writes it; never the aic run, which transformers cannot load. "
        "When NAME is a folder here, PEFT is checked on it",
    )
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser(
        "merge", parents=[common], help="fold a run's adapter into its base: a plain checkpoint (and an HF export)"
    )
    p.add_argument("run", help="a run directory trained with an adapter, or one of its checkpoints")
    p.add_argument("out", help="the folder to write (must not exist yet)")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser(
        "report", parents=[common], help="summarise a run: summary.json and report.png (loss against steps and tokens)"
    )
    p.add_argument("run", help="a run directory (its metrics.jsonl, spec and latest checkpoint)")
    p.set_defaults(func=_cmd_report)
    return parser


_python_format = warnings.formatwarning


def _format_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001
    """aic's own warnings (a plugin name conflict, ...) as one `aic: warning:` line; others as Python prints them."""
    if "aic_core" in str(filename):
        return f"aic: warning: {message}\n"
    return _python_format(message, category, filename, lineno, line)


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _format_warning
    args = build_parser().parse_args(argv)
    code = _main(args)
    if _in_process_group():
        # gloo can abort at interpreter exit ("terminate called without an active exception") after all work is
        # done; leaving the group and exiting at once avoids it.
        from aic_core.train.distributed import teardown

        teardown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _main(args: argparse.Namespace) -> int:
    from aic_core.train.distributed import PeerFailed

    rank = int(os.environ.get("RANK", "0") or 0) if os.environ.get("WORLD_SIZE", "1") != "1" else 0
    try:
        if args.strict:
            from aic_core.plugins.registry import get_registry

            get_registry(strict=True)
        return args.func(args)
    except PeerFailed as exc:  # another rank failed and printed why
        return exc.exit_code
    except Interrupted as exc:
        if rank == 0:
            print(f"aic: interrupted: {exc}", file=sys.stderr)
        return exc.exit_code
    except AicError as exc:
        # Before the process group starts every rank checks the same spec: rank 0 speaks for them. After it, an
        # error reaches the other ranks as PeerFailed, and the failing rank names itself.
        if rank == 0 or _in_process_group():
            where = f"rank {rank}: " if _in_process_group() and rank else ""
            print(f"aic: error: {where}{exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        if rank == 0:
            print("aic: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        if not _in_process_group():
            raise
        # A collective failed because a peer process stopped (it printed why), or timed out (AIC_DIST_TIMEOUT).
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(
            f"aic: error: rank {rank}: lost contact with the other processes ({first}); "
            "the one that stopped first says why above.",
            file=sys.stderr,
        )
        return 1


def _in_process_group() -> bool:
    import torch.distributed

    return torch.distributed.is_available() and torch.distributed.is_initialized()


if __name__ == "__main__":
    sys.exit(main())
