"""Task rewards for GRPO: `reward(completion, meta) -> float in [0, 1]`, by name in REWARDS.

A completion is whatever the policy sampled, so every reward is wrapped to never raise: a
malformed answer (no box, unclosed braces, garbage, a non-string) or unusable meta (None, a
missing key) scores 0 instead of crashing the rollout step. Configuration mistakes are different:
`score` raises on an unknown task or reward name, or on negative or all-zero weights.

Rewards and the `meta` keys they read:
  math_boxed       last \\boxed{...} equals meta["answer"] after LaTeX/number normalization
  format           reasoning block closed (meta["enable_thinking"], default on) and exactly one
                   closed \\boxed{} after it
  ocr              1 - levenshtein / max_len vs meta["text"], whitespace- and case-normalized
  grounding        IoU of the last box written with meta["boxes"] ([0, 1000] integer coordinates)
  counting         the boxed integer (else the last number written) equals meta["answer"]
  multiple_choice  a letter A-E (boxed, else "answer is X") equals meta["answer"]
  exact_match      boxed text (else the whole answer) equals meta["answer"], case-insensitive

TASK_REWARDS holds the default weights per task; `score(..., weights=...)` takes a recipe's
`reward_weights` ({task: {reward: weight}}), whose entry for a task replaces the default entry.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from fractions import Fraction
from typing import Callable

Reward = Callable[[str, Mapping], float]


def _never_raises(fn: Reward) -> Reward:
    @functools.wraps(fn)
    def reward(completion, meta) -> float:
        if not isinstance(completion, str) or not isinstance(meta, Mapping):
            return 0.0
        try:
            value = float(fn(completion, meta))
        except Exception:  # the policy wrote something unparsable: that is a 0, not a crash
            return 0.0
        return min(max(value, 0.0), 1.0) if math.isfinite(value) else 0.0

    return reward


# ----------------------------------------------------------------------------- parsing helpers


def answer_part(completion: str) -> str:
    """Text after the reasoning block (the whole completion when there is no `</think>`)."""
    return completion.rsplit("</think>", 1)[-1]


def _braced(text: str, open_at: int) -> str | None:
    """Content of the brace group opening at `open_at`, nested braces matched; None if unclosed."""
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i]
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}`; None when there is none or it is never closed."""
    start = text.rfind("\\boxed{")
    return None if start < 0 else _braced(text, start + len("\\boxed"))


_TEXT_CMD = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_FRAC = re.compile(r"\\frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_FRAC_DIGITS = re.compile(r"\\frac\s*(\d)\s*(\d)")  # \frac12, LaTeX's brace-less shorthand
_SQRT_DIGIT = re.compile(r"\\sqrt\s*(\d)")
_VARIABLE_PREFIX = re.compile(r"^[a-zA-Z]=(?!=)")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(,\d{3})+(\.\d*)?")
_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)"
_NUMBER_OR_RATIO = re.compile(rf"({_NUMBER})(?:/({_NUMBER}))?")
_DROPPED = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ ", "~", "$", "\\%", "%",
            "^{\\circ}", "^\\circ", "\\displaystyle")


def _sub_until_stable(pattern: re.Pattern, repl: str, s: str) -> str:
    # Innermost groups match first, so nested \text{\frac{..}{..}} needs several passes.
    while True:
        new = pattern.sub(repl, s)
        if new == s:
            return s
        s = new


def normalize_answer(s: str) -> str:
    """Canonical form of a final answer: `$\\dfrac{1}{2}$` -> `(1)/(2)`, `1{,}000` -> `1000`."""
    s = s.strip().replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("{,}", ",")
    for token in _DROPPED:
        s = s.replace(token, "")
    s = _sub_until_stable(_TEXT_CMD, r"\1", s)
    s = _FRAC_DIGITS.sub(r"\\frac{\1}{\2}", s)
    s = _sub_until_stable(_FRAC, r"(\1)/(\2)", s)
    s = _SQRT_DIGIT.sub(r"\\sqrt{\1}", s)
    s = "".join(s.split()).rstrip(".")
    s = _VARIABLE_PREFIX.sub("", s)  # "x=5" answers the same question as "5"
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    return s


def to_number(s: str) -> Fraction | None:
    """Exact value of a normalized answer that is a number or a ratio of numbers, else None."""
    if re.fullmatch(r"[\d.+\-/()]+", s):
        s = s.replace("(", "").replace(")", "")
    m = _NUMBER_OR_RATIO.fullmatch(s)
    if m is None:
        return None
    value, denominator = Fraction(m[1]), Fraction(m[2] or 1)
    return None if denominator == 0 else value / denominator


