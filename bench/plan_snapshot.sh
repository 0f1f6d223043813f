#!/usr/bin/env bash
# `aic plan --json` of every shipped example (world sizes 1, 2, 8; cpu and cuda) and of the presets under the torch
# and deepspeed trainers, with and without LoRA, into OUTDIR: run it before and after a change to the planner, then
# `diff -r -I real_accelerator BEFORE AFTER` (DeepSpeed's accelerator warning carries a timestamp). 72 plans, a few
# minutes on 2 cores. Usage, from the repository root with aic installed: bench/plan_snapshot.sh OUTDIR
set -euo pipefail
out=$1; mkdir -p "$out"
specs=$(mktemp -d)
for f in examples/*.json; do
  for w in 1 2 8; do for d in cpu cuda; do
    aic plan "$f" --json --world-size $w --device $d --device-memory 80 > "$out/$(basename "$f")-$w-$d.json" 2>&1 || true
  done; done
done
for m in '{"type":"gpt2","preset":"gpt2-small"}' '{"type":"gpt2","preset":"gpt2-medium","positional":{"type":"rope"}}' \
         '{"type":"llama","preset":"tinyllama-1.1b"}' '{"type":"llama","preset":"llama-mini"}'; do
  for tr in '{"type":"torch"}' '{"type":"deepspeed","stage":3}' '{"type":"deepspeed","stage":2,"offload_optimizer":true}'; do
    for ad in 'null' '{"type":"lora","r":8}'; do
      h=$(echo "$m$tr$ad" | md5sum | cut -c1-8)
      python - "$m" "$tr" "$ad" > "$specs/spec-$h.json" <<'PY'
import json, sys
model, trainer, adapter = (json.loads(a) for a in sys.argv[1:])
spec = {"name": "p", "data": {"train": ["examples/data/persuasion.txt"]},
        "tokenizer": {"type": "sentencepiece", "vocab_size": 32000}, "model": model, "adapter": adapter,
        "train": {"trainer": trainer, "steps": 10, "batch_size": 4, "grad_accum": 8, "activation_checkpointing": False}}
print(json.dumps(spec))
PY
      for w in 1 8; do
        aic plan "$specs/spec-$h.json" --json --world-size $w --device cuda --device-memory 80 > "$out/preset-$h-$w.json" 2>&1 || true
      done
    done
  done
done
rm -rf "$specs"
