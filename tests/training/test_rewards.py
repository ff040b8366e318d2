"""Every reward on hand-written completions, malformed ones included (they score 0, never raise).

MATH_CASES is the labelled table of the math answer checking (training/rewards.py's docstring holds
the rules): fractions, mixed numbers, decimals, separators, powers, roots, pi, units, currency,
percentages, signs, sets, tuples, intervals, matrices, expressions, the box itself and adversarial
inputs. Right answers must score exactly 1.0 and wrong ones exactly 0.0.
"""

import pytest

from training.math_answers import MAX_COMPLETION_CHARS, pop_limit_counts
from training.rewards import REWARDS, box_iou, final_box, last_boxed, levenshtein, parse_boxes, score

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


def test_final_box():
    assert final_box("\\boxed{1} then \\boxed{\\frac{a}{b^{2}}} end") == "\\frac{a}{b^{2}}"
    assert final_box("\\boxed{1} then \\boxed{2") is None  # the last box is unclosed: no fallback
    assert final_box("so \\boxed 5.") == "5" and final_box("so \\boxed5") == "5"
    assert final_box("\\boxed 12.5 cm") == "12.5" and final_box("\\boxed B") == "B"
    assert final_box("\\boxed 5x") is None and final_box("\\boxed \\frac12") is None
    assert final_box("\\boxed{4}, the \\boxed command") == "4"  # a mention in prose is not a box
    assert final_box("\\boxed{4} then \\boxed 5x") is None  # a malformed last box: no fallback
    assert final_box("\\boxed{4} so finally \\boxed") is None  # truncated after the last \boxed
    assert final_box("\\boxed {7}") == "7" and final_box("no box") is None


MATRIX = "\\begin{pmatrix}1 & 2\\\\ 3 & 4\\end{pmatrix}"

