"""The pipeline report: the same evaluation for every checkpoint, each stage judged on its own target,
a labelled PNG of every stage's curves, and the one-line summaries demo.sh prints."""

import json

import pytest
import torch

from training import report


def _write_run(run_dir, rows):
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("{}\n")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _rows(stage):
    if stage == "grpo":
        return [{"step": 0, "eval/reward": 0.10, "eval/accuracy": 0.08, "eval/accuracy_greedy": 0.12}] + [
            {"step": s, "loss": 0.01 * s, "lr": 1e-4, "tokens_per_s": 900.0, "reward_mean": 0.1 + 0.01 * s,
             "frac_zero_std_groups": 0.5 - 0.02 * s} for s in range(1, 11)] + [
            {"step": 10, "eval/reward": 0.25, "eval/accuracy": 0.2, "eval/accuracy_greedy": 0.15}]
    return [{"step": 0, "eval/loss": 8.0}] + [
        {"step": s, "loss": 8.0 / s, "lr": 1e-3 * min(1, s / 3), "tokens_per_s": 4000.0 + s} for s in range(1, 21)
    ] + [{"step": 20, "eval/loss": 2.0}]


def test_targets_tables_plot_and_summaries(tmp_path):
    stages = ["stage1", "stage2", "sft", "grpo"]
    for stage in stages:
        _write_run(tmp_path / stage, _rows(stage))
    (tmp_path / "grpo" / "config.yaml").write_text("rl: {eval_samples: 4, eval_temperature: 1.0}\n")
    assert report.grpo_evals(tmp_path / "grpo") == (
        {"grpo_accuracy": 0.08, "grpo_accuracy_greedy": 0.12, "grpo_reward": 0.10},
        {"grpo_accuracy": 0.2, "grpo_accuracy_greedy": 0.15, "grpo_reward": 0.25})
    assert report.summary_line(tmp_path / "grpo") == (
        f"{tmp_path / 'grpo'}: 10 steps, loss 0.010 -> 0.100, reward_mean 0.110 -> 0.200, eval/reward 0.100 -> 0.250, "
        "eval/accuracy 0.080 -> 0.200")

    def row(loss, math, digits, accuracy=None):
        r = {"eval/loss": loss, **{f"eval/loss/{t}": loss for t in ("caption", "interleaved", "ocr", "document", "text")},
             **{f"eval/loss/{t}": loss + 1 for t in ("grounding", "math", "stem")},
             "gen/math": math, "gen/math/count": 30, "gen/digits": digits, "gen/digits/count": 10,
             "gen/counting": 0.0, "gen/counting/count": 20, "gen/grounding": 0.1, "gen/grounding/count": 8}
        return {**r, "grpo_accuracy": accuracy, "grpo_reward": accuracy + 0.05} if accuracy is not None else r

    rows = {"init": row(9.0, 0, 0), "stage1": row(3.0, 0, 0), "stage2": row(2.5, 0.1, 0.2),
            "sft": row(2.4, 0.3, 0.5, accuracy=0.1), "grpo": row(2.45, 0.3, 0.4, accuracy=0.25)}
    text = report.write_markdown(tmp_path, stages, rows, prompts=30)
    lines = text.split("## Held-out loss")[0].splitlines()  # the targets section
    target_rows = [line for line in lines if line.startswith("| ") and line.split(" | ")[0][2:] in stages]
    assert [r.split(" | ")[-1] for r in target_rows] == ["yes |"] * 4
    sft_row = next(r for r in target_rows if r.startswith("| sft |"))
    # pooled over math (30 prompts), digits (10) and counting (20): (0.1*30 + 0.2*10) / 60 -> (0.3*30 + 0.5*10) / 60
    assert f"| {5 / 60:.3f} | {14 / 60:.3f} |" in sft_row
    assert ("| grpo | held-out accuracy, format excluded (math, counting; reasoning on; 4 sampled answers per prompt "
            "at T=1) | 0.100 | 0.250 | +0.150 | yes |") in lines
    rows["stage2"]["eval/loss/grounding"] = 99.0  # stage 2 made its own tasks worse: the report says so
    targets = report.write_markdown(tmp_path, stages, rows, prompts=30).split("## Held-out loss")[0]
    assert [line.split(" | ")[0] for line in targets.splitlines() if line.endswith("| NO |")] == ["| stage2"]
    assert json.loads((tmp_path / "report.json").read_text())["sft"]["grpo_accuracy"] == 0.1

    png = report.plot(tmp_path, stages)
    from PIL import Image

    with Image.open(png) as im:
        assert im.size[0] >= 1200 and im.size[1] >= 800


def test_evaluate_model_covers_every_task(tmp_path, demo_corpus, demo_tokenizer):
    """One process, a seeded tiny model: a loss for every task's held-out batches, and the four
    generation metrics, each on the prompts asked for."""
    from model.config import preset
    from model.vlm import Exaone45

    torch.manual_seed(0)
    model = Exaone45(preset("tiny")).eval()
    model.init_weights()
    data = {"name": "demo", "root": str(demo_corpus), "seq_len": 256, "num_workers": 0, "mixture": {"math": 1.0}}
    row = report.evaluate_model(model, demo_tokenizer, data, batches=1, prompts=4, max_new_tokens=4)
    from data.schema import TASKS

    assert {f"eval/loss/{t}" for t in TASKS} <= set(row)
    assert all(8.0 < row[f"eval/loss/{t}"] < 9.5 for t in TASKS)  # near ln(vocab) = 8.3 at initialization
    for task in report.GEN_TASKS:
        assert row[f"gen/{task}/count"] == 4 and 0.0 <= row[f"gen/{task}"] <= 1.0


def test_cli_needs_run_directories(tmp_path):
    with pytest.raises(SystemExit, match="no stage run directories"):
        report.main([str(tmp_path)])
