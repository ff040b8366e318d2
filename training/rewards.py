"""Task rewards for GRPO: `reward(completion, meta) -> float in [0, 1]`, by name in REWARDS.

A completion is whatever the policy sampled, so every reward is wrapped to never raise: a
malformed answer (no box, unclosed braces, garbage, a non-string) or unusable meta (None, a
missing key) scores 0 instead of crashing the rollout step. Configuration mistakes are different:
`score` raises on an unknown task or reward name, or on negative or all-zero weights.

Rewards and the `meta` keys they read:
  math_boxed       the final box (below) is mathematically equivalent to meta["answer"]
  format           reasoning block closed (meta["enable_thinking"], default on) and exactly one
                   closed \\boxed{} after it
  ocr              1 - levenshtein / max_len vs meta["text"], whitespace- and case-normalized
  grounding        IoU of the last box written with meta["boxes"] ([0, 1000] integer coordinates)
  counting         the boxed count (else the whole answer if it is a count, else the last number
                   written) equals the integer meta["answer"]
  multiple_choice  a letter A-E (boxed, else the whole answer, else "answer is X") equals
                   meta["answer"]
  exact_match      boxed text (else the whole answer) equals meta["answer"], case-insensitive;
                   when both sides are math (no words), by the math_boxed equivalence instead

The final box (`final_box`). The LAST `\\boxed{...}` of the completion counts (as in DAPO), nested
braces matched; the box is required (no box: 0), an unclosed last box scores 0 (no fallback to an
earlier one) and so does an empty one. `\\boxed 5` / `\\boxed5` (no braces) counts when one
number or one letter follows, delimited (`\\boxed 5.` is 5); a last `\\boxed` followed by
anything else answer-like (`\\boxed 5x`, `\\boxed \\frac12`) or by nothing (truncated) scores 0,
one followed by a word ("the \\boxed command") is prose and the box before it counts. The
`format` reward keeps its own rule (exactly one closed `\\boxed{}`).

Math equivalence (math_boxed; exact_match on math) and its bounded cost are
training/math_answers.py's `math_equal`; what it cuts is counted in its LIMITS_HIT / `pop_limit_counts()`.

Counting (also digit labels): the boxed content, else the whole answer when it is a count, else
the last number written; accepted: `3`, `3.`, `\\boxed{3}`, `\\boxed{3.0}`, `\\boxed{1,200}`,
`\\boxed{7 apples}`, `\\boxed{\\frac{6}{2}}`, and the number words zero to twenty (`three`, `Three.`)
as a box or as the whole answer (not inside prose); the reference may be a word too. Not an
integer (`3.5`), another number in the box (`7 or 8`), or no number: 0.

training/tasks.py holds the default weights per task; `score(..., weights=...)` takes a recipe's
`reward_weights` ({task: {reward: weight}}), whose entry for a task replaces the default entry.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from fractions import Fraction
from typing import Callable

import sympy

from .math_answers import (LIMITS_HIT, MAX_ANSWER_CHARS, MAX_COMPLETION_CHARS, _braced, _count_cut, _is_number,
                           _parse_answer, math_equal)

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


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}`; None when there is none or it is never closed."""
    start = text.rfind("\\boxed{")
    return None if start < 0 else _braced(text, start + len("\\boxed"))


_BARE_BOX = re.compile(r"[ \t]*("
                       r"-?\d+(?:\.\d+)?(?![\w.{\\^_/])"  # a number, not followed by more math
                       r"|-?\d+(?=\.(?!\d))"  # a number ending a sentence
                       r"|(?<=[ \t])[A-Za-z](?![\w{\\^_]))")  # one letter, after a space


_PROSE_AFTER_BOX = re.compile(r"\s*(?:[A-Za-z]{2}|[^\w\s\\{\-])")  # not at the end: truncated


def final_box(text: str) -> str | None:
    """The answer the math rewards read: content of the LAST `\\boxed`, as `\\boxed{...}` (nested
    braces matched) or `\\boxed 5` (one delimited number or letter). None when there is no box, the
    last `\\boxed{` is never closed, or the last `\\boxed` is followed by something else that
    looks like an answer (`\\boxed 5x`); a `\\boxed` followed by a word or punctuation is prose
    and the one before it counts."""
    end = len(text)
    while True:
        start = text.rfind("\\boxed", 0, end)
        if start < 0:
            return None
        after = start + len("\\boxed")
        rest = text[after : after + 1]
        if rest.isalpha():  # \boxedfoo is another command
            end = start
            continue
        brace = after
        while brace < len(text) and text[brace] in " \t":
            brace += 1
        if brace < len(text) and text[brace] == "{":
            return _braced(text, brace)
        m = _BARE_BOX.match(text, after)
        if m:
            return m[1]
        if not _PROSE_AFTER_BOX.match(text, after):
            return None  # `\boxed 5x`, `\boxed \frac12`: a malformed last box
        end = start  # `\boxed` mentioned in prose ("the \boxed command"): look further back


def _gold_answer(meta: Mapping) -> str:
    answer = meta["answer"]
    if not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
        raise ValueError(f"unusable reference answer {answer!r}")
    return str(answer)


def _completion_ok(completion: str) -> bool:
    if len(completion) > MAX_COMPLETION_CHARS:
        LIMITS_HIT["completion_chars"] += 1
        return False
    return True


# ----------------------------------------------------------------------------- rewards


