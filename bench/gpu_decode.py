"""Decoding speed: aic's generation against transformers' `generate`, same weights, same prompts, one process.

The model is GPT-2 small's shape (12 layers, 12 heads, 768 wide, 1024 positions, vocabulary 50,257),
random weights, bf16 on CUDA (fp32 on the CPU). transformers' GPT2LMHeadModel (sdpa attention) is made
first and saved as a Hugging Face folder; aic opens that folder the way `aic generate FOLDER` does
(aic_core.model.loading.load_checkpoint_model, then the model in bf16 on the GPU) and decodes with
aic_core.generate.generate, the code behind `aic generate` and the generate stage, text included.

The tokenizer is real: a SentencePiece BPE trained here on examples/data/northangerabbey.txt (16,000
pieces: the most this one novel supports is about 21,800), padded to GPT-2's 50,257 ids with
user-defined pieces `<|n|>`, so that both models have exactly GPT-2 small's shape and every id the
random models write decodes to text. Prompts are 128-token windows of the novel; eos is switched off
on both sides, so every row makes all its new tokens.

Measured per batch size, per system:
  first call   the first 256-token call in this process at this batch size (CUDA-graph capture,
               torch.compile)
  TTFT         time to first token: best call with max_new_tokens=1 (prompt, one token, on the host)
  ms/step      (best full call - TTFT) / (new tokens - 1)
  tok/s        batch * new tokens / best full call
  floor        the share of the bandwidth floor: tok/s over batch * copy bandwidth / weight bytes, the
               copy bandwidth measured here (device-to-device copy, bytes read + written)

Systems: aic with its default decode step (on CUDA, CUDA_STEP: the static step captured in a CUDA graph),
aic with decode_step="compile" (torch.compile, then captured) and "eager" (the static step from Python),
aic sampling (temperature 0.8, top-k 50, top-p 0.95, repetition penalty 1.1) with the default step;
transformers with its dynamic cache (eager) and with its static cache, which `generate` compiles on
CUDA (torch.compile, mode reduce-overhead). All greedy but the sampling row.

    python bench/gpu_decode.py                      # CUDA: batch 1 and 16, prompt 128, 256 new tokens
    python bench/gpu_decode.py --json decode.json   # also write the numbers
    python bench/gpu_decode.py --smoke              # tiny shapes on the CPU, to check that it runs
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from aic_core.generate import decode as generation
from aic_core.model.loading import load_checkpoint_model
from aic_core.plugins.registry import Registry
from aic_core.spec import SamplerSpec

CORPUS = Path(__file__).resolve().parents[1] / "examples" / "data" / "northangerabbey.txt"
GREEDY = SamplerSpec(temperature=0)
SAMPLING = SamplerSpec(temperature=0.8, top_k=50, top_p=0.95, repetition_penalty=1.1)
FULL = {
    "layers": 12,
    "heads": 12,
    "width": 768,
    "positions": 1024,
    "vocab": 50257,
    "learned": 16000,
    "prompt": 128,
    "new": 256,
    "batches": [1, 16],
    "repeats": 3,
}
SMOKE = {
    "layers": 2,
    "heads": 2,
    "width": 64,
    "positions": 128,
    "vocab": 1024,
    "learned": 600,
    "prompt": 16,
    "new": 8,
    "batches": [1, 2],
    "repeats": 1,
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device: torch.device, fn: Callable[..., object], *args: object) -> float:
    sync(device)
    start = time.perf_counter()
    fn(*args)
    sync(device)
    return time.perf_counter() - start


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read and written."""
    n = (1 << 30) if device.type == "cuda" else (1 << 27)
    src, dst = torch.empty(n, dtype=torch.uint8, device=device), torch.empty(n, dtype=torch.uint8, device=device)
    for _ in range(3):
        dst.copy_(src)
    best = min(timed(device, dst.copy_, src) for _ in range(10))
    return 2 * n / best


