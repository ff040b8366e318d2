"""The pipeline report: did each stage of the recipe do its job?

    python -m training.report out/demo                      # stages stage1 stage2 sft grpo under it
    python -m training.report out/demo --stages stage1 stage2 --prompts 32

Writes `<out>/report.png` (training curves of every stage on one global step axis: loss, held-out
loss, learning rate, tokens/s, GRPO reward and the share of zero-variance groups) and
`<out>/report.md`: every stage's final checkpoint (and the seeded initialization before stage 1)
evaluated the same way, on one process:

- held-out loss per task: `--batches` packed held-out batches of each source with a held-out split,
  one source at a time (training/evaluate.py), so each number is comparable from row to row;
- generation (training/generation_eval.py, greedy, non-reasoning prompts): boxed-math exact match,
  digit accuracy (digit-image chats), counting accuracy, grounding IoU over `--prompts` held-out
  prompts per task;
- and the GRPO run's own held-out evaluation before and after GRPO (rl/train.py HeldoutEval): accuracy
  with the format reward excluded, sampled like the policy and greedy, and the reward.

Then each stage's target metric (TARGETS) before and after it: stage 1 the held-out loss of its
mixture's image-text and text tasks, stage 2 the tasks its mixture moves toward, SFT boxed-answer
exact match, GRPO held-out accuracy (format excluded).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

import torch
from omegaconf import OmegaConf

from data.schema import TASKS

GEN_TASKS = ("math", "digits", "counting", "grounding")
GEN_NAMES = {"math": "boxed-math EM", "digits": "digit acc.", "counting": "counting acc.", "grounding": "grounding IoU"}
# stage -> (what it should improve, the metric, higher is better)
TARGETS = {
    "stage1": ("held-out loss: caption, interleaved, ocr, document, text", "loss:caption,interleaved,ocr,document,text", False),
    "stage2": ("held-out loss: grounding, document, ocr, math, stem", "loss:grounding,document,ocr,math,stem", False),
    "sft": ("boxed-answer exact match: math, digits, counting", "gen:math,digits,counting", True),
    "grpo": ("held-out accuracy, format excluded (math, counting; reasoning on{decoding})", "grpo_accuracy", True),
}


def grpo_decoding(run_dir: Path) -> str:
    """How the GRPO run's held-out reward was decoded, from its config: '; 4 sampled answers per prompt at T=1.0'."""
    path = run_dir / "config.yaml"
    if not path.exists():
        return ""
    rl = OmegaConf.load(path).get("rl")
    if not rl or "eval_temperature" not in rl:
        return ""
    if not rl.eval_temperature:
        return "; greedy"
    return f"; {rl.eval_samples} sampled answers per prompt at T={rl.eval_temperature:g}"


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl rows, the last one per step (a resumed run logs steps after its checkpoint again)."""
    rows: dict[int, dict] = {}
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        row = json.loads(line)
        rows[row["step"]] = {**rows.get(row["step"], {}), **row}
    return [rows[k] for k in sorted(rows)]


def evaluate_model(model, tokenizer, data_cfg: dict, batches: int = 2, prompts: int = 64,
                   max_new_tokens: int = 40) -> dict:
    """Held-out loss per task and generation metrics of one model (one process)."""
    from data.mixture import build_loader, heldout_sources, to_data_config

    from .evaluate import loss_row, model_sums
    from .generation_eval import evaluate_generation

    cfg = to_data_config(data_cfg)
    device = next(model.parameters()).device
    sums = [0.0] * (2 * len(TASKS))
    for source in heldout_sources(cfg, list(cfg.sources or TASKS)):  # every source with a held-out split
        # a few batches per source: read in this process (a worker would cost more to start than it reads)
        loader = build_loader({**data_cfg, "mixture": {source: 1.0}, "num_workers": 0}, tokenizer=tokenizer, rank=0,
                              world_size=1, seed=0, micro_batch_size=4, seq_len=cfg.seq_len, split="heldout")
        part = model_sums(model, loader.first(batches), device)
        sums = [a + b for a, b in zip(sums, part)]
    row = loss_row(sums)
    if prompts:
        row.update(evaluate_generation(model, tokenizer, data_cfg, tasks=GEN_TASKS, limit_per_task=prompts,
                                       max_new_tokens=max_new_tokens))
    return row


def target_value(row: dict, key: str) -> Optional[float]:
    kind, _, names = key.partition(":")
    if kind == "loss":
        values = [row.get(f"eval/loss/{t}") for t in names.split(",")]
    elif kind == "gen":  # pooled over the tasks' prompts
        tasks = names.split(",")
        count = sum(row.get(f"gen/{t}/count", 0) for t in tasks)
        return sum(row[f"gen/{t}"] * row[f"gen/{t}/count"] for t in tasks if row.get(f"gen/{t}/count")) / count if count else None
    else:
        values = [row.get(key)]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


GRPO_EVALS = {"grpo_accuracy": "eval/accuracy", "grpo_accuracy_greedy": "eval/accuracy_greedy", "grpo_reward": "eval/reward"}


def grpo_evals(run_dir: Path) -> tuple[dict, dict]:
    """The GRPO run's own held-out evaluation (rl/train.py HeldoutEval) before its first step and
    after its last: {name: value} for GRPO_EVALS, empty when the run has not both."""
    evals = [r for r in read_metrics(run_dir) if "eval/accuracy" in r]
    if len(evals) < 2 or evals[0]["step"] != 0:
        return {}, {}
    return tuple({name: row.get(key) for name, key in GRPO_EVALS.items()} for row in (evals[0], evals[-1]))


def evaluate_stages(out: Path, stages: list[str], batches: int, prompts: int, max_new_tokens: int) -> dict[str, dict]:
    """{"init": row, stage: row, ...}: the seeded initialization of stage 1 and each stage's final checkpoint."""
    from data.text import load_tokenizer
    from model.vlm import Exaone45

    from .config import model_config
    from .export import load_for_inference

    first = OmegaConf.load(out / stages[0] / "config.yaml")
    data_cfg = OmegaConf.to_container(first.data, resolve=True)
    data_cfg.pop("stages", None)
    tokenizer = load_tokenizer(data_cfg.get("tokenizer"))
    torch.manual_seed(first.train.seed)  # stage 1's seeded initialization (training/parallelize.py seeded_init)
    init = Exaone45(model_config(first))
    init.init_weights()
    rows = {}
    for name in ("init", *stages):
        model = init.eval() if name == "init" else load_for_inference(str(out / name))[0]
        rows[name] = evaluate_model(model, tokenizer, data_cfg, batches, prompts, max_new_tokens)
        print(f"report: evaluated {name}", flush=True)
    if "grpo" in stages:
        before, after = grpo_evals(out / "grpo")
        previous = stages[stages.index("grpo") - 1] if stages.index("grpo") else "init"
        rows[previous].update(before)
        rows["grpo"].update(after)
    return rows


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def write_markdown(out: Path, stages: list[str], rows: dict[str, dict], prompts: int) -> str:
    names = ["init", *stages]
    tasks = [t for t in TASKS if any(f"eval/loss/{t}" in rows[n] for n in names)]
    lines = [f"# Pipeline report: {out}", "",
             "Every checkpoint evaluated the same way (`python -m training.report`): held-out loss per task "
             "(each task's own held-out batches), greedy generation on "
             f"{prompts} held-out prompts per task (non-reasoning prompts), and the GRPO run's own held-out "
             "evaluation (accuracy with the format reward excluded, sampled and greedy, and the reward). "
             "`init` is the seeded initialization stage 1 starts from.", "",
             "## Each stage against its own target", "",
             "| stage | target | before | after | change | improved |", "|---|---|---|---|---|---|"]
    previous = "init"
    for stage in stages:
        if stage not in TARGETS:
            continue
        what, key, higher = TARGETS[stage]
        what = what.format(decoding=grpo_decoding(out / stage) if stage == "grpo" else "")
        before, after = target_value(rows[previous], key), target_value(rows[stage], key)
        ok = None if before is None or after is None else (after > before if higher else after < before)
        change = "–" if ok is None else f"{after - before:+.3f}"
        lines.append(f"| {stage} | {what} | {_fmt(before)} | {_fmt(after)} | {change} | "
                     f"{'–' if ok is None else 'yes' if ok else 'NO'} |")
        previous = stage
    lines += ["", "## Held-out loss per task (lower is better)", "",
              "| checkpoint | all | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 2) + "|"]
    for n in names:
        lines.append(f"| {n} | {_fmt(rows[n].get('eval/loss'))} | "
                     + " | ".join(_fmt(rows[n].get(f"eval/loss/{t}")) for t in tasks) + " |")
    grpo_columns = {"grpo_accuracy": "GRPO accuracy", "grpo_accuracy_greedy": "GRPO accuracy (greedy)",
                    "grpo_reward": "GRPO reward"}
    lines += ["", "## Held-out generation (higher is better)", "",
              "| checkpoint | " + " | ".join([GEN_NAMES[t] for t in GEN_TASKS] + list(grpo_columns.values())) + " |",
              "|---" * (len(GEN_TASKS) + len(grpo_columns) + 1) + "|"]
    for n in names:
        lines.append(f"| {n} | " + " | ".join([_fmt(rows[n].get(f"gen/{t}")) for t in GEN_TASKS]
                                               + [_fmt(rows[n].get(k)) for k in grpo_columns]) + " |")
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    (out / "report.json").write_text(json.dumps(rows, indent=1))
    return text


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def plot(out: Path, stages: list[str]) -> Path:
    """report.png: loss, held-out loss, learning rate and tokens/s of every stage on one global step
    axis (stage boundaries marked), and the GRPO stage's reward and zero-variance share on its own."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    curves = [("loss", "training loss (LM + MTP; GRPO: policy loss)", False), ("eval/loss", "held-out loss (the stage's mixture)", False),
              ("lr", "learning rate", False), ("tokens_per_s", "tokens/s (all ranks)", True)]
    offset, colors = 0, plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, stage in enumerate(stages):
        rows = read_metrics(out / stage)
        if not rows:
            continue
        color = colors[i % len(colors)]
        for ax, (key, _, _) in zip(axes.flat, curves):
            pts = [(offset + r["step"], r[key]) for r in rows if r.get(key) is not None]
            if not pts:
                continue
            x, y = zip(*pts)
            if key == "loss" and len(pts) > 20:  # noisy per step: raw faintly, a 10-step mean on top
                ax.plot(x, y, color=color, alpha=0.3, lw=0.8)
                ax.plot(x, _smooth(list(y), 10), color=color, label=stage)
            else:
                ax.plot(x, y, color=color, label=stage, marker="o" if len(pts) < 12 else None, ms=3)
        last = offset + rows[-1]["step"]
        for ax in axes.flat[:4]:
            ax.axvline(last, color="grey", lw=0.6, ls=":")
        axes.flat[0].text((offset + last) / 2, 1.0, stage, transform=axes.flat[0].get_xaxis_transform(),
                          ha="center", va="bottom", fontsize=9)
        offset = last
    for ax, (key, title, log) in zip(axes.flat, curves):
        ax.set_title(title, fontsize=11, pad=14 if ax is axes.flat[0] else 6)
        ax.set_xlabel("step (all stages on one axis)")
        if log:
            ax.set_yscale("log")
    grpo = read_metrics(out / "grpo") if "grpo" in stages else []
    reward, zero = axes.flat[4], axes.flat[5]
    rollout = [(r["step"], r["reward_mean"]) for r in grpo if "reward_mean" in r]
    if rollout:
        x, y = zip(*rollout)
        reward.plot(x, y, color="C3", alpha=0.35, lw=0.8, label="rollout batches")
        reward.plot(x, _smooth(list(y), 5), color="C3", label="rollout batches, 5-step mean")
        held = [(r["step"], r["eval/reward"]) for r in grpo if "eval/reward" in r]
        if held:
            reward.plot(*zip(*held), color="k", ls="--", marker="s", ms=5, label="held-out reward")
        accuracy = [(r["step"], r["eval/accuracy"]) for r in grpo if "eval/accuracy" in r]
        if accuracy:
            reward.plot(*zip(*accuracy), color="C2", ls="--", marker="o", ms=5, label="held-out accuracy (format excluded)")
        x, y = zip(*[(r["step"], r["frac_zero_std_groups"]) for r in grpo if "frac_zero_std_groups" in r])
        zero.plot(x, y, color="C4", alpha=0.35, lw=0.8, label="per step")
        zero.plot(x, _smooth(list(y), 5), color="C4", label="5-step mean")
        zero.set_ylim(0, 1)
    reward.set_title("GRPO: reward and held-out accuracy", fontsize=11)
    zero.set_title("GRPO: share of zero-variance groups (dropped, refilled)", fontsize=11)
    for ax in (reward, zero):
        ax.set_xlabel("GRPO step")
    for ax in axes.flat:
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.grid(alpha=0.3)
    fig.suptitle(f"EXAONE 4.5 recipe in miniature: {out}", fontsize=13)
    fig.tight_layout()
    path = out / "report.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


SUMMARY_KEYS = ("loss", "eval/loss", "gen/math", "gen/digits", "gen/counting", "reward_mean", "eval/reward",
                "eval/accuracy")


def summary_line(run_dir: Path) -> str:
    """One line per stage: steps and the first -> last value of the main curves."""
    rows = read_metrics(run_dir)
    if not rows:
        return f"{run_dir}: no metrics"
    parts = [f"{run_dir}: {rows[-1]['step']} steps"]
    for key in SUMMARY_KEYS:
        values = [r[key] for r in rows if r.get(key) is not None]
        if len(values) >= 2:
            parts.append(f"{key} {values[0]:.3f} -> {values[-1]:.3f}")
    return ", ".join(parts)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="the directory holding one run directory per stage")
    p.add_argument("--summary", action="store_true", help="only print one line about the run directory `out`")
    p.add_argument("--stages", nargs="+", default=["stage1", "stage2", "sft", "grpo"])
    p.add_argument("--batches", type=int, default=2, help="held-out batches (4 sequences each) per task")
    p.add_argument("--prompts", type=int, default=64, help="held-out prompts per generation task")
    p.add_argument("--max-new-tokens", type=int, default=40)
    args = p.parse_args(argv)
    if args.summary:
        print(summary_line(args.out), flush=True)
        return
    stages = [s for s in args.stages if (args.out / s / "config.yaml").exists()]
    missing = sorted(set(args.stages) - set(stages))
    if not stages:
        raise SystemExit(f"no stage run directories under {args.out} (looked for {args.stages})")
    if missing:
        print(f"report: no run directory for {missing}; reporting {stages}", flush=True)
    rows = evaluate_stages(args.out, stages, args.batches, args.prompts, args.max_new_tokens)
    print(write_markdown(args.out, stages, rows, args.prompts))
    print(f"report: {plot(args.out, stages)} and {args.out / 'report.md'}")


if __name__ == "__main__":
    main()