@_never_raises
def math_boxed(completion: str, meta: Mapping) -> float:
    gold = _gold_answer(meta)
    if not _completion_ok(completion):
        return 0.0
    box = final_box(completion)
    return float(box is not None and math_equal(box, gold))


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
_COUNT_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split())}
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_BARE_COUNT = re.compile(r"\d{1,3}(?:,\d{3})+|\d+(?:\.0+)?")


def _unwrap(text: str) -> str:
    """`$\\text{ B }$.` -> `B`: dollars, \\text-like wrappers, bold markers and a final stop dropped."""
    s = text.strip().replace("$", "").replace("**", "")
    for _ in range(3):  # nested wrappers; bounded
        s = _TEXT_WRAPPER.sub(r"\1", s)
    return s.strip().rstrip(".").strip()


def count_value(text: str, math: bool = True) -> int | None:
    """The integer a count answer states (`3`, `3.`, `3.0`, `1,200`, `three`; with `math` also
    `7 apples`, `\\frac{6}{2}`), else None (`3.5`, `7 or 8`, words)."""
    s = _unwrap(text)
    if s.casefold() in _COUNT_WORDS:
        return _COUNT_WORDS[s.casefold()]
    if _BARE_COUNT.fullmatch(s):
        return int(s.replace(",", "").split(".")[0])
    if not math or not re.search(r"\d", s):
        return None
    parsed = _parse_answer(s)
    if parsed.cut:
        _count_cut(parsed.cut)
        return None
    value = parsed.expr
    if parsed.percent or not _is_number(value):
        return None
    value = value.doit()
    return int(value) if isinstance(value, sympy.Integer) else None


@_never_raises
def counting(completion: str, meta: Mapping) -> float:
    gold = count_value(_gold_answer(meta))
    if gold is None or not _completion_ok(completion):
        return 0.0
    box = final_box(completion)
    if box is not None:
        pred = count_value(box)
    elif "\\boxed{" in completion:
        return 0.0  # a box that is never closed: no fallback to the numbers around it
    else:
        answer = answer_part(completion)
        pred = count_value(answer, math=False) if len(answer) <= MAX_ANSWER_CHARS else None
        if pred is None:
            numbers = _LOOSE_NUMBER.findall(answer)
            value = Fraction(numbers[-1].replace(",", "")) if numbers else None
            pred = int(value) if value is not None and value.denominator == 1 else None
    return float(pred is not None and pred == gold)


_CHOICE = re.compile(r"\(([A-E])\)(?:[.:]|\s.*)?|([A-E])(?:[.:)](?:\s.*)?)?", re.DOTALL)
_ANSWER_IS = re.compile(r"(?i:answer)\s*(?:(?i:is)|:)\s*:?\s*[*(]*\s*([A-E])\b")


def _letter(text: str, any_case: bool) -> str | None:
    """The letter when the text is a choice: `B`, `(B)`, `B)`, `B.`, `B. 42`, `(B) 42`, wrapped in
    `\\text{}`, `$`, `**` or not."""
    s = _unwrap(text) if len(text) <= MAX_ANSWER_CHARS else text.strip()
    if not s:
        return None
    s = s[:1].upper() + s[1:] if any_case else s
    if any_case and len(s) > 2 and s[0] == "(":
        s = "(" + s[1].upper() + s[2:]
    m = _CHOICE.fullmatch(s)
    return (m[1] or m[2]) if m else None


def choice_letter(completion: str) -> str | None:
    """The chosen letter: from the last box (`B`, `(B)`, `\\text{B}`, `B. 42`, any case), else the
    whole answer when it is a choice (`B`, `(B)`, `B)`, `B. 42`), else the last "answer is B" /
    "Answer: B"."""
    box = final_box(completion)
    if box is not None:
        return _letter(box, any_case=True)
    answer = answer_part(completion)
    letter = _letter(answer, any_case=False)
    if letter:
        return letter
    found = _ANSWER_IS.findall(answer)
    return found[-1] if found else None


@_never_raises
def multiple_choice(completion: str, meta: Mapping) -> float:
    gold = _letter(_gold_answer(meta), any_case=True)
    return float(gold is not None and choice_letter(completion) == gold)


def _plain(text: str) -> str:
    return " ".join(_unwrap(text).split()).casefold()


def _is_math(text: str) -> bool:
    """Math rather than words: a digit or a command, and no run of two letters outside commands
    (so `golden retriever` and `7 apples` compare as text, `\\frac{1}{2}` and `x+1` as math)."""
    bare = re.sub(r"\\[a-zA-Z]+", "", text)
    return bool(re.search(r"\d|\\[a-zA-Z]", text)) and not re.search(r"[a-zA-Z]{2}", bare)


@_never_raises
def exact_match(completion: str, meta: Mapping) -> float:
    gold = _gold_answer(meta)
    if not _completion_ok(completion):
        return 0.0
    box = final_box(completion)
    pred = box if box is not None else answer_part(completion)
    if _plain(pred) and _plain(pred) == _plain(gold):
        return 1.0
    both_math = len(pred) <= MAX_ANSWER_CHARS and _is_math(pred) and _is_math(gold)
    return float(both_math and math_equal(pred.strip(), gold))


REWARDS: dict[str, Reward] = {
    "math_boxed": math_boxed,
    "format": format_reward,
    "ocr": ocr,
    "grounding": grounding,
    "counting": counting,
    "multiple_choice": multiple_choice,
    "exact_match": exact_match,
}

def task_weights(task: str, weights: Mapping | None = None) -> dict[str, float]:
    """The {reward: weight} used for `task`: the recipe's entry if it has one, else the default
    (training/tasks.py)."""
    from .tasks import default_reward_weights

    table = weights if weights is not None and task in weights else default_reward_weights()
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