def same_answer(pred: str, gold: str) -> bool:
    """Equal as numbers when both are numbers (0.5 == 1/2 == \\frac{1}{2}), else as strings."""
    p, g = normalize_answer(pred), normalize_answer(gold)
    if not p:
        return False
    p_num, g_num = to_number(p), to_number(g)
    if p_num is not None and g_num is not None:
        return p_num == g_num
    return p == g


def _gold_answer(meta: Mapping) -> str:
    answer = meta["answer"]
    if not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
        raise ValueError(f"unusable reference answer {answer!r}")
    return str(answer)


# ----------------------------------------------------------------------------- rewards


@_never_raises
def math_boxed(completion: str, meta: Mapping) -> float:
    boxed = last_boxed(completion)
    return float(boxed is not None and same_answer(boxed, _gold_answer(meta)))


@_never_raises
def format_reward(completion: str, meta: Mapping) -> float:
    """1 when the reasoning block is closed and exactly one closed box follows it.

    With reasoning on, the opening `<think>` is optional: EXAONE's chat template writes it into the
    generation prompt, so the completion often starts inside the block and only closes it.
    """
    if not meta.get("enable_thinking", True):
        if "<think>" in completion or "</think>" in completion:
            return 0.0
        answer = completion
    else:
        if completion.count("</think>") != 1 or completion.count("<think>") > 1:
            return 0.0
        answer = completion.split("</think>")[1]
        if "<think>" in answer:  # opened after it was closed
            return 0.0
    return float(answer.count("\\boxed{") == 1 and last_boxed(answer) is not None)


def levenshtein(a: str, b: str) -> int:
    """Character edit distance (insert, delete, substitute; each costs 1)."""
    # Shared ends cost nothing; dropping them shrinks the O(len(a) * len(b)) table.
    start = 0
    while start < min(len(a), len(b)) and a[start] == b[start]:
        start += 1
    a, b = a[start:], b[start:]
    end = 0
    while end < min(len(a), len(b)) and a[-1 - end] == b[-1 - end]:
        end += 1
    a, b = a[: len(a) - end], b[: len(b) - end]
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


@_never_raises
def ocr(completion: str, meta: Mapping) -> float:
    pred = " ".join(answer_part(completion).split()).casefold()
    gold = " ".join(meta["text"].split()).casefold()
    longest = max(len(pred), len(gold))
    return 1.0 if longest == 0 else 1.0 - levenshtein(pred, gold) / longest


_INT = r"\s*(\d+)\s*"
_BOX = re.compile(
    r"<box>([^<]*)</box>"  # [^<] rather than .*?: many unclosed <box> tags stay linear time
    rf"|\[{_INT},{_INT},{_INT},{_INT}\]"
    rf"|\({_INT},{_INT}\)\s*,?\s*\({_INT},{_INT}\)"
)


def parse_boxes(text: str) -> list[tuple[int, int, int, int] | None]:
    """Boxes written as `<box>..</box>`, `[x1, y1, x2, y2]` or `(x1,y1),(x2,y2)`, in order.

    A box outside [0, 1000] or with x2 <= x1 or y2 <= y1 is kept as None (it scores IoU 0), so a
    bad last box is not silently replaced by an earlier one.
    """
    boxes = []
    for m in _BOX.finditer(text):
        numbers = re.findall(r"\d+", m[1]) if m[1] is not None else [g for g in m.groups()[1:] if g]
        coords = tuple(int(n) for n in numbers)
        valid = (len(coords) == 4 and max(coords) <= 1000
                 and coords[0] < coords[2] and coords[1] < coords[3])
        boxes.append(coords if valid else None)
    return boxes


