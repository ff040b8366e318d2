#!/usr/bin/env bash
# README command 2: install what is needed, then run the whole test suite (CPU, < 10 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
exec $PY -m pytest --durations=25 "$@"  # the slowest tests, to keep the suite under 10 minutes
