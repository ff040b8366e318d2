#!/usr/bin/env bash
# Installs what the project needs into the current Python (sourced by demo.sh and test.sh).
# On a machine without an NVIDIA GPU, torch's CPU build is pinned first: an unpinned torch
# would pull a multi-GB CUDA build.
set -euo pipefail
PY=${PYTHON:-python3}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ! $PY -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    $PY -m pip install -q torch
  else
    $PY -m pip install -q torch==2.13.0
  fi
fi
# DS_BUILD_OPS=0: DeepSpeed installs without compiling its CUDA/C++ ops.
DS_BUILD_OPS=0 $PY -m pip install -q -e ".[dev,fp8]"
if $PY -c "import importlib.util,sys; sys.exit(0 if importlib.util.find_spec('torchvision') else 1)"; then
  if ! $PY -c "import torchvision" >/dev/null 2>&1; then
    echo "warning: a broken torchvision is installed; transformers' image processors will fail. pip uninstall torchvision" >&2
  fi
fi
