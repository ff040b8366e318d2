#!/usr/bin/env bash
# The vLLM rollout engine's tests (tests/vllm, 15 tests: 6.7 min on the 2 shared CPU cores at load average 2-4,
# of which ~3 min are the three GRPO-on-vLLM tests; five engine starts of 20-60 s dominate): creates the engine's venv
# first if needed (`bash scripts/setup.sh vllm`; ~1.5-3 min the first time), then runs them from the
# project's Python, which starts the server from that venv. Run after the main suite (scripts/test.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh vllm
PY=${PYTHON:-python3}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false
exec $PY -m pytest tests/vllm --durations=10 "$@"
