"""bench/grpo_headroom.py's arithmetic: the majority answer's correctness (the sharpening ceiling) and
the standard error over prompts, on values worked out by hand."""

import math

from bench.grpo_headroom import majority, mean_se


def test_majority_takes_the_most_frequent_boxed_answer():
    # "3" twice (wrong), "4" once (right): a policy certain of its most likely answer says 3
    assert majority(["3", "4", "3", None], [0.0, 1.0, 0.0, 0.0]) == 0.0
    assert majority(["4", "3", "4", None], [1.0, 0.0, 1.0, 0.0]) == 1.0


def test_majority_ties_go_to_the_first_drawn_and_unboxed_answers_do_not_vote():
    assert majority(["5", "4"], [0.0, 1.0]) == 0.0
    assert majority(["4", "5"], [1.0, 0.0]) == 1.0
    # three unboxed answers do not outvote one boxed one
    assert majority([None, None, None, "7"], [0.0, 0.0, 0.0, 1.0]) == 1.0
    # nothing boxed at all: the first answer's correctness (0: no box scores 0)
    assert majority([None, None], [0.0, 0.0]) == 0.0


def test_mean_and_standard_error_over_prompts():
    m, se = mean_se([0.0, 1.0, 1.0, 0.0])
    assert m == 0.5
    assert math.isclose(se, math.sqrt((4 * 0.25 / 3) / 4))
    assert mean_se([0.25]) == (0.25, 0.0)