# (completion, reference answer, expected score, why). Every wrong answer must score exactly 0.0 and
# every right one exactly 1.0 (the rule behind each is in training/rewards.py's docstring).
MATH_CASES = [
    # fractions and mixed numbers
    ("so \\boxed{\\frac{1}{2}}", "0.5", 1, "fraction = decimal"),
    ("so \\boxed{1/2}", "\\frac{1}{2}", 1, "slash fraction"),
    ("so \\boxed{\\dfrac{1}{2}}", "1/2", 1, "dfrac"),
    ("\\boxed{\\frac12}", "1/2", 1, "brace-less \\frac12"),
    ("\\boxed{\\frac{2}{4}}", "\\frac{1}{2}", 1, "unreduced fraction"),
    ("\\boxed{-\\frac{3}{4}}", "-0.75", 1, "negative fraction"),
    ("\\boxed{\\frac{-3}{4}}", "-\\frac{3}{4}", 1, "sign in the numerator"),
    ("\\boxed{\\frac{3}{4}}", "\\frac{4}{3}", 0, "inverted fraction"),
    ("\\boxed{1\\frac{1}{2}}", "3/2", 1, "mixed number"),
    ("\\boxed{1\\frac{1}{2}}", "11/2", 0, "issue: mixed number is not 11/2"),
    ("\\boxed{2\\frac{1}{3}}", "7", 0, "issue: 2 1/3 is not 7"),
    ("\\boxed{2\\frac{1}{3}}", "\\frac{7}{3}", 1, "mixed number 7/3"),
    ("\\boxed{-2\\frac{1}{3}}", "-7/3", 1, "negative mixed number"),
    ("\\boxed{2\\frac{4}{2}}", "4", 1, "improper fraction after an integer: a product"),
    ("\\boxed{2(3)}", "23", 0, "issue: 2(3) is not 23"),
    ("\\boxed{2(3)}", "6", 1, "juxtaposition is a product"),
    ("\\boxed{2(3)}", "5", 0, "not latex2sympy's mixed-number misreading"),
    ("\\boxed{(2)3}", "5", 0, "not a mixed number either"),
    ("\\boxed{2\\left(\\frac{1}{2}\\right)}", "1", 1, "product with a parenthesized fraction"),
    # decimals
    ("\\boxed{7.0}", "7", 1, "trailing zero"),
    ("\\boxed{0.125}", "\\frac{1}{8}", 1, "exact decimal"),
    ("\\boxed{.5}", "1/2", 1, "leading point"),
    ("\\boxed{0.3333333}", "\\frac{1}{3}", 1, "within 1e-6 relative"),
    ("\\boxed{0.333333}", "\\frac{1}{3}", 1, "1e-6 relative, the edge, included"),
    ("\\boxed{0.33333}", "\\frac{1}{3}", 0, "1e-5 relative"),
    ("\\boxed{0.333}", "1/3", 0, "rounded decimal"),
    ("\\boxed{\\frac{1}{3}}", "0.33", 0, "reference rounded to 2 digits"),
    ("\\boxed{2.5}", 2.5, 1, "numeric reference"),
    ("\\boxed{2.50}", "2.5", 1, "decimal zeros"),
    ("\\boxed{2.05}", "2.5", 0, "different decimal"),
    ("\\boxed{1.5\\times10^{-19}}", "1.5e-19", 1, "scientific notation, e form"),
    ("\\boxed{1.6\\times10^{-19}}", "1.9\\times10^{-19}", 0, "relative tolerance, not absolute"),
    ("\\boxed{0}", "0.0000001", 0, "zero is not a small number"),
    ("\\boxed{1000000.4}", "1000000", 0, "a decimal near an integer is wrong (no tolerance)"),
    ("\\boxed{0.1250001}", "\\frac{1}{8}", 0, "a value with a finite decimal: decimals exact"),
    ("\\boxed{\\frac{1}{3}}", "0.333333", 1, "a rounded decimal reference of 1/3"),
    # thousands separators
    ("\\boxed{1,000}", "1000", 1, "comma separator"),
    ("\\boxed{1{,}000}", "1000", 1, "LaTeX comma separator"),
    ("\\boxed{1\\,000}", "1000", 1, "thin-space separator"),
    ("\\boxed{1 000}", "1000", 1, "space separator"),
    ("\\boxed{1 000}", "0", 0, "space separator is not 1*000"),
    ("\\boxed{12,345.5}", "12345.5", 1, "separator and decimals"),
    ("\\boxed{1,000,000}", "10^6", 1, "two separators"),
    ("\\boxed{1,2}", "12", 0, "1,2 is a list, not 12"),
    ("\\boxed{1,2}", "\\{1, 2\\}", 1, "1,2 is the set {1, 2}"),
    ("\\boxed{2 3}", "23", 0, "2 3 is not 23"),
    # powers, roots, pi
    ("\\boxed{10^3}", "1000", 1, "issue: power"),
    ("\\boxed{2^{10}}", "1024", 1, "braced power"),
    ("\\boxed{2^{10}}", "1000", 0, "wrong power"),
    ("\\boxed{\\sqrt8}", "2\\sqrt2", 1, "issue: simplified root"),
    ("\\boxed{\\sqrt{2}}", "\\sqrt2", 1, "brace-less root"),
    ("\\boxed{\\sqrt{3}}", "\\sqrt{2}", 0, "different root"),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", 1, "rationalized"),
    ("\\boxed{\\sqrt[3]{8}}", "2", 1, "cube root"),
    ("\\boxed{\\sqrt{2}}", "1.41421356", 1, "decimal reference of a root"),
    ("\\boxed{\\pi/2}", "\\frac{\\pi}{2}", 1, "issue: pi over 2"),
    ("\\boxed{3.14159}", "\\pi", 1, "pi to 6 digits"),
    ("\\boxed{3.14}", "\\pi", 0, "pi to 3 digits"),
    ("\\boxed{2\\pi}", "\\pi", 0, "twice pi"),
    ("\\boxed{2\\pi r}", "2 r \\pi", 1, "symbolic product reordered"),
    # units, \text{}, currency
    ("\\boxed{5 \\text{ cm}}", "5", 1, "issue: unit in \\text"),
    ("\\boxed{5\\,\\mathrm{cm}^2}", "5", 1, "unit with exponent"),
    ("\\boxed{5 cm}", "5", 1, "bare unit"),
    ("\\boxed{6 \\text{ cm}}", "5", 0, "wrong number with a unit"),
    ("\\boxed{12 \\text{ dollars}}", "12", 1, "word unit"),
    ("\\boxed{90^\\circ}", "90", 1, "degrees"),
    ("\\boxed{90°}", "90", 1, "degree sign"),
    ("\\boxed{\\text{7}}", "7", 1, "number in \\text"),
    ("\\boxed{$7$}", "7", 1, "dollars as math delimiters"),
    ("\\boxed{3 \\text{ hours } 20 \\text{ minutes}}", "3", 0, "a \\text{} followed by digits is not a unit"),
    ("\\boxed{\\$12}", "12", 1, "issue: currency"),
    ("\\boxed{\\$1,000}", "1000", 1, "currency with separator"),
    ("\\boxed{€12}", "12", 1, "euro"),
    ("\\boxed{\\$13}", "12", 0, "wrong amount"),
    # percentages
    ("\\boxed{50\\%}", "50", 1, "percent sign on the answer only, as written"),
    ("\\boxed{50\\%}", "0.5", 1, "percent sign on the answer only, divided by 100"),
    ("\\boxed{50\\%}", "\\frac{1}{2}", 1, "percent against a fraction"),
    ("\\boxed{0.5}", "50\\%", 1, "percent sign on the reference only"),
    ("\\boxed{50}", "50\\%", 1, "percent sign omitted"),
    ("\\boxed{50 percent}", "50\\%", 1, "percent as a word"),
    ("\\boxed{50\\%}", "0.5\\%", 0, "signs on both sides: numbers must match"),
    ("\\boxed{50}", "0.5", 0, "no sign on either side"),
    ("\\boxed{40\\%}", "0.5", 0, "wrong percentage"),
    # signs
    ("\\boxed{\u22125}", "-5", 1, "issue: Unicode minus"),
    ("\\boxed{-5}", "\u22125", 1, "Unicode minus in the reference"),
    ("\\boxed{5}", "-5", 0, "sign dropped"),
    ("\\boxed{-(-3)}", "3", 1, "double negation"),
    ("\\boxed{\\pm 2}", "\\{-2, 2\\}", 1, "plus-minus is a set"),
    # sets, tuples, intervals, matrices
    ("\\boxed{\\{3,2,1\\}}", "\\{1,2,3\\}", 1, "issue: sets are unordered"),
    ("\\boxed{3, 2, 1}", "1, 2, 3", 1, "bare lists are sets"),
    ("\\boxed{\\{1,2\\}}", "\\{1,2,3\\}", 0, "missing element"),
    ("\\boxed{\\{1,2,4\\}}", "\\{1,2,3\\}", 0, "wrong element"),
    ("\\boxed{\\{0.5, 2\\}}", "\\{2, \\frac{1}{2}\\}", 1, "set elements compared as numbers"),
    ("\\boxed{(1,2,3)}", "(1,2,3)", 1, "tuple"),
    ("\\boxed{(3,2,1)}", "(1,2,3)", 0, "tuples are ordered"),
    ("\\boxed{1, 2, 3}", "(1,2,3)", 1, "a list in order answers a tuple"),
    ("\\boxed{3, 2, 1}", "(1,2,3)", 0, "a list out of order does not"),
    ("\\boxed{(2,1)}", "(3,0)", 0, "points with a > b are tuples, not empty intervals"),
    ("\\boxed{(2, 1)}", "\\left(2,1\\right)", 1, "point with \\left( \\right)"),
    ("\\boxed{(1,2)}", "(1, 2)", 1, "open interval or point"),
    ("\\boxed{[1,2]}", "(1,2]", 0, "closed vs half-open"),
    ("\\boxed{(-\\infty, 3]}", "(-\\infty,3]", 1, "infinite interval"),
    ("\\boxed{[0, 1)}", "[0,1)", 1, "half-open interval"),
    ("\\boxed{[0, 100]}", "[0,100]", 1, "interval, not a thousands separator"),
    ("\\boxed{[0, 100]}", "[0, 10]", 0, "interval ends differ"),
    ("\\boxed{\\{5\\}}", "5", 1, "singleton set"),
    ("\\boxed{" + MATRIX + "}", MATRIX.replace(" ", ""), 1, "matrix"),
    ("\\boxed{" + MATRIX + "}", MATRIX.replace("4", "5"), 0, "matrix entry differs"),
    ("\\boxed{\\emptyset}", "\\emptyset", 1, "empty set"),
    ("\\boxed{\\infty}", "\\infty", 1, "infinity"),
    ("\\boxed{\\infty}", "-\\infty", 0, "signed infinity"),
    # expressions and equations
    ("\\boxed{3+2x}", "2x+3", 1, "issue: commuted sum"),
    ("\\boxed{2x+3}", "2x+4", 0, "different constant"),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", 1, "expanded square"),
    ("\\boxed{x^2+1}", "(x+1)^2", 0, "wrong expansion"),
    ("\\boxed{\\frac{x}{2}}", "0.5x", 1, "decimal coefficient"),
    ("\\boxed{y=3+2x}", "y=2x+3", 1, "same equation"),
    ("\\boxed{x = 5}", "5", 1, "assignment answers the value"),
    ("\\boxed{x = 2 + 3 = 5}", "5", 1, "chained equation: the last right-hand side"),
    ("\\boxed{x = 6}", "5", 0, "wrong assignment"),
    ("\\boxed{\\sin^2 x + \\cos^2 x}", "1", 1, "identity"),
    ("\\boxed{e^{x^2}}", "e^{x^{2}}", 1, "nested exponent with a variable is fine"),
    # the box: several, none, unbalanced, empty, bare, reasoning
    ("first \\boxed{3} then corrected \\boxed{4}", "4", 1, "several boxes: the last counts"),
    ("first \\boxed{4} then corrected \\boxed{3}", "4", 0, "several boxes: an earlier right one does not"),
    ("the answer is 4", "4", 0, "no box"),
    ("$4$", "4", 0, "no box, math mode only"),
    ("\\boxed{4} and finally \\boxed{4", "4", 0, "unbalanced last box"),
    ("\\boxed{\\frac{1}{2}", "1/2", 0, "unbalanced braces"),
    ("\\boxed{}", "0", 0, "empty box"),
    ("\\boxed{ }", "0", 0, "blank box"),
    ("so \\boxed 5", "5", 1, "issue: \\boxed 5 without braces"),
    ("so \\boxed 5.", "5", 1, "bare box ending a sentence"),
    ("so \\boxed 6", "5", 0, "bare box, wrong"),
    ("\\boxed{\\boxed{5}}", "5", 1, "nested box"),
    ("<think>it is \\boxed{3}</think> so \\boxed{4}", "4", 1, "the box after reasoning"),
    ("\\boxed{(B)}", "B", 1, "issue: choice letter in parentheses"),
    ("\\boxed{\\text{B}}", "B", 1, "choice letter in \\text"),
    ("\\boxed{C}", "B", 0, "wrong letter"),
    ("\\boxed{3.}", "3", 1, "trailing full stop"),
    ("\\boxed{7}", 7, 1, "integer reference"),
    ("\\boxed{1/0}", "1/0", 1, "same odd text; no ZeroDivisionError"),
    ("\\boxed{2/0}", "1/0", 0, "different odd text"),
    ("\\boxed{\\text{Monday}}", "\\text{monday}", 1, "word answer, case-insensitive"),
    ("\\boxed{\\text{Tuesday}}", "\\text{Monday}", 0, "different word"),
    # adversarial: cut by the limits (score 0, counted) or just fast
    ("\\boxed{9^{9^{9^9}}}", "1", 0, "power tower"),
    ("\\boxed{10^{10^{10}}}", "10", 0, "power tower"),
    ("\\boxed{2^{123456789}}", "2", 0, "huge exponent"),
    ("\\boxed{(10^{3000})^{3000}}", "1", 0, "nested powers too large"),
    ("\\boxed{1000000!}", "1", 0, "huge factorial"),
    ("\\boxed{(9999)!}", "1", 0, "huge factorial of a group"),
    ("\\boxed{\\binom{1000000}{500000}}", "1", 0, "huge binomial (sympy evaluates it eagerly)"),
    ("\\boxed{(x+1)^{500}}", "x", 0, "high power of a polynomial"),
    ("\\boxed{[1, 9^{9^{9^9}}]}", "[1, 2]", 0, "tower inside an interval"),
    ("\\boxed{\\sum_{i=1}^{10} i}", "55", 0, "unevaluated sum"),
    ("\\boxed{" + "1+" * 300 + "1}", "301", 0, "answer over the length limit"),
    ("\\boxed{" + "(" * 30 + "1" + ")" * 30 + "}", "1", 0, "nesting over the limit"),
    ("\\boxed{9^{9^{9^9}}}", "9^{9^{9^9}}", 1, "identical text is right even when cut"),
    ("\\boxed{10!}", "3628800", 1, "small factorial is evaluated"),
    ("\\boxed{2^{1000}}", "2^{1000}", 1, "big but bounded power"),
    ("\\boxed{2^{1000}}", "2^{1000}+1", 0, "big numbers compared exactly"),
    ("x " * 20000 + "\\boxed{5}", "5", 1, "long completion, short box"),
    ("\\boxed{" * 5000 + "{" * 5000, "1", 0, "repeated unclosed boxes"),
    ("\\boxed{\\frac{\\frac{\\frac{1}{2}}{3}}{4}}", "\\frac{1}{24}", 1, "nested fractions within limits"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("completion, answer, expected, why", MATH_CASES,
                         ids=[f"{i}-{case[3]}" for i, case in enumerate(MATH_CASES)])
def test_math_boxed(completion, answer, expected, why):
    assert REWARDS["math_boxed"](completion, {"answer": answer}) == float(expected), why


def test_math_table_is_large_and_labelled():
    assert len(MATH_CASES) >= 100
    assert {expected for _, _, expected, _ in MATH_CASES} == {0, 1}
    assert all(why for *_, why in MATH_CASES)


ISSUE_EXAMPLES = [  # the issue's list: (completion, reference, expected)
    ("\\boxed{1\\frac{1}{2}}", "11/2", 0), ("\\boxed{2\\frac{1}{3}}", "7", 0), ("\\boxed{2(3)}", "23", 0),
    ("\\boxed{5 \\text{ cm}}", "5", 1), ("\\boxed{\\$12}", "12", 1), ("\\boxed{10^3}", "1000", 1),
    ("\\boxed{\\sqrt8}", "2\\sqrt2", 1), ("\\boxed{\\pi/2}", "\\frac{\\pi}{2}", 1),
    ("\\boxed{3+2x}", "2x+3", 1),
    ("\\boxed{\\{3,2,1\\}}", "\\{1,2,3\\}", 1), ("\\boxed{\u22125}", "-5", 1), ("\\boxed{(B)}", "B", 1),
    ("\\boxed 5", "5", 1),
]


def test_issue_examples_score_right():
    assert [REWARDS["math_boxed"](c, {"answer": a}) for c, a, _ in ISSUE_EXAMPLES] == [
        float(e) for *_, e in ISSUE_EXAMPLES]


@pytest.mark.parametrize("completion, answer, reason", [
    ("\\boxed{9^{9^{9^9}}}", "1", "exponent"),
    ("\\boxed{10^{10^{10}}}", "1", "exponent"),
    ("\\boxed{1000000!}", "1", "factorial"),
    ("\\boxed{\\binom{1000000}{500000}}", "1", "binomial"),
    ("\\boxed{(10^{3000})^{3000}}", "1", "magnitude"),
    ("\\boxed{\\int_0^1 x dx}", "1/2", "calculus"),
    ("\\boxed{" + "1+" * 300 + "1}", "1", "answer_chars"),
    ("\\boxed{" + "{" * 30 + "1" + "}" * 30 + "}", "1", "nesting"),
    ("x" * (MAX_COMPLETION_CHARS + 1) + "\\boxed{1}", "1", "completion_chars"),
])
def test_limits_are_counted(completion, answer, reason):
    pop_limit_counts()
    for _ in range(3):  # counted on every call (parses are cached, counts are not)
        assert REWARDS["math_boxed"](completion, {"answer": answer}) == 0.0
    assert pop_limit_counts() == {reason: 3}
    assert pop_limit_counts() == {}  # popped: cleared


def test_limits_on_the_reference_are_counted_apart():
    pop_limit_counts()
    assert REWARDS["math_boxed"]("\\boxed{1}", {"answer": "10^{10^{10}}"}) == 0.0
    assert pop_limit_counts() == {"gold_exponent": 1}


@pytest.mark.timeout(60)
def test_adversarial_inputs_finish_fast():
    """Inputs built to make sympy explode finish in well under a second each; the bound is loose
    (shared CPUs) but a hang or a seconds-long sympy evaluation fails it."""
    import time

    nasty = ["9^{9^{9^9}}", "10^{10^{10}}", "2^{9999}^{9999}", "\\max(9^{9999}, 8^{9999})",
             "\\gcd(9^{9999}, 6)", "(9^{9999})!", "\\lfloor 9^{9^{9^9}} \\rfloor", "\\frac{1000!}{999!}",
             "\\binom{1000}{500}", "x^{9^{9^9}}", "(x+1)^{100} - (x+1)^{100}", "\\sin(10^{9999})",
             "\\sqrt{" * 12 + "2" + "}" * 12, "1e99999", "\\{" + ",".join(str(i) for i in range(100)) + "\\}",
             "-" * 399 + "1", "\\frac{" * 6 + "1" + "}{2}" * 6, "2^{2^{2^{2^{2}}}}"]
    for answer in nasty:
        for gold in ("1", answer + "+1"):
            start = time.perf_counter()
            assert REWARDS["math_boxed"](f"\\boxed{{{answer}}}", {"answer": gold}) == 0.0, answer
            assert time.perf_counter() - start < 5.0, answer
    pop_limit_counts()


def test_rewards_work_off_the_main_thread():
    """No SIGALRM-based timeout inside (math-verify's would raise in a worker thread)."""
    import threading

    results = []
    worker = threading.Thread(target=lambda: results.append(
        REWARDS["math_boxed"]("\\boxed{\\frac{2}{4}}", {"answer": "0.5"})))
    worker.start()
    worker.join(60)
    assert results == [1.0]


@pytest.mark.parametrize("completion, answer, expected", [
    ("I count \\boxed{7}", 7, 1.0),
    ("I count \\boxed{7}", "7", 1.0),
    ("\\boxed{7.0}", 7, 1.0),
    ("\\boxed{7.}", 7, 1.0),
    ("\\boxed{\\text{7}}", 7, 1.0),
    ("\\boxed{1,200}", 1200, 1.0),
    ("\\boxed 7", 7, 1.0),
    ("\\boxed{\\frac{14}{2}}", 7, 1.0),
    ("\\boxed{7 apples}", 7, 1.0),  # a reader accepts the unit-like word
    ("\\boxed{7 \\text{ apples}}", 7, 1.0),
    ("\\boxed{seven}", 7, 1.0),  # number words zero..twenty, as the whole box or answer
    ("</think> Seven.", 7, 1.0),
    ("\\boxed{7}", "seven", 1.0),  # a word reference too
    ("</think> 7", 7, 1.0),
    ("</think> 7.", 7, 1.0),
    ("There are 3 red and 4 blue, so 7 in total.", 7, 1.0),  # last number, no box
    ("There are 1,200 birds", 1200, 1.0),
    ("<think>maybe 7</think> there are 6", 7, 0.0),  # the answer part's last number
    ("I see seven cats", 7, 0.0),  # words inside prose are not read
    ("\\boxed{7 or 8}", 7, 0.0),  # two numbers
    ("\\boxed{7.5}", 7, 0.0),  # not an integer
    ("about 7.5", 7, 0.0),
    ("\\boxed{3.5}", 3, 0.0),
    ("\\boxed{-7}", 7, 0.0),
    ("\\boxed{7}", 8, 0.0),
    ("\\boxed{8}", "seven", 0.0),
    ("\\boxed{7}", "7.5", 0.0),  # a non-integer reference is unusable
    ("\\boxed{7", 7, 0.0),  # unclosed box
    ("\\boxed{}", 0, 0.0),
    ("no numbers at all", 0, 0.0),
    ("\\boxed{10^{10^{10}}}", 7, 0.0),
])
def test_counting(completion, answer, expected):
    assert REWARDS["counting"](completion, {"answer": answer}) == expected


@pytest.mark.parametrize("completion, answer, expected", [
    ("\\boxed{B}", "B", 1.0),
    ("\\boxed{(B)}", "B", 1.0),
    ("\\boxed{\\text{B}}", "(B)", 1.0),
    ("\\boxed{\\textbf{(C)}}", "C", 1.0),
    ("\\boxed{b}", "B", 1.0),
    ("\\boxed{B. 42}", "B", 1.0),
    ("\\boxed{(B) 42}", "B", 1.0),
    ("\\boxed B", "B", 1.0),
    ("</think> B", "B", 1.0),  # the whole answer is a choice
    ("</think> (B)", "B", 1.0),
    ("</think> B)", "B", 1.0),
    ("</think> \\text{B}", "B", 1.0),
    ("</think> $\\text{B}$", "B", 1.0),
    ("</think> B. 42", "B", 1.0),
    ("</think> **(D)**", "D", 1.0),
    ("The answer is (C).", "C", 1.0),
    ("Answer: **D**", "D", 1.0),
    ("answer is A, no wait, the answer is E", "E", 1.0),
    ("first \\boxed{A}, then \\boxed{C}", "C", 1.0),  # the last box counts
    ("first \\boxed{C}, then \\boxed{A}", "C", 0.0),
    ("\\boxed{BE}", "B", 0.0),  # two letters
    ("\\boxed{Apple}", "A", 0.0),
    ("\\boxed{F}", "F", 0.0),  # outside A-E
    ("I think B", "B", 0.0),  # no box, no "answer is"
    ("A cat sat", "A", 0.0),  # an article is not a choice
    ("</think> b", "B", 0.0),  # unboxed lowercase is a word, not a choice
    ("\\boxed{B}", "b c", 0.0),  # unusable reference
    ("\\boxed{B", "B", 0.0),  # unclosed box
])
def test_multiple_choice(completion, answer, expected):
    assert REWARDS["multiple_choice"](completion, {"answer": answer}) == expected


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
    ("\\boxed{Golden Retriever}", "golden retriever", 1.0),
    ("</think>cat", "Cat", 1.0),  # no box: the whole answer part
    ("</think> cat.", "cat", 1.0),
    ("\\boxed{\\text{cat}}", "cat", 1.0),
    ("\\boxed{3}", 3, 1.0),
    ("\\boxed{3.0}", "3", 1.0),  # both math: the math_boxed equivalence
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("</think> 1,000", "1000", 1.0),
    ("\\boxed{dog}", "cat", 0.0),
    ("\\boxed{dog}", "god", 0.0),  # words are text, not products of symbols
    ("\\boxed{7 apples}", "7", 0.0),  # words on one side: compared as text
    ("\\boxed{2 3}", "23", 0.0),
    ("\\boxed{8}", "7", 0.0),
    ("\\boxed{}", "", 0.0),
])
def test_exact_match(completion, answer, expected):
    assert REWARDS["exact_match"](completion, {"answer": answer}) == expected


def test_every_task_uses_registered_rewards():
    from training.tasks import TASKS

    assert {"math", "counting", "digits", "classification", "multiple_choice", "ocr", "grounding"} <= set(TASKS)
    for task in TASKS.values():
        assert set(task.weights) <= set(REWARDS) and task.correct in REWARDS and task.correct in task.weights


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
