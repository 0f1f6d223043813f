"""Training a tokenizer on a large corpus: wall time and peak memory of `aic run SPEC --stage tokenizer`, and what the
tokenizer is worth (bytes per token on held-out text, encoding speed through the data stage).

The corpus is built from the six Austen novels in ../shared/data/austen (this benchmark needs that folder), from the
first 90% of each novel, into 12 text files until it reaches --sizes MB, read through a glob as a user's shards are.
By default (--corpus shuffled) it is paragraphs of 2 to 8 sentences drawn at random (seeded) from all the novels:
no paragraph repeats, as in a real corpus, while the words and sentences are Austen's (SentencePiece counts each
distinct paragraph once, so whole repeated copies, --corpus repeated, cost it almost nothing). The last 10% of each
novel is held out: bytes per token are measured on it. Encoding speed is the data stage's encoder
(aic_core.data.tokens.encode_files, --workers processes) on --encode-mb MB of the corpus, into a token cache that is
deleted afterwards.

Each training is a fresh `aic run` process; its peak RSS is os.wait4's ru_maxrss of that process (this parent stays
small: it imports neither torch nor a tokenizer). Training uses --threads threads: SentencePiece's num_threads option;
RAYON_NUM_THREADS for Hugging Face tokenizers (the bpe plugin). tokenizer.sample_bytes is the spec's default (200 MB)
unless --sample-bytes says otherwise ("all": null, the whole corpus).

    python bench/tokenizers.py --sizes 100                          # both plugins on 100 MB, vocab 8192
    python bench/tokenizers.py --sizes 100,1000 --vocab 8192 32768
    python bench/tokenizers.py --sizes 1000 --sample-bytes 200000000 all --plugins bpe
    python bench/tokenizers.py --sizes 100 --check-determinism       # trained twice at --threads, once at 1 thread
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

# `python bench/tokenizers.py` puts bench/ first on sys.path, where this file would shadow Hugging Face's
# `tokenizers` package in the child that loads the bpe plugin's tokenizer: drop it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

REPO = Path(__file__).resolve().parents[1]
AUSTEN = REPO.parent / "shared" / "data" / "austen"
FILES = 12
HELD_OUT = 0.1
PLUGINS = {  # name in the table: the tokenizer section (vocab_size and threads added per case)
    "sentencepiece": {"type": "sentencepiece", "model_type": "bpe"},
    "bpe": {"type": "bpe"},
}


def novels() -> list[tuple[str, str, str]]:
    """(name, the first 90% of the text, the last 10%), cut at a line end."""
    out = []
    for path in sorted(AUSTEN.glob("*.txt")):
        text = path.read_text(encoding="utf-8")
        cut = text.index("\n", int(len(text) * (1 - HELD_OUT))) + 1
        out.append((path.stem, text[:cut], text[cut:]))
    return out


def build(folder: Path, size_mb: int, kind: str = "shuffled") -> list[Path]:
    """The corpus of size_mb MB in FILES text files under folder/corpus-<kind>-<size>MB (reused when complete).

    "shuffled" (the default): paragraphs of 2 to 8 sentences drawn at random (seeded) from the novels' first 90%, so
    that, as in a real corpus, no two paragraphs repeat (SentencePiece counts each distinct paragraph once, so a
    repeated corpus costs it little); the words and sentences are Austen's. "repeated": the novels' first 90% copied
    whole again and again, numbered ("Copy N.")."""
    import random

    where = folder / f"corpus-{kind}-{size_mb}MB"
    files = [where / f"{i:02d}.txt" for i in range(FILES)]
    if (where / "done").exists():
        return files
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    parts = [train for _, train, _ in novels()]
    sentences = [s for part in parts for s in re.split(r"(?<=[.!?])\s+", part.replace("\n", " ")) if s.strip()]
    rng = random.Random(1234)
    per_file, copy = size_mb * 1_000_000 // FILES, 0
    for path in files:
        with open(path, "wb") as out:
            while (room := per_file - out.tell()) > 0:
                if kind == "shuffled":
                    block = "".join(" ".join(rng.choices(sentences, k=rng.randint(2, 8))) + "\n\n" for _ in range(2000))
                else:
                    block = f"Copy {copy}.\n\n" + parts[copy % len(parts)] + "\n"
                part = block.encode("utf-8")
                out.write(part if len(part) <= room else part[: part.rfind(b"\n", 0, room) + 1] or part[:0])
                copy += 1
                if len(part) > room:
                    break
    (where / "done").write_text("")
    return files


def encode_text(folder: Path, files: list[Path], mb: int) -> Path:
    """The first `mb` MB of the corpus (whole copies), for the encoding speed."""
    path = folder / f"encode-{mb}MB.txt"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as out:
            for f in files:
                with open(f, "rb") as fh:
                    while out.tell() < mb * 1_000_000 and (line := fh.readline()):
                        out.write(line)
        tmp.replace(path)  # complete, or not there: a killed run leaves no half to reuse
    return path


def held_out(folder: Path) -> Path:
    path = folder / "held-out.json"
    if not path.exists():
        path.write_text(json.dumps({name: tail for name, _, tail in novels()}))
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- one training: a fresh `aic run` process -------------------------------------------------------------


def train(folder: Path, files: list[Path], plugin: str, vocab: int, threads: int, sample_bytes, tag: str) -> dict:
    """Train one tokenizer with `aic run SPEC --stage tokenizer`; its wall time, peak RSS and log line."""
    case = folder / "runs" / tag
    shutil.rmtree(case, ignore_errors=True)
    case.mkdir(parents=True)
    tokenizer = dict(PLUGINS[plugin], vocab_size=vocab)
    if tokenizer["type"] == "sentencepiece":
        tokenizer["num_threads"] = threads
    if sample_bytes != "default":
        tokenizer["sample_bytes"] = sample_bytes
    spec = {
        "name": tag,
        "output_dir": str(case / "run"),
        "data": {"train": [str(files[0].parent / "*.txt")]},  # a glob, as a user's shards would be
        "tokenizer": tokenizer,
        "model": {"type": "gpt2", "n_layer": 1, "n_head": 1, "n_embd": 16, "block_size": 16},
        "train": {"steps": 1, "batch_size": 1},
    }
    spec_path = case / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), RAYON_RS_NUM_CPUS=str(threads))
    cmd = [sys.executable, "-m", "aic_core.cli", "run", str(spec_path), "--stage", "tokenizer"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=case, env=env)
    out = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{tag}: `{' '.join(cmd)}` failed ({proc.returncode}):\n{out}")
    line = next((x for x in out.splitlines() if x.startswith("tokenizer: trained")), "")
    trained_s = re.search(r"trained \S+ in ([0-9.]+)s", line)
    sampled = re.search(r"sampled ([0-9.,]+) MB of", line)
    return {
        "spec": str(spec_path),
        "tokenizer": str(case / "run" / "tokenizer.model"),
        "wall_s": seconds,
        "train_s": float(trained_s.group(1)) if trained_s else float("nan"),
        "rss_mb": usage.ru_maxrss / 1024,
        "trained_on_mb": float(sampled.group(1).replace(",", ""))
        if sampled
        else sum(f.stat().st_size for f in files) / 1e6,
        "log": line,
    }


def measure_baseline() -> float:
    """Peak RSS of a process that imports what `aic run` imports and trains nothing: what every row carries."""
    proc = subprocess.Popen([sys.executable, "-c", "import aic_core.run, aic_plugins.tokenizers.bpe, sentencepiece"])
    _, _, usage = os.wait4(proc.pid, 0)
    return usage.ru_maxrss / 1024


# --- what the tokenizer is worth: in a child process (it imports torch) ---------------------------------


def quality(args: argparse.Namespace) -> None:
    """Child: bytes per token on the held-out text, and the data stage's encoding speed; one JSON line."""
    from aic_core.data.inputs import ReadOptions
    from aic_core.data.tokens import encode_files
    from aic_core.files import file_sha256
    from aic_core.model.loading import load_spec, load_tokenizer
    from aic_core.plugins.registry import get_registry

    registry = get_registry()
    spec = load_spec(args.spec, registry)
    tok_path = Path(args.tokenizer)
    tok = load_tokenizer(spec, registry, tok_path)
    texts = json.loads(Path(args.held_out).read_text())
    n_bytes = sum(len(t.encode("utf-8")) for t in texts.values())
    n_tokens = sum(len(tok.encode(t)) for t in texts.values())
    cache = Path(args.cache)
    shutil.rmtree(cache, ignore_errors=True)
    t0 = time.perf_counter()
    data = encode_files(
        [args.encode], "data.train", tok, file_sha256(tok_path), cache, ReadOptions(workers=args.workers)
    )
    seconds = time.perf_counter() - t0
    result = {"bytes_per_token": n_bytes / n_tokens, "encode_mb_s": data.n_bytes / seconds / 1e6}
    del data
    shutil.rmtree(cache, ignore_errors=True)
    print(json.dumps(result))


