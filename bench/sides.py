"""Two sides of a benchmark, each in its own fresh process, compared as a ratio in one run
(bench/model_step.py, bench/train_step.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

RATES = ("tokens_per_s", "cpu_tokens_per_s")


def best_of_rounds(script: str, sides: tuple[str, str], rounds: int) -> dict[str, dict]:
    """Run `script --worker <side> <this command line>` for the two sides alternately `rounds`
    times; each side keeps its fastest round (on a shared machine, the round least disturbed).
    A worker prints one JSON row last: `tokens_per_s`, `cpu_tokens_per_s`, `peak_gib`."""
    rows: dict[str, dict] = {}
    for _ in range(rounds):
        for side in sides:
            out = subprocess.run([sys.executable, script, "--worker", side, *sys.argv[1:]], capture_output=True,
                                 text=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"}, check=False)
            if out.returncode:
                sys.exit(out.stderr[-3000:])
            row = json.loads(out.stdout.strip().splitlines()[-1])
            best = rows.setdefault(side, row)
            for key in RATES:
                best[key] = max(best[key], row[key])
    return rows


def ratio_row(head: str, names: tuple[str, str], o: dict, t: dict) -> str:
    """One RESULTS.md table row: `head`, each side's speed and peak memory, and the two ratios."""
    return (f"| {head} | {names[0]} {o['tokens_per_s']:.0f} tok/s, {o['peak_gib']:.2f} GiB | "
            f"{names[1]} {t['tokens_per_s']:.0f} tok/s, {t['peak_gib']:.2f} GiB | "
            f"speed x{o['tokens_per_s'] / t['tokens_per_s']:.2f}, memory x{o['peak_gib'] / t['peak_gib']:.2f} | "
            f"CPU time: speed x{o['cpu_tokens_per_s'] / t['cpu_tokens_per_s']:.2f} |")
