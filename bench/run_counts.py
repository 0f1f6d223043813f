"""How often one `aic run` opens or rebuilds things: state.json reads, model builds, `model.init_from` opens,
resolved-spec computations, checkpoint openings, latest-checkpoint scans.

    python bench/run_counts.py         # the example's shape: a run, its eval and generate stages, a LoRA run on it
    python bench/run_counts.py --json

It runs the pipeline in this process under cProfile, counting calls by function name, and counts every read of a
file named state.json (writes aside). The runs are a few steps long: the counts, not the training, take the time.
"""

from __future__ import annotations

import argparse
import builtins
import cProfile
import io
import json
import pstats
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "examples" / "data" / "persuasion.txt"
COUNTED = {  # label: (file name, function name)
    "Transformer.__init__": ("transformer.py", "__init__"),
    "open_source": ("loading.py", "open_source"),
    "resolved_dict": ("spec.py", "resolved_dict"),
    "latest_checkpoint": ("checkpoint.py", "latest_checkpoint"),
    "open_checkpoint": ("checkpoint.py", "open_checkpoint"),
}


def tiny(run_dir: Path, **extra) -> dict:
    spec = json.loads((REPO / "examples" / "austen-tiny.json").read_text())
    spec["data"]["train"] = [str(CORPUS)]
    spec["output_dir"] = str(run_dir)
    spec["tokenizer"]["vocab_size"] = 512
    spec["train"].update(steps=4, checkpoint_every=2, log_every=2, batch_size=2, grad_accum=1, warmup_steps=1)
    spec["eval"] = {"every": 2, "batches": 2}
    spec["generate"]["max_new_tokens"] = 4
    spec.update(extra)
    return spec


class StateReads:
    def __init__(self) -> None:
        self.count, self.under = 0, {}
        self._open = builtins.open

    def __enter__(self):
        def counting_open(file, mode="r", *args, **kwargs):
            if Path(str(file)).name == "state.json" and "r" in mode:
                self.count += 1
                for root in self.under:
                    if str(file).startswith(root):
                        self.under[root] += 1
            return self._open(file, mode, *args, **kwargs)

        builtins.open = io.open = counting_open
        return self

    def __exit__(self, *exc):
        builtins.open = io.open = self._open


def calls(profile: cProfile.Profile) -> dict[str, int]:
    stats = pstats.Stats(profile)
    out = dict.fromkeys(COUNTED, 0)
    for (file, _line, name), (_cc, nc, *_rest) in stats.stats.items():
        for label, (fname, fn) in COUNTED.items():
            if file.endswith(fname) and name == fn:
                out[label] += nc
    return out


def measure(spec: dict, folder: Path, stages: list[str] | None, resume: bool = False) -> dict[str, int]:
    from aic_core.run import run

    path = folder / f"{spec['name']}.json"
    path.write_text(json.dumps(spec))
    profile = cProfile.Profile()
    reads = StateReads()
    init_from = spec["model"].get("init_from")
    if init_from:
        reads.under[str(init_from)] = 0
    with reads:
        profile.enable()
        run(path, stages=stages, resume=resume, echo=lambda _m: None)
        profile.disable()
    out = {"state.json reads": reads.count, **calls(profile)}
    if init_from:
        out["init_from state.json reads"] = reads.under[str(init_from)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import warnings

    warnings.simplefilter("ignore")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        base = folder / "base"
        rows["aic run (example shape)"] = measure(tiny(base, name="base"), folder, None)
        rows["aic run --stage eval,generate"] = measure(tiny(base, name="base"), folder, ["eval", "generate"])
        adapter = {"type": "lora", "r": 4, "alpha": 8, "targets": ["all-linear"]}
        lora = tiny(folder / "lora", name="lora", adapter=adapter, model={"init_from": str(base)})
        lora.pop("tokenizer")
        rows["aic run, LoRA on init_from"] = measure(lora, folder, None)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    keys = list(next(iter(rows.values())))
    keys += [k for r in rows.values() for k in r if k not in keys]
    print("| what | " + " | ".join(rows) + " |")
    print("|---|" + "---:|" * len(rows))
    for k in keys:
        print(f"| {k} | " + " | ".join(str(r.get(k, "")) for r in rows.values()) + " |")


if __name__ == "__main__":
    sys.exit(main())