def box_iou(a, b) -> float:
    if a is None or b is None:
        return 0.0
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0) * max(h, 0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@_never_raises
def grounding(completion: str, meta: Mapping) -> float:
    """IoU of the last box with the reference box; with several reference boxes, each one's best
    IoU over the answer's boxes, summed and divided by max(#reference, #predicted) so that
    listing extra boxes does not pay."""
    gold = meta["boxes"]
    if not isinstance(gold[0], (list, tuple)):
        gold = [gold]  # a single box written flat
    gold = [tuple(float(c) for c in box) for box in gold]
    if any(len(box) != 4 for box in gold):
        return 0.0
    preds = parse_boxes(answer_part(completion))
    if len(gold) == 1:
        preds = preds[-1:]
    if not preds:
        return 0.0
    best = sum(max(box_iou(p, g) for p in preds) for g in gold)
    return best / max(len(gold), len(preds))


_LOOSE_NUMBER = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?")


def _as_integer(value: Fraction | None) -> int | None:
    return int(value) if value is not None and value.denominator == 1 else None


@_never_raises
def counting(completion: str, meta: Mapping) -> float:
    boxed = last_boxed(completion)
    if boxed is not None:
        pred = to_number(normalize_answer(boxed))
    else:
        numbers = _LOOSE_NUMBER.findall(answer_part(completion))
        pred = to_number(numbers[-1].replace(",", "")) if numbers else None
    pred = _as_integer(pred)
    gold = _as_integer(to_number(normalize_answer(_gold_answer(meta))))
    return float(pred is not None and pred == gold)


_LETTER = re.compile(r"\(?([A-E])(?:[).:]|$)")
_ANSWER_IS = re.compile(r"(?i:answer)\s*(?:(?i:is)|:)\s*:?\s*[*(]*\s*([A-E])\b")


def choice_letter(completion: str) -> str | None:
    """The chosen letter: from the last box (`B`, `(B)`, `\\text{B}`, `B. 42`), else the last
    "answer is B" / "Answer: B"."""
    boxed = last_boxed(completion)
    if boxed is not None:
        m = _LETTER.match(normalize_answer(boxed).upper())
        return m[1] if m else None
    found = _ANSWER_IS.findall(answer_part(completion))
    return found[-1] if found else None


@_never_raises
def multiple_choice(completion: str, meta: Mapping) -> float:
    gold = _gold_answer(meta).strip().strip("()").upper()
    return float(gold in "ABCDE" and len(gold) == 1 and choice_letter(completion) == gold)


@_never_raises
def exact_match(completion: str, meta: Mapping) -> float:
    boxed = last_boxed(completion)
    pred = boxed if boxed is not None else answer_part(completion)
    return float(same_answer(pred.casefold(), _gold_answer(meta).casefold()))


REWARDS: dict[str, Reward] = {
    "math_boxed": math_boxed,
    "format": format_reward,
    "ocr": ocr,
    "grounding": grounding,
    "counting": counting,
    "multiple_choice": multiple_choice,
    "exact_match": exact_match,
}

# Correctness dominates; the small format weight teaches the answer layout (closed reasoning, one
# box) that the correctness parsers rely on. OCR and grounding answers carry no box, so no format.
TASK_REWARDS: dict[str, dict[str, float]] = {
    "math": {"math_boxed": 1.0, "format": 0.1},
    "counting": {"counting": 1.0, "format": 0.1},
    "digits": {"counting": 1.0, "format": 0.1},  # a digit label is a small integer
    "classification": {"exact_match": 1.0, "format": 0.1},  # labels may be words, not integers
    "multiple_choice": {"multiple_choice": 1.0, "format": 0.1},
    "ocr": {"ocr": 1.0},
    "grounding": {"grounding": 1.0},
}


def task_weights(task: str, weights: Mapping | None = None) -> dict[str, float]:
    """The {reward: weight} used for `task`: the recipe's entry if it has one, else the default."""
    table = weights if weights is not None and task in weights else TASK_REWARDS
    if task not in table:
        raise KeyError(f"no rewards configured for task {task!r}; known tasks: {sorted(table)}")
    chosen = {name: float(w) for name, w in table[task].items()}
    unknown = sorted(set(chosen) - set(REWARDS))
    if unknown:
        raise ValueError(f"unknown rewards {unknown} for task {task!r}; known: {sorted(REWARDS)}")
    if any(w < 0 for w in chosen.values()) or sum(chosen.values()) <= 0:
        raise ValueError(f"reward weights of task {task!r} must be >= 0, sum > 0: {chosen}")
    return chosen


def score(completion: str, task: str, meta: Mapping, weights: Mapping | None = None
          ) -> tuple[float, dict[str, float]]:
    """(weighted mean of the task's rewards, {reward name: unweighted value}).

    Zero-weight rewards are still computed and reported, so a recipe can watch one without
    training on it.
    """
    chosen = task_weights(task, weights)
    parts = {name: REWARDS[name](completion, meta) for name in chosen}
    total = sum(w * parts[name] for name, w in chosen.items()) / sum(chosen.values())
    return total, parts
