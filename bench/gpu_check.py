"""The one-command GPU check (issue 15, item 4): what the GPU path does on one GPU, in at most 5
minutes of an H200, written to bench/RESULTS-gpu.md. `bash scripts/gpu_check.sh` installs the carried
wheels and runs this; `--device cpu --quick` runs the same check functions at tiny sizes (the test).

    python bench/gpu_check.py                                  # on a CUDA machine (what gpu_check.sh runs)
    python bench/gpu_check.py --sections step,fp8_layers       # some sections only (the others: NOT CHECKED)
    python bench/gpu_check.py --device cpu --quick --out /tmp/r.md   # the check's code on CPU, tiny sizes

Sections, in the order they run (the launchers run in the background meanwhile, in full mode), each
time-boxed (a share of --budget) and run in its own process(es), except with --inline (the default with
--quick), where they run in this process:
  versions    torch, CUDA, the GPU, and which optional packages import (and from where)
  launchers   every launcher with +scale=mini for 3 steps: stage1 (torchrun, 1 process), stage2 from it,
              sft under DeepSpeed ZeRO-2 and ZeRO-3 with generation metrics, grpo (native rollouts)
  parity      model.attention.attention for sdpa / flex / flash vs eager, bf16, forward + backward:
              packed documents (a 1-token one too), GQA, head_dim 128 and 80, with and without a
              sliding window, and the vision tower's non-causal segments
  step        the truncated 33B (2 decoder layers, sliding + global, and the MTP layer at full width,
              the full 153,600-word vocabulary, the whole vision tower): the trainer's pretrain_step
              on one packed 8,192-token row with two images, bf16 (fp32 master weights, FSDP2 on one
              rank), activation checkpointing and compile, per kernel x fp8 (none, torchao): tokens/s,
              MFU, peak memory against training.memory's estimate, finite loss; host syncs per step
  fp8_layers  the decoder layers' forward + backward (sliding + global, 33B width, compiled, bf16
              weights) with the MLPs in FP8 (torchao, as the release) against bf16
  memory      one global decoder layer's forward + backward peak memory at 8K-128K tokens per kernel
  decode      greedy decoding tokens/s of the truncated 33B (KV cache, sdpa)

Every result is passed, failed, measured (a number no goal applies to) or NOT CHECKED with the
reason (a package that is absent, a kernel that cannot run on the device, the time box). Exit
status: 0 when nothing failed, 1 when something did, 2 when --device cuda finds no CUDA device.

This file is the driver (time boxes, worker processes, the report); the sections' code is in
bench/gpu_check_sections.py, what both use (statuses, goals, `Ctx`, `Rows`) in bench/gpu_check_common.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from bench.gpu_check_common import (  # noqa: E402
    PASSED, FAILED, NOT_CHECKED, MEASURED, KERNELS, SECTIONS, ORDER, BACKGROUND, TIMED, Ctx, Rows,
    kernel_unavailable, fp8_unavailable, kernel_label, tail, kill_tree,
)
from bench.gpu_check_sections import (  # noqa: E402
    check_decode, check_fp8_layers, check_launchers, check_memory, check_parity, check_step, check_versions,
)


# --- the driver -----------------------------------------------------------------------------------


def worker_calls(section: str, ctx: Ctx) -> list[tuple[str, dict]]:
    """(worker name, its arguments) in the order they run; each is one process unless --inline."""
    if section == "step":  # the recipes' kernel (flex) first, bf16 before FP8
        calls = [("step", dict(kernel=k, fp8=f)) for f in ("none", "torchao") for k in KERNELS]
        calls.sort(key=lambda c: (c[1]["kernel"] != "flex", c[1]["fp8"] != "none"))
        first = next((c for c in calls if not not_runnable(*c, ctx)), None)
        if first:
            first[1]["syncs"] = True
        return calls
    if section == "memory":
        return [("memory", dict(kernel=k)) for k in ("flex", "flash", "sdpa")]
    return [(section, {})]


WORKERS: dict[str, Callable] = {"versions": check_versions, "parity": check_parity, "step": check_step,
                                "fp8_layers": check_fp8_layers, "memory": check_memory, "decode": check_decode}


def not_runnable(name: str, params: dict, ctx: Ctx) -> Optional[str]:
    """Why a worker call is not made at all (reported as NOT CHECKED without starting a process)."""
    if name == "memory":
        return kernel_unavailable(params["kernel"], ctx)
    if name == "step":
        if ctx.quick and params["fp8"] != "none":
            return "--quick runs fp8=torchao in fp8_layers only (a whole step in FP8 is slow on some CPUs)"
        if ctx.quick and params["kernel"] == "flash":
            return "--quick runs one kernel's step (sdpa)"
        return kernel_unavailable(params["kernel"], ctx) or fp8_unavailable(params["fp8"], ctx)
    return None


def run_section(section: str, ctx: Ctx, inline: bool, box: float) -> list[dict]:
    """Every worker call of the section within `box` seconds; rows of what did not report are NOT
    CHECKED (time box) and a worker that died adds a failed row with its log's tail."""
    rows_dir, logs = ctx.work / "rows", ctx.work / "logs"
    rows_dir.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + box
    collected = []
    for n, (name, params) in enumerate(worker_calls(section, ctx)):
        path = rows_dir / f"{section}_{n}.jsonl"
        path.unlink(missing_ok=True)
        out = Rows(section, path)
        label = " ".join(str(v) for k, v in params.items() if k != "syncs") or section
        why = not_runnable(name, params, ctx)
        if section == "launchers":
            check_launchers(dataclasses.replace(ctx, deadline=deadline), out)
            collected += Rows.read(path)[1]
            continue
        if why and name == "memory":  # reports each length as not checked, without touching the device
            check_memory(ctx, out, **params)
        elif why:
            out.row(_first_item(name, params, ctx), NOT_CHECKED, why)
        elif deadline - time.time() < (30 if ctx.cuda and name == "step" else 3):
            out.row(_first_item(name, params, ctx), NOT_CHECKED, "the section's time box ran out before it started")
        elif inline:
            try:
                WORKERS[name](dataclasses.replace(ctx, deadline=deadline), out, **params)
            except Exception as e:
                out.row(f"{label}: worker", FAILED, f"{type(e).__name__}: {str(e)[:400]}")
        else:
            _spawn(name, params, ctx, path, deadline, logs / f"{section}_{n}.log", out, label)
        plan, rows = Rows.read(path)
        done = {r["item"] for r in rows}
        rows += [dict(section=section, item=i, status=NOT_CHECKED, note="its worker stopped before reaching it "
                      "(time box or failure above)") for i in plan if i not in done]
        collected += rows
    return collected