def tokenizer_file(folder: Path, vocab: int, learned: int) -> Path:
    """A SentencePiece BPE of `learned` pieces from the novel, padded with user-defined pieces to `vocab` ids."""
    plugin = Registry(strict=False).get("tokenizer", "sentencepiece")
    specials = [f"<|{i}|>" for i in range(vocab - learned)]
    path = folder / "tokenizer.model"
    tok = plugin.train(plugin.Options(vocab_size=vocab, special_tokens=specials), [CORPUS], path)
    assert tok.vocab_size == vocab, tok.vocab_size
    return path


def prompts(tokenizer, n: int, length: int) -> tuple[list[str], list[list[int]]]:
    """n windows of the novel that encode to exactly `length` ids (the text's own tokenization)."""
    ids = tokenizer.encode(CORPUS.read_text(encoding="utf-8")[20_000:400_000])
    texts, encoded, start = [], [], 0
    while len(texts) < n:
        text = tokenizer.decode(ids[start : start + length])
        again = tokenizer.encode(text)
        if len(again) == length:
            texts.append(text)
            encoded.append(again)
        start += 2 * length + 7
    return texts, encoded


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights counted once


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes on the CPU, one repeat: checks that the script runs"
    )
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes (default: 1 16)")
    parser.add_argument("--new-tokens", type=int, help="new tokens per row (default: 256)")
    parser.add_argument("--repeats", type=int, help="timed calls per measurement, best kept (default: 3)")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    args = parser.parse_args()
    shape = dict(SMOKE if args.smoke else FULL)
    shape.update(
        {k: v for k, v in {"batches": args.batches, "new": args.new_tokens, "repeats": args.repeats}.items() if v}
    )
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cuda = device.type == "cuda"

    folder = Path(tempfile.mkdtemp(prefix="aic-decode-"))
    try:
        torch.manual_seed(0)
        config = transformers.GPT2Config(
            n_layer=shape["layers"],
            n_head=shape["heads"],
            n_embd=shape["width"],
            n_positions=shape["positions"],
            vocab_size=shape["vocab"],
            bos_token_id=1,
            eos_token_id=2,
            attn_implementation="sdpa",
        )
        hf = transformers.GPT2LMHeadModel(config).eval()
        hf.save_pretrained(folder, safe_serialization=True)
        tokenizer_file(folder, shape["vocab"], shape["learned"])
        loaded = load_checkpoint_model(folder)  # what `aic generate FOLDER` opens
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    tokenizer = loaded.tokenizer
    tokenizer.eos_id = None  # eos off: every row makes all its tokens, as on the transformers side
    aic = loaded.model.to(device=device, dtype=dtype).eval()
    hf = hf.to(device=device, dtype=dtype)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0

    bandwidth = copy_bandwidth(device)
    print(
        f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}; {dtype}"
    )
    print(
        f"model: {shape['layers']} layers, {shape['heads']} heads, {shape['width']} wide, vocab {shape['vocab']}; "
        f"aic weights {weight_bytes(aic) / 1e6:.1f} MB, transformers {weight_bytes(hf) / 1e6:.1f} MB; "
        f"copy bandwidth {bandwidth / 1e12:.3f} TB/s"
    )
    print(f"prompt {shape['prompt']} tokens, {shape['new']} new tokens; aic CUDA_STEP = {generation.CUDA_STEP!r}")

    # The same weights through both: greedy text in float32 on a short run, a check of the fast path.
    check_texts, check_ids = prompts(tokenizer, 4, shape["prompt"])
    n_check = min(32, shape["new"])
    with torch.no_grad():
        aic32, hf32 = aic.float(), hf.float()
        ours = generation.generate(aic32, tokenizer, check_texts, n_check, GREEDY)
        theirs = hf32.generate(
            torch.tensor(check_ids, device=device),
            attention_mask=torch.ones(4, shape["prompt"], dtype=torch.long, device=device),
            max_new_tokens=n_check,
            do_sample=False,
        )[:, shape["prompt"] :]
        same = sum(o == tokenizer.decode(t.tolist()) for o, t in zip(ours, theirs))
        aic, hf = aic32.to(dtype), hf32.to(dtype)
    print(f"check, float32, greedy, {n_check} tokens: aic's text equals transformers' for {same} of 4 prompts")
    if args.smoke:
        assert same == 4, "aic and transformers disagree in float32"

    with torch.no_grad():  # a first forward each, so that no system pays for CUDA's and cuBLAS's start-up
        aic(torch.tensor(check_ids[:1], device=device))
        hf(torch.tensor(check_ids[:1], device=device))

    results = []
    for batch in shape["batches"]:
        texts, ids = prompts(tokenizer, batch, shape["prompt"])
        input_ids = torch.tensor(ids, device=device)

        def aic_call(n: int, step: str, sampler: SamplerSpec, texts: list[str] = texts) -> object:
            return generation.generate(aic, tokenizer, texts, n, sampler, seed=0, decode_step=step)

        def hf_call(n: int, input_ids: torch.Tensor = input_ids, **kw: object) -> object:
            return hf.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n, do_sample=False, **kw
            )

        systems = {
            f"aic, default step ({generation.CUDA_STEP if cuda else 'eager'})": functools.partial(
                aic_call, step="auto", sampler=GREEDY
            ),
            **(
                {"aic, decode_step='compile'": functools.partial(aic_call, step="compile", sampler=GREEDY)}
                if cuda
                else {}
            ),
            "aic, decode_step='eager'": functools.partial(aic_call, step="eager", sampler=GREEDY),
            "aic, sampling, default step": functools.partial(aic_call, step="auto", sampler=SAMPLING),
            "transformers, dynamic cache": hf_call,
            "transformers, static cache" + (" + compile" if cuda else " (no compile off CUDA)"): functools.partial(
                hf_call, cache_implementation="static"
            ),
        }
        for name, call in systems.items():
            try:
                with torch.no_grad():
                    first = timed(device, call, shape["new"])
                    ttft = min(timed(device, call, 1) for _ in range(shape["repeats"]))
                    full = min(timed(device, call, shape["new"]) for _ in range(shape["repeats"]))
            except Exception as exc:  # noqa: BLE001 - one system failing must not lose the others' numbers
                results.append({"batch": batch, "system": name, "error": f"{type(exc).__name__}: {exc}"})
                print(f"  batch {batch}: {name}: failed: {type(exc).__name__}: {exc}", flush=True)
                continue
            model_bytes = weight_bytes(aic if name.startswith("aic") else hf)
            tok_s = batch * shape["new"] / full
            results.append(
                {
                    "batch": batch,
                    "system": name,
                    "first_call_s": first,
                    "ttft_ms": ttft * 1e3,
                    "ms_per_step": (full - ttft) / (shape["new"] - 1) * 1e3,
                    "tok_s": tok_s,
                    "floor_share": tok_s / (batch * bandwidth / model_bytes),
                }
            )
            print(f"  batch {batch}: {name}: {tok_s:,.0f} tok/s (first call {first:.1f} s)", flush=True)

    peer = "transformers, static cache" + (" + compile" if cuda else " (no compile off CUDA)")
    for batch in shape["batches"]:
        rows = [r for r in results if r["batch"] == batch]
        ref = next((r["tok_s"] for r in rows if r["system"] == peer and "tok_s" in r), float("nan"))
        print(f"\nbatch {batch}, prompt {shape['prompt']}, {shape['new']} new tokens, {dtype}")
        print(
            "| system | first call (s) | TTFT (ms) | ms/step | tok/s | x transformers static | share "
            "of bandwidth floor |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            if "error" in r:
                print(f"| {r['system']} | failed: {r['error'][:120]} | | | | | |")
                continue
            print(
                f"| {r['system']} | {r['first_call_s']:.2f} | {r['ttft_ms']:.1f} | {r['ms_per_step']:.3f} | "
                f"{r['tok_s']:,.0f} | {r['tok_s'] / ref:.2f} | {100 * r['floor_share']:.1f} % |"
            )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "device": torch.cuda.get_device_name() if cuda else "cpu",
                    "dtype": str(dtype),
                    "shape": shape,
                    "copy_bandwidth": bandwidth,
                    "results": results,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
