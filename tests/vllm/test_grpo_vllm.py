"""GRPO with its rollouts on vLLM (`rl.rollout_engine=vllm`, rl/rollout_engine.py): launch/grpo.py on
2 ranks over gloo, the tiny model in fp32 on text-only math prompts for 10 steps, one vLLM server
(local rank 0 starts it, rank 1 connects) that both ranks sample from, updated after every optimizer
step; and a mixture with images refused on CPU before the model loads.

From scratch nothing answers math, so every group has zero reward spread and GRPO alone would not
move the weights: the run keeps every group (`rl.zero_std_tol=-1`) and trains an entropy bonus
(`rl.entropy_coef`), which changes the policy at every optimizer step (lr 1e-3, two epochs) by far
more than 1e-3 in log-prob: tests/vllm/test_engine.py shows stale weights give errors above 1e-2.
"""

import json
import math
import os
import re
import time
from pathlib import Path

import pytest

from tests.training.helpers import launch, metrics

pytestmark = pytest.mark.timeout(600)

STEPS = 10
GRPO = ["+recipe=grpo", "+scale=mini", "wandb.mode=disabled", "data.num_workers=0",
        "data.stages.grpo.counting=0",  # math only: text prompts (vLLM on CPU serves the text model)
        "rl.rollout_engine=vllm", "rl.vllm.kv_cache_gib=0.25", f"train.steps={STEPS}", "train.micro_batch_size=8",
        "train.lr=1e-3", "checkpoint.every=5", "rl.group_size=4", "rl.train_prompts_per_step=4",
        "rl.rollout_prompts_per_batch=4", "rl.max_gen_batches=1", "rl.max_new_tokens=16", "rl.update_epochs=2",
        "rl.entropy_coef=0.05", "rl.zero_std_tol=-1", "rl.eval_prompts_per_source=4", "rl.eval_samples=2"]


def _shm() -> set[str]:
    """Our sync/export directories and Python shared memory (vLLM's message queues) in /dev/shm."""
    return {p for p in os.listdir("/dev/shm") if p.startswith(("exaone_vllm_", "psm_"))}


def test_grpo_on_vllm_two_ranks(vllm_python, tmp_path, demo_corpus):
    shm_before = _shm()
    start = time.perf_counter()
    launch("grpo.py", GRPO + [f"data.root={demo_corpus}", f"run_dir={tmp_path}", f"rl.vllm.python={vllm_python}"],
           nproc=2, timeout=540)
    seconds = time.perf_counter() - start
    rows = metrics(tmp_path)
    steps = rows[1:]
    assert [r["step"] for r in rows] == list(range(STEPS + 1))
    assert "eval/accuracy" in rows[0] and "eval/accuracy" in rows[-1]  # held-out evaluation through vLLM too
    for r in steps:
        assert r["num_train_groups"] == 4 and r["response_length_mean"] > 0, r
        assert r["rollout/logprob_diff_max"] <= 1e-3, (r["step"], r["rollout/logprob_diff_max"])
        assert r["rollout/sync_s"] > 0 and r["rollout/sync_gb"] > 0, r
        assert math.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["approx_kl"] > 0, r
    assert (tmp_path / "checkpoints" / "step_10").is_dir()
    diffs = " ".join(f"{r['rollout/logprob_diff_max']:.1e}" for r in steps)
    syncs = " ".join(f"{r['rollout/sync_s']:.2f}" for r in steps)
    print(f"\n2-rank GRPO on vLLM, {STEPS} steps: {seconds:.0f} s; logprob_diff_max per step {diffs}; "
          f"sync_s {syncs} for {steps[0]['rollout/sync_gb'] * 1e3:.1f} MB")

    # The server is gone: stopped by the run (its own shutdown), with its engine processes (its
    # process group is empty) and its shared memory.
    log = (tmp_path / "vllm_server.rank0.log").read_text()
    assert "shutting down: /shutdown" in log
    pid = int(re.search(r"ready on 127\.0\.0\.1:\d+ \(pid (\d+)", log).group(1))
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    assert not (tmp_path / "vllm_server.rank1.log").exists()  # rank 1 connected to rank 0's server
    assert _shm() <= shm_before
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["step"] == STEPS


def test_images_with_vllm_on_cpu_fail_before_the_model_loads(tmp_path, demo_corpus):
    """The default mini mixture has counting prompts (images): refused at start-up, naming the key."""
    proc = launch("grpo.py", ["+recipe=grpo", "+scale=mini", "wandb.mode=disabled", f"data.root={demo_corpus}",
                              f"run_dir={tmp_path}", "rl.rollout_engine=vllm"], nproc=0, check=False, timeout=120)
    assert proc.returncode != 0
    assert re.search(r"config error at `rl.rollout_engine`.*'counting' holds images.*GPU vLLM only \(unverified\)",
                     proc.stderr), proc.stderr[-3000:]
    assert not (tmp_path / "checkpoints").exists() and not list(Path(tmp_path).glob("vllm_server*"))


def test_a_dead_server_stops_the_run_and_its_last_checkpoint_resumes(vllm_python, tmp_path, demo_corpus):
    """The server process killed mid-run (as by the OOM killer): the run fails with EngineError naming
    the server, the client ends the server's orphaned engine processes and their shared memory, and
    the newest checkpoint is complete and resumes (here with native rollouts, which need no server)."""
    import signal
    import subprocess
    import sys

    from tests.training.helpers import ENV, ROOT, free_port
    from training.checkpoint import latest_checkpoint

    common = GRPO + [f"data.root={demo_corpus}", f"run_dir={tmp_path}", "rl.eval_prompts_per_source=0"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "launch" / "grpo.py"), *common, "train.steps=40", "checkpoint.every=3", f"rl.vllm.python={vllm_python}"]
    shm_before = _shm()
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "checkpoints" / "step_3").is_dir():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr.txt").read_text()[-3000:]
            time.sleep(0.2)
        log = (tmp_path / "vllm_server.rank0.log").read_text()
        pid = int(re.search(r"ready on 127\.0\.0\.1:\d+ \(pid (\d+)", log).group(1))
        os.kill(pid, signal.SIGKILL)
        assert proc.wait(120) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = (tmp_path / "stderr.txt").read_text()
    error = re.search(r"EngineError: the vLLM (rollout )?server .*(unreachable|exited).*", stderr)
    assert error, stderr[-3000:]
    print(f"\n{error.group(0)}")
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    assert _shm() <= shm_before
    last = latest_checkpoint(tmp_path)
    step = int(last.name.split("_")[1])
    assert step % 3 == 0 and step < 40
    launch("grpo.py", common + ["rl.rollout_engine=native", f"train.steps={step + 1}"], nproc=2)
    rows = metrics(tmp_path)
    assert rows[-1]["step"] == step + 1 and math.isfinite(rows[-1]["loss"])
