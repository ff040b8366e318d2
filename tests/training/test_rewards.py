"""Every reward on hand-written completions, malformed ones included (they score 0, never raise)."""

import pytest

from training.rewards import (REWARDS, TASK_REWARDS, box_iou, last_boxed, levenshtein, normalize_answer,
                        parse_boxes, score)

MALFORMED = [
    "",
    "\\boxed{",
    "\\boxed{12",
    "\\boxed{\\frac{1}{2}",
    "}}}{{{\\boxed}",
    "\x00\uffff garbage ]]][[[ (((",
    "<think> never closed \\boxed{",
    "[1, 2, 3",
    "<box>",
    "<box>" * 5000,  # pathological repetition must stay fast, not just return 0
    "\\boxed{" * 5000 + "{" * 5000,
    None,
    12345,
    ["\\boxed{1}"],
]
# OCR is a similarity, so garbage sharing characters with the reference earns partial credit; this
# reference shares none with the strings above.
ANY_META = {"answer": "1", "text": "ΩΩΩ", "boxes": [[0, 0, 10, 10]], "enable_thinking": True}
NOT_A_MAPPING = [None, [], "answer", 3]
UNUSABLE_FIELDS = [{}, {"answer": None, "text": None, "boxes": None},
                   {"answer": [1], "text": 3, "boxes": "[0,0,1,1]"}]
GOOD = "</think> The answer is A. \\boxed{1} [0, 0, 10, 10] hello"


@pytest.mark.parametrize("name", sorted(REWARDS))
@pytest.mark.parametrize("completion", MALFORMED, ids=lambda c: repr(c)[:20])
def test_malformed_completions_score_zero(name, completion):
    assert REWARDS[name](completion, ANY_META) == 0.0


@pytest.mark.parametrize("name", sorted(REWARDS))
@pytest.mark.parametrize("meta", NOT_A_MAPPING)
def test_meta_that_is_not_a_mapping_scores_zero(name, meta):
    assert REWARDS[name](GOOD, meta) == 0.0


@pytest.mark.parametrize("name, meta", [
    ("math_boxed", {"answer": "1"}), ("format", {}), ("ocr", {"text": GOOD[len("</think>"):]}),
    ("grounding", {"boxes": [[0, 0, 10, 10]]}), ("counting", {"answer": 1}),
    ("exact_match", {"answer": 1}), ("multiple_choice", {"answer": "A"}),
])
def test_good_completion_with_usable_meta_scores_one(name, meta):
    completion = GOOD.replace("\\boxed{1}", "") if name == "multiple_choice" else GOOD
    assert REWARDS[name](completion, meta) == 1.0


@pytest.mark.parametrize("name", sorted(set(REWARDS) - {"format"}))  # format reads no field
@pytest.mark.parametrize("meta", UNUSABLE_FIELDS)
def test_missing_or_mistyped_reference_scores_zero(name, meta):
    assert REWARDS[name](GOOD, meta) == 0.0


def test_last_boxed_matches_nested_braces():
    assert last_boxed("\\boxed{1} then \\boxed{\\frac{a}{b^{2}}} end") == "\\frac{a}{b^{2}}"
    assert last_boxed("\\boxed{1} then \\boxed{2") is None  # the final answer is unclosed
    assert last_boxed("no box") is None