def measure_quality(args: argparse.Namespace, folder: Path, trained: dict, encode: Path) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--one",
        "quality",
        "--spec",
        trained["spec"],
        "--tokenizer",
        trained["tokenizer"],
        "--held-out",
        str(held_out(folder)),
        "--encode",
        str(encode),
        "--cache",
        str(folder / "cache"),
        "--workers",
        str(args.workers),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if out.returncode:
        raise SystemExit(f"{trained['spec']}: measuring the tokenizer failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- the tables ------------------------------------------------------------------------------------------


def sample_arg(value: str):
    if value in ("default", "all"):
        return value if value == "default" else None
    return int(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,1000", help="corpus sizes in MB, comma-separated (default 100,1000)")
    parser.add_argument("--plugins", default="sentencepiece,bpe", help="sentencepiece (model_type bpe), bpe or both")
    parser.add_argument("--vocab", type=int, nargs="+", default=[8192], help="vocabulary sizes (default 8192)")
    parser.add_argument(
        "--sample-bytes",
        type=sample_arg,
        nargs="+",
        default=["default"],
        help="tokenizer.sample_bytes values: bytes, 'all' (null) or 'default' (the spec's, 200 MB; the default)",
    )
    parser.add_argument(
        "--corpus",
        choices=["shuffled", "repeated"],
        default="shuffled",
        help="shuffled: paragraphs of random sentences, none repeated (default); repeated: whole copies",
    )
    parser.add_argument("--threads", type=int, default=2, help="training threads (default 2)")
    parser.add_argument("--workers", type=int, default=2, help="encoding worker processes (default 2)")
    parser.add_argument("--encode-mb", type=int, default=24, help="MB of the corpus encoded for the speed (default 24)")
    parser.add_argument(
        "--dir", default="/tmp/aic-bench-tokenizers", help="scratch folder (default /tmp/aic-bench-tokenizers)"
    )
    parser.add_argument(
        "--check-determinism",
        action="store_true",
        help="train each case twice at --threads and once at 1 thread; say whether the files are byte-identical",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    for hidden in ("--spec", "--tokenizer", "--held-out", "--encode", "--cache"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one == "quality":
        return quality(args)
    if not AUSTEN.is_dir():
        raise SystemExit(f"{AUSTEN}: not found; this benchmark needs the Austen novels there.")

    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    plugins = args.plugins.split(",")
    print(
        f"corpus ({args.corpus}): from the first 90% of the six Austen novels, "
        + (
            "paragraphs of 2-8 random sentences (seeded; no paragraph repeats)"
            if args.corpus == "shuffled"
            else "repeated (numbered copies)"
        )
        + f", in {FILES} text files per size (read as a glob), "
        f"under {folder}; held out for bytes/token: the last 10% of each novel. {os.cpu_count()} CPUs, "
        f"{args.threads} training threads, {args.workers} encoding workers on {args.encode_mb} MB of the corpus. "
        f"Load average {os.getloadavg()[0]:.2f}.",
        flush=True,
    )
    print(f"baseline: a process importing aic's run and both tokenizer libraries peaks at {measure_baseline():.0f} MB")
    print()
    print(
        "| plugin | corpus | vocab | tokenizer.sample_bytes | trained on | wall time | of which training | peak RSS "
        "| bytes/token, held out | encoding, MB/s |"
    )
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|", flush=True)
    checks = []
    for size in sizes:
        files = build(folder, size, args.corpus)
        encode = encode_text(folder, files, args.encode_mb)
        for plugin in plugins:
            for vocab in args.vocab:
                for sample_bytes in args.sample_bytes:
                    shown = (
                        "default (200 MB)"
                        if sample_bytes == "default"
                        else "null (all)"
                        if sample_bytes is None
                        else f"{sample_bytes:,}"
                    )
                    tag = f"{plugin}-{size}MB-{vocab}-{sample_bytes}"
                    r = train(folder, files, plugin, vocab, args.threads, sample_bytes, tag)
                    q = measure_quality(args, folder, r, encode)
                    print(
                        f"| {plugin} | {size:,} MB | {vocab:,} | {shown} | {r['trained_on_mb']:,.1f} MB "
                        f"| {r['wall_s']:.1f} s | {r['train_s']:.1f} s | {r['rss_mb']:,.0f} MB "
                        f"| {q['bytes_per_token']:.3f} | {q['encode_mb_s']:.2f} |",
                        flush=True,
                    )
                    if args.check_determinism:
                        again = train(folder, files, plugin, vocab, args.threads, sample_bytes, tag + "-again")
                        one = train(folder, files, plugin, vocab, 1, sample_bytes, tag + "-1thread")
                        first = sha256(Path(r["tokenizer"]))
                        checks.append(
                            (
                                plugin,
                                size,
                                vocab,
                                shown,
                                first == sha256(Path(again["tokenizer"])),
                                first == sha256(Path(one["tokenizer"])),
                                one,
                            )
                        )
    if checks:
        print()
        print(
            f"| plugin | corpus | vocab | tokenizer.sample_bytes | {args.threads} threads, twice: identical "
            f"| 1 thread vs {args.threads}: identical | 1 thread: wall time | 1 thread: peak RSS |"
        )
        print("|---|---:|---:|---|---|---|---:|---:|")
        for plugin, size, vocab, shown, twice, threads, one in checks:
            print(
                f"| {plugin} | {size:,} MB | {vocab:,} | {shown} | {'yes' if twice else 'NO'} "
                f"| {'yes' if threads else 'NO'} | {one['wall_s']:.1f} s | {one['rss_mb']:,.0f} MB |"
            )
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
