#!/usr/bin/env bash
# README command 1: install what is needed, build the demo corpus and tokenizer, and run the
# EXAONE 4.5 recipe in miniature with the tiny model on 2 processes:
#   stage 1 pretraining -> stage 2 pretraining (each from the previous stage's checkpoint).
# Outputs under ${OUT:-out/demo}: one run directory per stage with metrics.jsonl and checkpoints.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
OUT=${OUT:-out/demo}
NPROC=${NPROC:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false WANDB_MODE=${WANDB_MODE:-offline}
COMMON=(model=tiny data=demo wandb.group=demo)

if [ ! -f data/demo/corpus/manifest.json ]; then
  echo "== building the demo corpus and tokenizer"
  $PY -m data.demo build --out data/demo/corpus
fi

run() {  # run NAME SCRIPT ARGS...: one stage, then a one-line summary
  local name=$1 script=$2; shift 2
  echo "== $name"
  $PY -m torch.distributed.run --nproc_per_node "$NPROC" launch/$script "${COMMON[@]}" run_dir="$OUT/$name" "$@"
  $PY - "$OUT/$name" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
evals = [r for r in rows if "eval/loss" in r]
rows = [r for r in rows if "loss" in r]
evals = [r for r in rows if "eval/loss" in r]
line = f"{sys.argv[1]}: {rows[-1]['step']} steps, train loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}"
if evals:
    line += f", held-out loss {evals[0]['eval/loss']:.3f} -> {evals[-1]['eval/loss']:.3f}"
print(line)
PY
}

run stage1 pretrain.py +recipe=stage1
run stage2 pretrain.py +recipe=stage2 init_from="$OUT/stage1"
echo "== done: $OUT"
