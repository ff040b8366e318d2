#!/usr/bin/env bash
# README command 1: install what is needed, build the demo corpus and tokenizer, and run the
# EXAONE 4.5 recipe in miniature (+scale=mini: recipes/scale/mini.yaml, the tiny model on the demo
# corpus) on 2 processes, each stage starting from the previous stage's checkpoint:
#   stage 1 pretraining (torchrun, FSDP2) -> stage 2 pretraining (torchrun, FSDP2)
#   -> chat SFT, two-stage curriculum (DeepSpeed's launcher, ZeRO-2) -> GRPO (torchrun, FSDP2)
# then evaluates every stage's final checkpoint the same way and writes $OUT/report.md and
# $OUT/report.png. About 14 minutes on 2 CPU cores, plus the install on a fresh machine.
# Outputs under ${OUT:-out/demo}: one run directory per stage (metrics.jsonl, config.yaml,
# checkpoints/, wandb/ offline runs grouped as "demo"), grpo/hf (the final model, Hugging Face
# format), report.md, report.png. Running it again resumes (finished stages are skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
OUT=${OUT:-out/demo}
NPROC=${NPROC:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false WANDB_MODE=${WANDB_MODE:-offline}
COMMON=(+scale=mini wandb.group=demo)
# the demo's lengths (the miniature's defaults, recipes/scale/mini.yaml, are 300 / 150 / 200 / 100 steps)
STAGE1_ARGS=${STAGE1_ARGS-train.steps=250}
SFT_ARGS=${SFT_ARGS-train.steps=160}
START=$SECONDS

if [ ! -f data/demo/corpus/manifest.json ]; then
  echo "== building the demo corpus and tokenizer"
  $PY -m data.demo build --out data/demo/corpus
fi

summary() { $PY -m training.report --summary "$OUT/$1"; }
torchrun_() { $PY -m torch.distributed.run --nproc_per_node "$NPROC" "$@"; }

echo "== stage1: pretraining, vision encoder + merger + language model jointly"
torchrun_ launch/pretrain.py +recipe=stage1 "${COMMON[@]}" run_dir="$OUT/stage1" ${STAGE1_ARGS:-}
summary stage1

echo "== stage2: pretraining re-weighted toward grounding, documents, OCR and STEM"
torchrun_ launch/pretrain.py +recipe=stage2 "${COMMON[@]}" run_dir="$OUT/stage2" init_from="$OUT/stage1" ${STAGE2_ARGS:-}
summary stage2

echo "== sft: chat SFT, general -> reasoning curriculum, under DeepSpeed's launcher"
$PY -m deepspeed.launcher.runner --num_gpus "$NPROC" --master_port "${SFT_PORT:-29511}" launch/sft.py \
  +recipe=sft "${COMMON[@]}" parallel.engine=deepspeed run_dir="$OUT/sft" init_from="$OUT/stage2" ${SFT_ARGS:-}
summary sft

echo "== grpo: GRPO with zero-variance filtering and task rewards"
torchrun_ launch/grpo.py +recipe=grpo "${COMMON[@]}" run_dir="$OUT/grpo" init_from="$OUT/sft" export.hf=true ${GRPO_ARGS:-}
summary grpo

echo "== report: every stage's final checkpoint on the held-out split"
$PY -m training.report "$OUT"
echo "== done in $(( (SECONDS - START) / 60 )) min $(( (SECONDS - START) % 60 )) s: $OUT/report.md, $OUT/report.png"
echo "   chat with the result: $PY launch/chat.py ckpt=$OUT/grpo prompt='What is 3 + 4?'"
