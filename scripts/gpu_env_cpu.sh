#!/usr/bin/env bash
# The lent GPU machine's Python and packages, on this CPU machine: what `bash scripts/gpu_check.sh` meets
# there (../.library/device/KINDS.md: Python 3.12, torch 2.11.0+cu130, transformers 5.17, accelerate 1.15,
# no deepspeed/hydra/webdataset/math-verify/torchao), with the carried wheels (gpu_wheels/, made by
# `bash scripts/gpu_check.sh --prepare`) installed as the check installs them there: pip --target into a
# directory ahead of the machine's packages on PYTHONPATH. PyPI's torch 2.11 is its CUDA build (about 3 GB
# downloaded once into a venv outside the repo); it runs on CPU. Nothing here is needed by the tests or CI:
# it finds what the GPU machine's older torch and Python would break before a GPU session spends its minutes.
#   bash scripts/gpu_env_cpu.sh                         # every launcher, +scale=mini, 3 steps (gpu_check.py on CPU)
#   bash scripts/gpu_env_cpu.sh python -m pytest -n 2 --dist loadfile   # or any command in that environment
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
VENV=${GPU_ENV_VENV:-/tmp/gpu_env_venv}
SITE=${GPU_ENV_SITE:-/tmp/gpu_env_site}
# The machine's own versions (KINDS.md's pip list); the rest of what it has, unpinned.
MACHINE=(torch==2.11.0 transformers==5.17.0 accelerate==1.15.0 safetensors==0.8.0 tokenizers==0.23.2
         huggingface_hub==1.33.0 numpy==2.5.2 pillow sympy scikit-learn einops py-cpuinfo msgpack ninja packaging
         nvidia-ml-py tqdm pyyaml regex psutil matplotlib pytest pytest-xdist)
TEST_ONLY=(datasets wandb pytest-timeout)  # not on that machine: the tests need them, the launchers do not

if [ ! -x "$VENV/bin/python" ]; then
  PY312=${PY312:-$(ls /root/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | head -1)}
  PY312=${PY312:-python3.12}
  "$PY312" -c 'import sys; assert sys.version_info[:2] == (3, 12), sys.version' \
    || { echo "gpu_env_cpu: needs a Python 3.12 (PY312=...), the GPU machine's" >&2; exit 1; }
  "$PY312" -m venv "$VENV"
  echo "== installing the GPU machine's packages into $VENV (torch 2.11's CUDA build: ~3 GB, once)"
  "$VENV/bin/pip" install -q "${MACHINE[@]}" "${TEST_ONLY[@]}"
fi
ls gpu_wheels/*.whl >/dev/null 2>&1 || bash scripts/gpu_check.sh --prepare
echo "== the carried wheels into $SITE, ahead of the venv's packages (as scripts/gpu_check.sh does there)"
"$VENV/bin/pip" install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" gpu_wheels/*.whl
export PATH="$VENV/bin:$PATH" PYTHONPATH="$SITE:$PWD" TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
python -c 'import torch, transformers, deepspeed; print("== torch", torch.__version__, "transformers",
  transformers.__version__, "deepspeed", deepspeed.__version__)' 2>&1 | grep '^=='
if [ $# -eq 0 ]; then
  exec python bench/gpu_check.py --device cpu --sections versions,launchers --budget 900 \
    --work out/gpu_env_cpu --out out/gpu_env_cpu/RESULTS-cpu.md
fi
exec "$@"
