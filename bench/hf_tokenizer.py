"""Does `transformers.AutoTokenizer` on an `aic export --format hf` folder give aic's ids and text exactly?

Trains aic's SentencePiece tokenizer (BPE and unigram, 4096 pieces) on Persuasion, writes the HF tokenizer
files the export writes, and compares AutoTokenizer (fast and slow) against aic on every paragraph of the six
Austen novels in ../shared/data/austen (this benchmark needs that folder). Prints a table.

    python bench/hf_tokenizer.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import transformers

from aic_plugins.tokenizers.sentencepiece import SentencePiece

REPO = Path(__file__).resolve().parents[1]
AUSTEN = REPO.parent / "shared" / "data" / "austen"


def paragraphs() -> list[str]:
    out = []
    for novel in sorted(AUSTEN.glob("*.txt")):
        out += [p for p in novel.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    return out


def main() -> int:
    if not AUSTEN.is_dir():
        print(f"needs {AUSTEN} (the six Austen novels)", file=sys.stderr)
        return 2
    texts = paragraphs()
    plugin = SentencePiece()
    print(
        f"transformers {transformers.__version__}; {len(texts):,} paragraphs, "
        f"{sum(len(t) for t in texts) / 1e6:.1f} M characters"
    )
    print("| model_type | use_fast | ids equal | text equal | AutoTokenizer s | aic s |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for model_type in ("bpe", "unigram"):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            options = plugin.Options(vocab_size=4096, model_type=model_type)
            aic = plugin.train(options, [REPO / "examples" / "data" / "persuasion.txt"], tmp / "tokenizer.model")
            for name, data in plugin.hf_tokenizer_files(options, tmp / "tokenizer.model", 1024).items():
                (tmp / name).write_bytes(data)
            t0 = time.perf_counter()
            expected = [aic.encode(t) for t in texts]
            aic_s = time.perf_counter() - t0
            for fast in (True, False):
                hf = transformers.AutoTokenizer.from_pretrained(str(tmp), use_fast=fast)
                t0 = time.perf_counter()
                got = [hf.encode(t, add_special_tokens=False) for t in texts]
                hf_s = time.perf_counter() - t0
                ids_ok = sum(g == e for g, e in zip(got, expected))
                text_ok = sum(hf.decode(g) == t for g, t in zip(got, texts))
                print(
                    f"| {model_type} | {fast} | {ids_ok}/{len(texts)} | {text_ok}/{len(texts)} | "
                    f"{hf_s:.2f} | {aic_s:.2f} |"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
