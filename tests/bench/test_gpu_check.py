"""The GPU check's own code on CPU (bench/gpu_check.py --device cpu --quick: the same check functions at
tiny sizes, in one process), and scripts/gpu_check.sh refusing a machine without CUDA before any work.
Nothing here needs a GPU; what the check measures on one is in bench/RESULTS-gpu.md once a session
with a GPU has run it."""

import re
import subprocess
import sys
import time

from ..training.helpers import ENV, ROOT

SECTIONS = ("Versions", "Launchers, +scale=mini, 3 steps", "Kernel parity (bf16, forward + backward, vs eager)",
            "Truncated 33B training step", "FP8 on the decoder layers' forward + backward",
            "One decoder layer's memory against length", "Decode")


def status(report: str, item: str) -> tuple[str, str]:
    """(status, the whole table row) of the report's row whose first cell is `item`."""
    row = next(line for line in report.splitlines() if line.startswith(f"| {item} |"))
    return row.split(" | ")[1], row


def test_quick_cpu_run_reports_every_section(tmp_path, demo_corpus):
    """torchao is treated as absent (--assume-missing; on some CPUs its scaled matmuls take seconds):
    its rows, Transformer Engine's and flex's backward on CPU are NOT CHECKED with the reason, never passed."""
    out = tmp_path / "RESULTS.md"
    cmd = [sys.executable, "bench/gpu_check.py", "--device", "cpu", "--quick", "--out", str(out),
           "--work", str(tmp_path / "work"), "--corpus", str(demo_corpus), "--assume-missing", "torchao"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout[-6000:]}\n{proc.stderr[-4000:]}"
    report = out.read_text()
    for title in SECTIONS:
        assert f"\n## {title}\n" in report, title
    assert re.search(r"\*\*\d+ passed, 0 failed, \d+ not checked\*\*", report)
    assert status(report, "stage1")[0] == "passed"
    assert status(report, "sft, DeepSpeed ZeRO-3")[0] == "NOT CHECKED"  # --quick runs stage1 only
    for case in ("hd128 window 24", "hd80 window 24", "hd128 global", "hd80 vision segments"):
        assert status(report, f"sdpa, {case}")[0] == "passed"
        assert status(report, f"flash (CPU varlen kernel), {case}")[0] == "passed"
        got, row = status(report, f"flex, {case}")
        assert got == "passed" and "forward only" in row  # CPU: torch has no flex backward
    assert status(report, "sdpa, fp8=none")[0] == "measured"  # CPU: numbers, no MFU verdict
    for item, reason in [("fp8=torchao (tensorwise)", "treated as absent"), ("fp8=te (tensorwise)", "transformer_engine"),
                         ("flex, fp8=none", "no flex_attention backward on CPU"), ("host syncs per step", "needs CUDA"),
                         ("flex: linear", "no flex_attention backward"), ("speedup torchao / bf16", "did not run")]:
        got, row = status(report, item)
        assert got == "NOT CHECKED" and reason in row, row
    assert status(report, "flash (CPU varlen kernel), 1K")[0] == "measured"
    assert status(report, "batch 4")[0] == "measured"
    assert "no: " in status(report, "flash_attn")[1] and "no: " in status(report, "transformer_engine")[1]


def test_without_cuda_the_script_exits_2_before_any_work(tmp_path):
    env = {**ENV, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable, "GPU_WHEELS": str(tmp_path / "wheels"),
           "GPU_SITE": str(tmp_path / "site"), "GPU_CHECK_WORK": str(tmp_path / "work")}
    start = time.time()
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA device here" in proc.stderr and "nothing was checked" in proc.stderr
    assert not (tmp_path / "site").exists() and not (tmp_path / "work").exists()  # nothing installed, no corpus
    driver = subprocess.run([sys.executable, "bench/gpu_check.py", "--work", str(tmp_path / "work")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert driver.returncode == 2 and "no CUDA device here" in driver.stderr
    assert not (tmp_path / "work").exists()
    print(f"both refused in {time.time() - start:.1f} s")
