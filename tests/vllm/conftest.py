"""Fixtures of the vLLM engine tests: they need the engine's venv (`bash scripts/setup.sh vllm`), and
fail, not skip, without it, so CI cannot pass by not running them.

They run through scripts/test_vllm.sh (`python -m pytest tests/vllm`), after the main suite, which
leaves this directory out: `pytest` over tests/ does not collect it unless it is named on the
command line (`pytest_ignore_collect` below), so the main suite needs no vLLM venv.
"""

from pathlib import Path

import pytest
import torch

from model.config import preset
from model.vlm import build_model
from rl.vllm_engine import SETUP_HINT, VLLMEngine, default_python, export_text_model

# One small engine for the whole module: start-up (~20 s on 2 cores) dominates these tests.
ENGINE_KW = dict(max_model_len=512, kv_cache_gib=0.25, gpu_memory_utilization=0.1, startup_timeout_s=300)


HERE = Path(__file__).resolve().parent


def pytest_ignore_collect(collection_path, config):
    asked = [Path(str(a).split("::")[0]).resolve() for a in config.args]
    if not any(a == HERE or HERE in a.parents for a in asked):
        return True
    return None


@pytest.fixture(scope="session")
def vllm_python():
    python = default_python()
    if not python.exists():
        pytest.fail(f"the vLLM venv is missing ({python}): create it with `{SETUP_HINT}`", pytrace=False)
    return python


def tiny_model(seed: int = 0):
    """The tiny preset (hidden 128, 4 heads / 2 KV heads, head_dim 32, window 64), random, fp32."""
    torch.manual_seed(seed)
    return build_model(preset("tiny")).eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = tiny_model()
    return model, export_text_model(model.state_dict(), model.cfg, tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def engine(vllm_python, tiny, tmp_path_factory):
    eng = VLLMEngine.start(tiny[1], python=vllm_python, log_path=tmp_path_factory.mktemp("log") / "server.log", **ENGINE_KW)
    yield eng
    eng.stop()
