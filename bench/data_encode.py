"""The data stage on a synthetic corpus: encoding throughput with 1 and 2 worker processes, against a plain loop of
SentencePieceProcessor.encode in one process, and the peak memory of the encoding process.

The corpus is built from the Austen novels in ../shared/data/austen: their chapters, repeated (each copy numbered)
until it reaches --size-mb, written twice under --dir: as text files of ~50 MB with documents separated by
<|endoftext|>, and as JSONL shards ({"text": ...} per line). The tokenizer is SentencePiece BPE, 4096 pieces, trained
on the novels. Each measurement runs in a fresh process, so its peak RSS (/proc VmHWM) is its own; the token cache is
deleted after each.

    python bench/data_encode.py --size-mb 100 --repeat 3   # a quick look, best of 3
    python bench/data_encode.py                            # 1 GB, the issue's target (long: see bench/RESULTS.md)

Rows: the plain loop (one process, each document encoded whole); two plain loops at once on half the files each (what
two processes can get from the machine: the ceiling for 2 workers); aic with 1 worker (encodes in the one process)
and with 2 (spawned workers, the parent reads and writes). CPU seconds (user + system, the process and its joined
workers) say what a configuration costs whatever else runs on the machine: with two free cores, 2 workers can reach
at most 2 x (CPU seconds of 1 worker) / (CPU seconds of 2 workers) times the speed of one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
AUSTEN = REPO.parent / "shared" / "data" / "austen"
SEP = "<|endoftext|>"
FILE_MB = 50


def chapters() -> list[str]:
    """The novels' chapters: documents of about 10-40 KB."""
    docs = []
    for novel in sorted(AUSTEN.glob("*.txt")):
        text = novel.read_text(encoding="utf-8")
        docs += [part for part in re.split(r"\n(?=(?:CHAPTER|Chapter) [0-9IVXLC]+)", text) if part.strip()]
    return docs


def build(folder: Path, size_mb: int) -> None:
    """Text files and JSONL shards of about size_mb each (skipped when the folder already holds them)."""
    stamp = folder / f"corpus-{size_mb}MB.done"
    if stamp.exists():
        return
    for old in folder.glob("corpus-*MB.done"):
        old.unlink()
    shutil.rmtree(folder / "text", ignore_errors=True)
    shutil.rmtree(folder / "jsonl", ignore_errors=True)
    (folder / "text").mkdir(parents=True)
    (folder / "jsonl").mkdir(parents=True)
    docs, written, copy, shard = chapters(), 0, 0, 0
    text_out = jsonl_out = None
    while written < size_mb * 1e6:
        for doc in docs:
            if text_out is None or text_out.tell() > FILE_MB * 1e6:
                for f in (text_out, jsonl_out):
                    if f is not None:
                        f.close()
                text_out = open(folder / "text" / f"{shard:04d}.txt", "w", encoding="utf-8")
                jsonl_out = open(folder / "jsonl" / f"{shard:04d}.jsonl", "w", encoding="utf-8")
                shard += 1
            doc = f"Copy {copy}.\n{doc}"
            text_out.write(doc + SEP)
            jsonl_out.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
            written += len(doc.encode("utf-8"))
            if written >= size_mb * 1e6:
                break
        copy += 1
    text_out.close()
    jsonl_out.close()
    stamp.write_text("")


def tokenizer(folder: Path) -> Path:
    path = folder / "tokenizer.model"
    if not path.exists():
        from aic_plugins.tokenizers.sentencepiece import SentencePiece

        SentencePiece().train(SentencePiece.Options(vocab_size=4096), sorted(AUSTEN.glob("*.txt")), path)
    return path


def peak_rss_mb(pid: int | str = "self") -> float:
    """A process's peak RSS (VmHWM), in MB. Not getrusage's ru_maxrss: that survives exec, so a child started by a
    large parent would report the parent's size."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return 0.0


class WorkerWatch(threading.Thread):
    """The largest peak RSS of this process's children (the encoding workers), sampled twice a second."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.stopped = 0.0, threading.Event()

    def run(self) -> None:
        me = str(os.getpid())
        while not self.stopped.wait(0.5):
            for stat in Path("/proc").glob("[0-9]*/stat"):
                try:
                    if stat.read_text().rsplit(")", 1)[1].split()[1] == me:
                        self.peak = max(self.peak, peak_rss_mb(stat.parent.name))
                except (OSError, IndexError):
                    pass


# --- the measurements, each in its own process ---------------------------------------------------------


def run_encode(folder: Path, form: str, workers: int) -> dict:
    from aic_core.data.tokens import ReadOptions, encode_files
    from aic_core.files import file_sha256
    from aic_plugins.tokenizers.sentencepiece import SentencePiece

    tok_path = tokenizer(folder)
    tok = SentencePiece().load(None, tok_path)
    cache = folder / f"cache-{form}-{workers}"
    shutil.rmtree(cache, ignore_errors=True)
    read = ReadOptions(separator=SEP if form == "text" else None, workers=workers)
    t0 = time.perf_counter()
    data = encode_files([str(folder / form)], "data.train", tok, file_sha256(tok_path), cache, read)
    seconds = time.perf_counter() - t0
    result = {"seconds": seconds, "n_bytes": data.n_bytes, "tokens": len(data)}
    del data
    shutil.rmtree(cache, ignore_errors=True)
    return result


