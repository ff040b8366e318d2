"""The one table of tasks and how their answers are judged, shared by SFT's generation metrics, the
pipeline report and GRPO (its rewards, its zero-variance filter, its held-out accuracy).

A task's `correct` reward says whether an answer is right (1) or not (0), or for OCR and grounding
how right it is (edit similarity, IoU); `weights` is the GRPO reward of the task, correctness plus
a small format bonus where the answer sits in a box (the format reward teaches the layout the
correctness parsers read; it never decides which groups train, `rl.filter_on`). `source` and `keep`
pick the task's held-out prompts for generation metrics (digit recognition is the chat source's
digit-image questions).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from data.schema import Sample


@dataclass(frozen=True)
class Task:
    source: str  # the mixture source of its held-out prompts
    correct: str  # the reward (training/rewards.py) that judges an answer
    weights: dict[str, float] = field(default_factory=dict)  # GRPO's reward: {reward: weight}
    keep: Callable[[Sample], bool] = lambda s: True  # which held-out samples of the source count


def _boxed(correct: str) -> dict[str, float]:
    return {correct: 1.0, "format": 0.1}


TASKS: dict[str, Task] = {
    "math": Task("math", "math_boxed", _boxed("math_boxed")),
    "stem": Task("stem", "math_boxed", _boxed("math_boxed")),
    "counting": Task("counting", "counting", _boxed("counting")),
    "digits": Task("chat", "counting", _boxed("counting"), lambda s: "label" in s.meta and s.is_chat),
    "document": Task("document", "exact_match", _boxed("exact_match")),
    "chat": Task("chat", "exact_match", _boxed("exact_match")),
    "multiple_choice": Task("multiple_choice", "multiple_choice", _boxed("multiple_choice")),
    "classification": Task("classification", "exact_match", _boxed("exact_match")),  # labels may be words
    "grounding": Task("grounding", "grounding", {"grounding": 1.0}),  # OCR and grounding answers carry no box
    "ocr": Task("ocr", "ocr", {"ocr": 1.0}),
}


def default_reward_weights() -> dict[str, dict[str, float]]:
    """{task: {reward: weight}}: the default of `rl.reward_weights`."""
    return {name: dict(task.weights) for name, task in TASKS.items()}


def correctness_reward(task: str) -> str:
    if task not in TASKS:
        raise KeyError(f"unknown task {task!r}; known: {sorted(TASKS)}")
    return TASKS[task].correct