def _first_item(name: str, params: dict, ctx: Ctx) -> str:
    if name == "step":
        return f"{kernel_label(params['kernel'], ctx)}, fp8={params['fp8']}"
    if name == "memory":
        return f"{kernel_label(params['kernel'], ctx)}: every length"
    return name


def _spawn(name, params, ctx: Ctx, path: Path, deadline: float, log: Path, out: Rows, label: str) -> None:
    cmd = [sys.executable, __file__, "--worker", name, "--params", json.dumps(params), "--rows", str(path),
           "--deadline", str(deadline), "--device", ctx.device, "--work", str(ctx.work), "--corpus", str(ctx.corpus),
           "--assume-missing", ",".join(sorted(ctx.missing))] + (["--quick"] if ctx.quick else [])
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        rc = proc.wait(timeout=max(1.0, deadline - time.time() + 10))  # 10 s grace past the box
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        plan, rows = Rows.read(path)
        if set(plan) - {r["item"] for r in rows}:
            out.row(f"{label}: worker", NOT_CHECKED, "killed at the section's time box while running: what it had "
                    "not reported is unknown", log=tail(log))
        return
    if rc != 0:
        out.row(f"{label}: worker", FAILED, f"exit {rc}", log=tail(log))


def run_all(ctx: Ctx, sections: list[str], budget: float, inline: bool) -> list[dict]:
    """Sections in ORDER within `budget` seconds; full mode runs BACKGROUND sections in a thread beside
    the others until the first TIMED one. Each section's box is its share of the budget (SECTIONS'
    seconds, scaled to it) on a running schedule: time a section leaves unused goes to the next."""
    start = time.time()
    end = start + budget
    nominal = {s: SECTIONS[s][1] for s in sections}
    overlap = not inline and any(s in BACKGROUND for s in sections)
    foreground = [s for s in ORDER if s in sections and not (overlap and s in BACKGROUND)]
    planned = sum(nominal[s] for s in foreground)
    if overlap:
        before = sum(nominal[s] for s in foreground if s not in TIMED)
        planned += max(0, sum(nominal[s] for s in BACKGROUND if s in sections) - before)
    scale = budget / max(planned, 1)
    results: dict[str, list] = {}
    background = []
    if overlap:
        for s in BACKGROUND & set(sections):
            box = min(nominal[s] * scale, end - time.time())
            print(f"== {s} ({box:.0f} s, in the background)", flush=True)
            t = threading.Thread(target=lambda s=s, box=box: results.__setitem__(s, run_section(s, ctx, inline, box)))
            t.start()
            background.append(t)
    schedule = start
    for s in foreground:
        if s in TIMED:
            for t in background:
                t.join()
            background = []
            schedule = max(schedule, time.time())
        schedule += nominal[s] * scale
        box = min(schedule, end) - time.time()
        print(f"== {s} ({box:.0f} s)", flush=True)
        if box < 2:
            results[s] = [dict(section=s, item=s, status=NOT_CHECKED, note="the whole check's time budget ran out")]
            continue
        began = time.time()
        results[s] = run_section(s, ctx, inline, box)
        print(f"   {s}: {time.time() - began:.0f} s", flush=True)
    for t in background:
        t.join()
    return [r for s in ORDER for r in results.get(s, [])]