def run_plain(folder: Path, form: str, limit_mb: float, part: int = 0, parts: int = 1) -> dict:
    """The reference: each document read and given to SentencePieceProcessor.encode, one after another (on every
    `parts`-th file from `part`)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer(folder)))
    n_bytes = tokens = 0
    t0 = time.perf_counter()
    for path in sorted((folder / form).iterdir())[part::parts]:
        with open(path, encoding="utf-8") as f:
            docs = f.read().split(SEP) if form == "text" else (json.loads(line)["text"] for line in f)
            for doc in docs:
                if doc:
                    tokens += len(sp.encode(doc)) + 1
                    n_bytes += len(doc.encode("utf-8"))
        if n_bytes >= limit_mb * 1e6:
            break
    return {"seconds": time.perf_counter() - t0, "n_bytes": n_bytes, "tokens": tokens}


def child(args: argparse.Namespace) -> None:
    folder = Path(args.dir)
    watch = WorkerWatch()
    watch.start()
    if args.child.startswith("plain"):
        part, parts = (int(x) for x in args.child[len("plain") :].split("/")) if "/" in args.child else (0, 1)
        result = run_plain(folder, args.form, (args.reference_mb or float("inf")) / parts, part, parts)
    else:
        result = run_encode(folder, args.form, int(args.child))
    watch.stopped.set()
    result["rss_mb"], result["workers_rss_mb"] = peak_rss_mb(), watch.peak
    own, workers = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )  # workers: joined by now
    result["cpu_s"] = own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime
    print(json.dumps(result))


def measure(args: argparse.Namespace, form: str, what: str) -> dict:
    """The best of --repeat runs (the least disturbed by other work on the machine)."""
    runs = []
    for _ in range(args.repeat):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            what,
            "--form",
            form,
            "--dir",
            args.dir,
            "--reference-mb",
            str(args.reference_mb),
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]) | {"load": os.getloadavg()[0]})
    return max(runs, key=lambda r: r["n_bytes"] / r["seconds"])


def measure_two_plain(args: argparse.Namespace, form: str) -> dict:
    """Two plain loops at once, each on half of the files: what two processes get from this machine's CPUs."""
    runs = []
    for _ in range(args.repeat):
        cmds = [
            [
                sys.executable,
                __file__,
                "--child",
                f"plain{k}/2",
                "--form",
                form,
                "--dir",
                args.dir,
                "--reference-mb",
                str(args.reference_mb),
            ]
            for k in (0, 1)
        ]
        t0 = time.perf_counter()
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO) for cmd in cmds]
        halves = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
        seconds = time.perf_counter() - t0
        runs.append(
            {
                "seconds": seconds,
                "n_bytes": sum(h["n_bytes"] for h in halves),
                "tokens": sum(h["tokens"] for h in halves),
                "rss_mb": max(h["rss_mb"] for h in halves),
                "workers_rss_mb": 0,
                "load": os.getloadavg()[0],
                "cpu_s": sum(h["cpu_s"] for h in halves),
            }
        )
    return max(runs, key=lambda r: r["n_bytes"] / r["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=1000, help="corpus size in MB of document text (default 1000)")
    parser.add_argument(
        "--dir", default="/tmp/aic-bench-data", help="where the corpus is built (default /tmp/aic-bench-data)"
    )
    parser.add_argument("--forms", default="text,jsonl", help="text, jsonl or both (default)")
    parser.add_argument("--workers", default="1,2", help="worker counts to measure (default 1,2)")
    parser.add_argument(
        "--reference-mb",
        type=float,
        default=0,
        help="stop the plain loops after this many MB (default: the whole corpus)",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs of each measurement; the fastest is shown (default 1)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--form", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    build(folder, args.size_mb)
    tokenizer(folder)
    print(
        f"corpus: {args.size_mb} MB of Austen chapters under {folder} (built in {time.perf_counter() - t0:.0f}s); "
        f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    print(
        "| form | encoder | MB/s | tokens/s | vs plain loop | seconds | CPU seconds, all its processes | peak RSS, "
        "encoding process | peak RSS, a worker | load avg after |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for form in args.forms.split(","):
        plain = measure(args, form, "plain")
        plain_rate = plain["n_bytes"] / plain["seconds"] / 1e6
        rows = [
            ("plain loop of SentencePieceProcessor.encode", plain),
            ("2 plain loops at once, half the files each (the CPUs' ceiling)", measure_two_plain(args, form)),
        ]
        rows += [(f"aic, {w} worker{'s' if w != '1' else ''}", measure(args, form, w)) for w in args.workers.split(",")]
        for name, r in rows:
            rate = r["n_bytes"] / r["seconds"] / 1e6
            worker_rss = f"{r['workers_rss_mb']:.0f} MB" if r["workers_rss_mb"] > 1 and "workers" in name else "-"
            print(
                f"| {form} | {name} | {rate:.2f} | {r['tokens'] / r['seconds'] / 1e6:.2f}M | {rate / plain_rate:.2f}x "
                f"| {r['seconds']:.1f} | {r['cpu_s']:.1f} | {r['rss_mb']:.0f} MB | {worker_rss} | {r['load']:.2f} |",
                flush=True,
            )
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
