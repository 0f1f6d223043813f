"""Training speed through the whole trainer (the core's loop, the trainer plugin's step, checkpointing at the end),
not one step timed alone: `aic run --stage tokenizer,train` of bench/specs/loop_speed.json (GPT-2 124M's shape at
context 512, batch 16, bf16 on CUDA), then the tokens/s the run logged.

    python bench/loop_speed.py                       # the aic that `python -c "import aic_core"` finds
    python bench/loop_speed.py --spec SPEC --label before

Run it once per version of aic on the same machine (each from its own installation, e.g. PYTHONPATH) and compare
the rows. The first logged window holds CUDA's warm-up and is left out of the mean.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default=str(HERE / "specs" / "loop_speed.json"))
    parser.add_argument("--label", default="aic")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "aic_core.cli", "run", args.spec, "--output-dir", str(run_dir)]
        subprocess.run([*cmd, "--stage", "tokenizer,train"], check=True, cwd=tmp)
        wall = time.perf_counter() - t0
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    import aic_core

    print(f"| {args.label} ({Path(aic_core.__file__).parent}) | windows (tok/s) | mean after the first | wall s |")
    print("|---|---|---:|---:|")
    after = rates[1:] or rates
    print(f"| {args.label} | {', '.join(f'{r:,.0f}' for r in rates)} | {statistics.mean(after):,.0f} | {wall:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