def render(rows: list[dict], meta: dict) -> str:
    counts = {s: sum(r["status"] == s for r in rows) for s in (PASSED, FAILED, NOT_CHECKED, MEASURED)}
    device = next((r.get("version") for r in rows if r["item"] == "device"), meta["device"])
    lines = [
        f"# GPU check ({meta['date']})", "",
        f"`{meta['command']}` on {device}: {meta['seconds']:.0f} s of a {meta['budget']:.0f} s budget"
        + (" (--quick: tiny sizes; timings mean nothing)" if meta["quick"] else "") + ".", "",
        f"**{counts[PASSED]} passed, {counts[FAILED]} failed, {counts[NOT_CHECKED]} not checked**, "
        f"{counts[MEASURED]} measured (numbers without a goal). Nothing absent is ever reported as passed.", "",
        "Goals (issue 15):", "",
    ]
    goals = [r for r in rows if (r["section"] == "step" and "fp8=none" in r["item"]) or r["item"].startswith("speedup")
             or (r["item"].endswith(": linear") and not r["item"].startswith("sdpa"))]
    lines += [f"- {r['section']} / {r['item']}: **{r['status']}**"
              + "".join(f", {k} {r[k]}" for k in ("mfu", "speedup", "ratio") if k in r) for r in goals] or ["- none ran"]
    for section in ORDER:
        sec_rows = [r for r in rows if r["section"] == section]
        if not sec_rows:
            continue
        title, _, what = SECTIONS[section]
        lines += ["", f"## {title}", "", what, ""]
        keys = [k for k in dict.fromkeys(k for r in sec_rows for k in r) if k not in ("section", "item", "status", "note", "log")]
        lines.append("| " + " | ".join(["item", "status", *keys, "note"]) + " |")
        lines.append("|" + "---|" * (len(keys) + 3))
        for r in sec_rows:
            cells = [str(r.get(k, "")).replace("|", "/") for k in keys]
            lines.append("| " + " | ".join([r["item"], r["status"], *cells, r.get("note", "")]) + " |")
        for r in sec_rows:
            if r.get("log"):
                lines += ["", f"`{r['item']}`, the end of its log:", "", "```", r["log"], "```"]
    skipped = [r for r in rows if r["status"] == NOT_CHECKED]
    if skipped:
        lines += ["", "## Not checked", ""] + [f"- {r['section']} / {r['item']}: {r.get('note') or '-'}" for r in skipped]
    return "\n".join(lines) + "\n"


