"""Start-up failures and the server's life cycle: a clear EngineError with the server's log tail,
never a hang, and no server outliving the process that started it."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rl.vllm_engine import VLM_ARCH, EngineError, VLLMEngine

from .conftest import ENGINE_KW

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parents[2]


def test_corrupt_model_dir_reports_the_log_tail(vllm_python, tiny, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(tiny[1] / "config.json", bad / "config.json")
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(EngineError) as err:
        VLLMEngine.start(bad, python=vllm_python, log_path=tmp_path / "server.log", **ENGINE_KW)
    msg = str(err.value)
    assert "exited with code" in msg and f"lines of {tmp_path / 'server.log'}" in msg
    assert "safetensors" in msg.lower()  # vLLM's own reason is in the tail


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="the VLM class imports where CUDA torchvision works")
def test_vlm_class_on_cpu_fails_at_start_with_a_clear_message(vllm_python, tmp_path):
    vlm = tmp_path / "vlm"
    vlm.mkdir()
    (vlm / "config.json").write_text(json.dumps({"architectures": [VLM_ARCH], "model_type": "exaone4_5"}))
    with pytest.raises(EngineError, match="(?s)cannot be imported.*torchvision.*export_text_model"):
        VLLMEngine.start(vlm, python=vllm_python, log_path=tmp_path / "server.log", **ENGINE_KW)


def test_mtp_needs_the_vlm_checkpoint(vllm_python, tiny):
    with pytest.raises(EngineError, match="(?s)MTP speculative decoding needs.*no MTP on CPU"):
        VLLMEngine.start(tiny[1], python=vllm_python, speculative_config={"method": "mtp", "num_speculative_tokens": 1})


def test_server_ends_with_the_process_that_started_it(vllm_python, tiny, tmp_path):
    """A trainer killed with SIGKILL runs no atexit handler: the server notices its parent is gone and
    takes its engine processes down with it; a client attached to it then gets EngineError."""
    script = tmp_path / "trainer.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from rl.vllm_engine import VLLMEngine
        if __name__ == "__main__":
            engine = VLLMEngine.start({str(tiny[1])!r}, python={str(vllm_python)!r},
                                      log_path={str(tmp_path / "server.log")!r}, **{ENGINE_KW!r})
            print(engine.port, engine.proc.pid, flush=True)
            time.sleep(600)
    """))
    trainer = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        port, server_pid = map(int, trainer.stdout.readline().split())
        other_rank = VLLMEngine.connect(port, request_timeout_s=30)
        assert other_rank.generate([[5, 6, 7]], n=2, temperature=1.0, max_new_tokens=4, seed=0)[0][1][0]
    finally:
        trainer.kill()
        trainer.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(server_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.killpg(server_pid, signal.SIGKILL)
        pytest.fail("the vLLM server (or its engine processes) outlived the process that started it")
    with pytest.raises(EngineError, match="unreachable"):
        other_rank.health()
