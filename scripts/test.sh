#!/usr/bin/env bash
# README command 2: install what is needed, then run the whole test suite (CPU, < 10 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
# Two pytest workers (the 2 cores): a file's tests stay together on one worker (its module fixtures are
# built once), the longest files first (tests/conftest.py; --no-loadscope-reorder, xdist 3.8, keeps that order: by
# default xdist runs the files with the most tests first, which put the long few-test files last, one
# worker running them alone at the end). `-n 0` after this runs them in one process.
exec $PY -m pytest -n ${PYTEST_WORKERS:-2} --dist loadfile --no-loadscope-reorder --durations=25 "$@"  # the slowest tests, to keep the suite under 10 minutes