def ensure_corpus(path: Path, quick: bool) -> None:
    if (path / "manifest.json").exists():
        return
    print(f"== building the demo corpus at {path}", flush=True)
    subprocess.run([sys.executable, "-m", "data.demo", "build", "--out", str(path), "--scale", "0.02", "--heldout", "16"]
                   + (["--workers", "1"] if quick else []), cwd=ROOT, check=True, timeout=300)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true", help="tiny sizes (the tiny preset instead of the 33B), 1-2 steps")
    p.add_argument("--out", default=None, help="the report (default: bench/RESULTS-gpu.md on CUDA, "
                                                "out/gpu_check/RESULTS-cpu.md on CPU)")
    p.add_argument("--work", default=str(ROOT / "out" / "gpu_check"), help="logs, rows, launcher runs")
    p.add_argument("--corpus", default=None, help="a demo corpus (default: WORK/corpus, built if missing)")
    p.add_argument("--budget", type=float, default=None, help="seconds for all sections (default 270; --quick 600)")
    p.add_argument("--sections", default=",".join(ORDER), help=f"comma-separated subset of {','.join(ORDER)}")
    p.add_argument("--assume-missing", default="", help="packages to treat as absent (tests: NOT CHECKED paths)")
    p.add_argument("--inline", action=argparse.BooleanOptionalAction, default=None,
                   help="run sections in this process (default with --quick) instead of one process each")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--params", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--rows", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=math.inf, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    work = Path(a.work).resolve()
    ctx = Ctx(a.device, a.quick, work, Path(a.corpus).resolve() if a.corpus else work / "corpus",
              frozenset(filter(None, a.assume_missing.split(","))), a.deadline)
    if a.worker:
        WORKERS[a.worker](ctx, Rows(a.worker, Path(a.rows)), **json.loads(a.params))
        return 0
    if a.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False): nothing was checked. "
              "Run it on the GPU machine, or `--device cpu --quick` for the check's own code.", file=sys.stderr)
        return 2
    sections = [s.strip() for s in a.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(ORDER))
    if unknown:
        p.error(f"--sections: unknown {unknown}; choose from {ORDER}")
    out_path = Path(a.out or (ROOT / "bench" / "RESULTS-gpu.md" if a.device == "cuda" else work / "RESULTS-cpu.md"))
    budget = a.budget or (600.0 if a.quick else 270.0)
    inline = a.quick if a.inline is None else a.inline
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    if "launchers" in sections:
        ensure_corpus(ctx.corpus, a.quick)
    rows = run_all(ctx, sections, budget - (time.time() - start), inline)
    rows += [dict(section=s, item=s, status=NOT_CHECKED, note="not selected (--sections)") for s in ORDER if s not in sections]
    meta = dict(date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), device=a.device, quick=a.quick,
                seconds=time.time() - start, budget=budget,
                command="python bench/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(render(rows, meta))
    print(out_path.read_text(), flush=True)
    print(f"gpu_check: report written to {out_path}", flush=True)
    return 1 if any(r["status"] == FAILED for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