@pytest.mark.parametrize("raw, expected", [
    ("$\\dfrac{1}{2}$", "(1)/(2)"),
    ("\\frac12", "(1)/(2)"),
    ("1{,}000", "1000"),
    ("12,345.0", "12345.0"),
    ("\\text{ 42 }", "42"),
    ("x = 5.", "5"),
    ("\\left( 1, 2 \\right)", "(1,2)"),
    ("90^\\circ", "90"),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize("completion, answer, expected", [
    ("so \\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("so \\boxed{1/2}", "\\frac{1}{2}", 1.0),
    ("so \\boxed{0.5}", "1/2", 1.0),
    ("so \\boxed{\\dfrac{1}{2}}", "1/2", 1.0),
    ("so \\boxed{-\\frac{3}{4}}", "-0.75", 1.0),
    ("\\boxed{1,000}", "1000", 1.0),
    ("\\boxed{7.0}", "7", 1.0),
    ("\\boxed{$7$}", "7", 1.0),
    ("\\boxed{\\text{7}}", "7", 1.0),
    ("\\boxed{7}", 7, 1.0),  # numeric reference answers
    ("\\boxed{2.5}", 2.5, 1.0),
    ("\\boxed{\\sqrt{2}}", "\\sqrt2", 1.0),  # non-numbers compare as normalized strings
    ("first \\boxed{3} then corrected \\boxed{4}", "4", 1.0),  # the last box counts
    ("first \\boxed{4} then corrected \\boxed{3}", "4", 0.0),
    ("\\boxed{0.333}", "1/3", 0.0),  # exact, no tolerance
    ("\\boxed{}", "0", 0.0),
    ("the answer is 4", "4", 0.0),  # no box
    ("\\boxed{1/0}", "1/0", 1.0),  # same (odd) string; no ZeroDivisionError
])
def test_math_boxed(completion, answer, expected):
    assert REWARDS["math_boxed"](completion, {"answer": answer}) == expected


@pytest.mark.parametrize("completion, meta, expected", [
    ("<think>add them</think> so \\boxed{4}", {}, 1.0),  # reasoning on by default
    ("add them</think> so \\boxed{4}", {"enable_thinking": True}, 1.0),  # <think> was in the prompt
    ("<think>try \\boxed{3}, no</think> \\boxed{4}", {}, 1.0),  # boxes inside reasoning are drafts
    ("<think>add them so \\boxed{4}", {}, 0.0),  # never closed
    ("<think>a</think><think>b</think>\\boxed{4}", {}, 0.0),  # two blocks
    ("</think> \\boxed{4} <think>", {}, 0.0),  # opened after closing
    ("<think>a</think> \\boxed{4} or \\boxed{5}", {}, 0.0),  # two answers
    ("<think>a</think> 4", {}, 0.0),  # no box
    ("<think>a</think> \\boxed{4", {}, 0.0),  # unclosed box
    ("so \\boxed{4}", {"enable_thinking": False}, 1.0),
    ("<think>a</think> \\boxed{4}", {"enable_thinking": False}, 0.0),  # reasoning when off
])
def test_format(completion, meta, expected):
    assert REWARDS["format"](completion, meta) == expected


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("abc", "abc") == 0
    assert levenshtein("flaw", "lawn") == 2


@pytest.mark.parametrize("completion, text, expected", [
    ("Hello  World", "hello world", 1.0),  # case and whitespace runs do not count
    ("<think>reading the sign</think>\n STOP \n", "stop", 1.0),  # reasoning is not the answer
    ("hello", "hellx", 0.8),  # 1 edit / 5
    ("kitten", "sitting", 1 - 3 / 7),
    ("", "abc", 0.0),
    ("xyz", "abc", 0.0),
    ("", "", 1.0),
])
def test_ocr(completion, text, expected):
    assert REWARDS["ocr"](completion, {"text": text}) == pytest.approx(expected)


def test_parse_boxes_and_iou():
    assert parse_boxes("[1, 2, 3, 4] and (5,6),(7,8) and <box>(10,20),(30,40)</box>") == [
        (1, 2, 3, 4), (5, 6, 7, 8), (10, 20, 30, 40)]
    assert parse_boxes("<box>1 2 3 4</box>") == [(1, 2, 3, 4)]
    assert parse_boxes("[0, 0, 1001, 5] [5, 5, 1, 1] <box>1 2 3</box>") == [None, None, None]
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0


@pytest.mark.parametrize("completion, boxes, expected", [
    ("It is at [0, 0, 10, 10].", [[0, 0, 10, 10]], 1.0),
    ("(0,0),(10,10)", [[0, 0, 10, 10]], 1.0),
    ("<box>(0,0),(10,10)</box>", [[0, 0, 10, 10]], 1.0),
    ("[5, 0, 15, 10]", [[0, 0, 10, 10]], 50 / 150),
    ("[0, 0, 10, 10]", [0, 0, 20, 10], 0.5),  # a flat reference box
    ("first [0, 0, 10, 10], finally [0, 0, 10, 5]", [[0, 0, 10, 10]], 0.5),  # last box counts
    ("[0, 0, 10, 10] then [0, 0, 2000, 10]", [[0, 0, 10, 10]], 0.0),  # bad last box: no fallback
    ("[10, 10, 0, 0]", [[0, 0, 10, 10]], 0.0),  # corners reversed
    ("[0.1, 0.1, 0.5, 0.5]", [[0, 0, 10, 10]], 0.0),  # not [0, 1000] integers
    ("no box here", [[0, 0, 10, 10]], 0.0),
    # several references: mean over references of the best IoU with any predicted box
    ("[0, 0, 10, 10] [100, 100, 110, 110]", [[0, 0, 10, 10], [100, 100, 110, 110]], 1.0),
    ("[0, 0, 10, 10]", [[0, 0, 10, 10], [100, 100, 110, 110]], 0.5),
    ("[0, 0, 10, 10] [5, 0, 15, 10]", [[0, 0, 10, 10], [5, 0, 15, 10]], 1.0),
    # three predictions for two references: (1 + 1) / 3
    ("[0, 0, 10, 10] [100, 100, 110, 110] [500, 500, 510, 510]",
     [[0, 0, 10, 10], [100, 100, 110, 110]], 2 / 3),
    ("[0, 0, 10, 10]", [], 0.0),
])
def test_grounding(completion, boxes, expected):
    assert REWARDS["grounding"](completion, {"boxes": boxes}) == pytest.approx(expected)


@pytest.mark.parametrize("completion, answer, expected", [
    ("I count \\boxed{7}", 7, 1.0),
    ("I count \\boxed{7}", "7", 1.0),
    ("\\boxed{7.0}", 7, 1.0),
    ("\\boxed{\\text{7}}", 7, 1.0),
    ("\\boxed{1,200}", 1200, 1.0),
    ("There are 3 red and 4 blue, so 7 in total.", 7, 1.0),  # last number, no box
    ("There are 1,200 birds", 1200, 1.0),
    ("<think>maybe 7</think> there are 6", 7, 0.0),  # the answer part's last number
    ("\\boxed{7 apples}", 7, 0.0),  # a box that is not a number: no fallback
    ("about 7.5", 7, 0.0),  # not an integer
    ("\\boxed{7}", 8, 0.0),
    ("\\boxed{7}", "seven", 0.0),
    ("no numbers at all", 0, 0.0),
])
def test_counting(completion, answer, expected):
    assert REWARDS["counting"](completion, {"answer": answer}) == expected


@pytest.mark.parametrize("completion, answer, expected", [
    ("\\boxed{B}", "B", 1.0),
    ("\\boxed{(B)}", "B", 1.0),
    ("\\boxed{\\text{B}}", "(B)", 1.0),
    ("\\boxed{b}", "B", 1.0),
    ("\\boxed{B. 42}", "B", 1.0),
    ("The answer is (C).", "C", 1.0),
    ("Answer: **D**", "D", 1.0),
    ("answer is A, no wait, the answer is E", "E", 1.0),
    ("\\boxed{BE}", "B", 0.0),  # two letters
    ("\\boxed{Apple}", "A", 0.0),
    ("\\boxed{F}", "F", 0.0),  # outside A-E
    ("I think B", "B", 0.0),  # no box, no "answer is"
    ("\\boxed{B}", "b c", 0.0),  # unusable reference
])
def test_multiple_choice(completion, answer, expected):
    assert REWARDS["multiple_choice"](completion, {"answer": answer}) == expected


@pytest.mark.parametrize("completion, answer, expected", [
    ("\\boxed{Golden Retriever}", "golden retriever", 1.0),
    ("</think>cat", "Cat", 1.0),  # no box: the whole answer part
    ("\\boxed{3}", 3, 1.0),
    ("\\boxed{dog}", "cat", 0.0),
])
def test_exact_match(completion, answer, expected):
    assert REWARDS["exact_match"](completion, {"answer": answer}) == expected


def test_every_default_task_uses_registered_rewards():
    assert {"math", "counting", "digits", "classification", "multiple_choice", "ocr",
            "grounding"} <= set(TASK_REWARDS)
    for weights in TASK_REWARDS.values():
        assert set(weights) <= set(REWARDS)


def test_score_is_weighted_mean_of_parts():
    right_but_unformatted = "<think>2+2 \\boxed{4}"  # correct box, reasoning never closed
    total, parts = score(right_but_unformatted, "math", {"answer": "4"})
    assert parts == {"math_boxed": 1.0, "format": 0.0}
    assert total == pytest.approx(1.0 / 1.1)
    total, parts = score("</think>\\boxed{5}", "math", {"answer": "4"})
    assert (total, parts) == (pytest.approx(0.1 / 1.1), {"math_boxed": 0.0, "format": 1.0})
    assert score("hello", "ocr", {"text": "hellx"}) == (pytest.approx(0.8), {"ocr": pytest.approx(0.8)})


def test_score_weights_replace_a_tasks_defaults():
    weights = {"math": {"math_boxed": 3.0, "format": 1.0}}
    total, parts = score("\\boxed{4}", "math", {"answer": "4", "enable_thinking": False}, weights)
    assert parts == {"math_boxed": 1.0, "format": 1.0} and total == pytest.approx(1.0)
    total, _ = score("<think>\\boxed{4}", "math", {"answer": "4"}, weights)
    assert total == pytest.approx(3.0 / 4.0)
    # tasks the recipe does not mention keep their defaults; zero-weight parts are still reported
    assert score("\\boxed{7}", "counting", {"answer": 7, "enable_thinking": False}, weights)[0] == 1.0
    total, parts = score("\\boxed{4}", "math", {"answer": "4"}, {"math": {"math_boxed": 1, "format": 0}})
    assert total == 1.0 and parts == {"math_boxed": 1.0, "format": 0.0}


def test_score_malformed_completion_scores_zero():
    for completion in MALFORMED:
        assert score(completion, "math", {"answer": "4"})[0] == 0.0


@pytest.mark.parametrize("task, weights, error", [
    ("poetry", None, KeyError),
    ("math", {"math": {"bleu": 1.0}}, ValueError),
    ("math", {"math": {"math_boxed": 0.0}}, ValueError),
    ("math", {"math": {"math_boxed": 1.0, "format": -0.5}}, ValueError),
])
def test_score_rejects_bad_configuration(task, weights, error):
    with pytest.raises(error):
        score("\\boxed{4}", task, {"answer": "4"}, weights)
