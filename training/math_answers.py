"""Whether a math answer equals the reference (`math_equal`), on math-verify, at a bounded cost.

Math equivalence (math_boxed; exact_match on math). Answer text identical to the reference up to
whitespace is right. Otherwise both sides are parsed to sympy with math-verify's LaTeX
normalization (latex2sympy2_extended.normalize_latex with math_verify's LatexExtractionConfig
settings) and its latex2sympy parser, and compared with `math_verify.verify`, except for numbers,
sets, tuples, intervals and matrices, which are compared here element by element so that the
policy below holds exactly. We do not call `math_verify.parse`: its LaTeX path hard-codes
latex2sympy's "integer followed by a positive rational is a mixed number" rule, which reads `2(3)`,
`(2)3`, `2[3]` and `2 3` as 5 and `2\\left(\\frac12\\right)` as 5/2 (wrong answers scoring 1), and
its percent parsing fails with the ANTLR 4.9.3 runtime we pin (hydra-core needs it). Decisions:
  * Mixed numbers: digits directly followed by a proper digit fraction, `1\\frac{1}{2}` = 3/2,
    `-2\\frac{1}{3}` = -7/3 (never 11/2). Any other juxtaposition is a product: `2(3)` = 6,
    `2\\frac{4}{2}` = 4.
  * Decimals are exact (0.5 = 1/2, 7.0 = 7, 0.125 = 1/8; 1000000.4 is not 1000000, 0.1250001 is
    not 1/8, 1.6\\times10^{-19} is not 1.9\\times10^{-19}). Only a decimal standing for a value
    with no finite decimal expansion (1/3, \\pi, \\sqrt2), on either side, may be off by a relative
    1e-6 (|pred - gold| <= 1e-6 max(|pred|, |gold|)): 0.333333 and 0.3333333 match 1/3, 0.333 and 0.33333 do
    not; 3.14159 matches \\pi, 3.14 does not. Exact values (fractions, roots, \\pi) are compared
    exactly: \\sqrt8 = 2\\sqrt2, \\pi/2 = \\frac{\\pi}{2}, 10^3 = 1000.
  * Thousands separators only in an answer that is one number: `1,000`, `1{,}000`, `1\\,000`,
    `1 000` are 1000, `12,345.5` is 12345.5; `1,2` is the set {1, 2}, never 12.
  * Percentages: a trailing `\\%` / `%` / `percent` on ONE side may be read either as written or
    divided by 100: `50\\%` matches 50, 0.5 and \\frac12; with the sign on both sides the numbers
    must match (50\\% vs 0.5\\% is 0); with no sign on either, 50 vs 0.5 is 0.
  * Units and words: one trailing unit is dropped (`5 \\text{ cm}`, `5\\,\\mathrm{cm}^2`, `5 cm`,
    `12 \\text{ dollars}`, `90^\\circ`, `90°`) as math-verify does; a \\text{} group followed by
    more digits (`3 \\text{ h } 20 \\text{ min}`) is not a unit and keeps everything (0 vs 3).
  * Currency: `\\$`, `$`, `€`, `£`, `¥` are dropped (`\\$12` = 12, `\\$1,000` = 1000).
  * Signs: the Unicode minus (U+2212, also U+FE63, U+FF0D) reads as `-`; `\\pm 2` is {-2, 2}.
  * Sets are unordered (`\\{3,2,1\\}` = `\\{1,2,3\\}` = `1, 2, 3`), tuples ordered (`(1,2,3)` is
    not `(3,2,1)`); a reference tuple accepts the bare list `1, 2, 3` in the same order.
    `(a, b)` with a < b is read as the open interval, as math-verify does; intervals need the same
    ends and the same open/closed sides (`(1, 2]` is not `[1, 2]`). Matrices: same shape and
    entries.
  * Expressions and equations: math_verify.verify (`3+2x` = `2x+3`); an assignment `x = 5` (or
    `x = 2 + 3 = 5`: the last right-hand side) answers the same as `5` when the reference is not
    an equation itself. Symbols are case-insensitive (latex2sympy lowercases them).
  * Trailing full stop is dropped (`3.` is 3). Unparsable answers are right only when their
    normalized text equals the reference's.

Bounded cost, independent of machine load. math-verify's own timeouts (SIGALRM: main thread only;
and any wall-clock limit would make a reward depend on load and break exact resume) are disabled
(`timeout_seconds=None`). Instead inputs are cut deterministically before sympy sees them, and
every cut scores 0 and is counted in LIMITS_HIT[reason] (`pop_limit_counts()` returns and clears
the counts, e.g. to log them per GRPO step; a cut on the reference side is counted as
"gold_<reason>"):
  completion_chars  completion longer than MAX_COMPLETION_CHARS (math_boxed, counting, exact_match)
  answer_chars      box / reference longer than MAX_ANSWER_CHARS
  nesting           brackets nested deeper than MAX_NESTING
  exponent          a numeric power tower (an exponent holding `^` and no letters, `9^{9^{9^9}}`,
                    `10^{10^{10}}`), an exponent with more than MAX_EXPONENT_DIGITS digits, or a
                    power of a variable above MAX_SYMBOLIC_EXPONENT (`(x+1)^{500}`)
  factorial         `n!` with n > MAX_FACTORIAL, or `(...)!` holding more than 3 digits
  binomial          \\binom / \\choose / \\Gamma with a number above MAX_FACTORIAL (evaluated eagerly)
  magnitude         the parsed expression may hold a number of more than MAX_DIGITS digits (bound
                    computed on the unevaluated tree: powers, products, factorials)
  calculus          an unevaluated sum, product, integral, limit or derivative
  elements          a set / tuple of more than MAX_ELEMENTS elements
An answer identical to the reference (whitespace aside) is right before any of these applies.
"""

from __future__ import annotations

import collections
import functools
import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import math_verify
import math_verify.grader
import sympy
from latex2sympy2_extended.latex2sympy2 import ConversionConfig, _Latex2Sympy, normalize_latex
from latex2sympy2_extended.sets import FiniteSet as OrderedFiniteSet
from math_verify.grader import should_treat_as_complex
from math_verify.parser import get_last_eq

# ----------------------------------------------------------------------------- limits

MAX_COMPLETION_CHARS = 262_144
MAX_ANSWER_CHARS = 400
MAX_NESTING = 12
MAX_EXPONENT_DIGITS = 4
MAX_FACTORIAL = 1000
MAX_DIGITS = 20_000
MAX_ELEMENTS = 64
MAX_SYMBOLIC_EXPONENT = 100

# reason -> number of inputs cut since the last pop_limit_counts(); see the module docstring.
LIMITS_HIT: collections.Counter[str] = collections.Counter()
# every reason a cut is counted under (a reference-side cut adds the prefix "gold_")
LIMIT_REASONS = ("completion_chars", "answer_chars", "nesting", "elements", "exponent", "factorial", "binomial",
                 "calculus", "magnitude")


def pop_limit_counts() -> dict[str, int]:
    """The limit counts since the last call ({reason: count}), and reset them."""
    counts = dict(LIMITS_HIT)
    LIMITS_HIT.clear()
    return counts


class _Cut(Exception):
    """An input over a cost limit; `reason` is the LIMITS_HIT key."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


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



# ----------------------------------------------------------------------------- math equivalence


# verify() logs a warning the first time it runs with timeouts off; they are off on purpose (see
# the module docstring), so it is not printed into every training log.
math_verify.grader.TIMEOUT_WARNING_SHOWN = True

_MIXED = re.compile(r"(\d+)\\frac\{(\d+)\}\{(\d+)\}")


class _Converter(_Latex2Sympy):
    """latex2sympy with mixed numbers only where a reader sees one (see the module docstring).

    Same as _Latex2Sympy.convert_postfix_list (latex2sympy2_extended 1.11, pinned through
    math-verify 0.9) except for that rule, which upstream applies to any integer followed by a
    positive rational (its ConversionConfig.interpret_as_mixed_fractions is never read).
    """

    def convert_postfix_list(self, arr, i=0):
        if i >= len(arr):
            raise Exception("Index out of bounds")
        res = self.convert_postfix(arr[i])
        if isinstance(res, (sympy.Expr, sympy.Matrix)):
            if i == len(arr) - 1:
                return res
            rh = self.convert_postfix_list(arr, i + 1)
            if getattr(res, "is_Matrix", False) or getattr(rh, "is_Matrix", False):
                return self.mat_mul_flat(res, rh)
            if i + 2 == len(arr):
                m = _MIXED.fullmatch(arr[i].getText() + arr[i + 1].getText())
                if m and 0 < int(m[2]) < int(m[3]):
                    whole, num, den = (int(g) for g in m.groups())
                    return sympy.Rational(whole * den + num, den)
            return self.mul_flat(res, rh)
        if isinstance(res, list) and len(res) == 1:  # a derivative
            if i == len(arr) - 1:
                raise Exception("Expected expression for derivative")
            return sympy.Derivative(self.convert_postfix_list(arr, i + 1), res[0])
        return res

    def handle_gcd_lcm(self, f, args):
        # upstream passes unevaluated powers to sympy.gcd, which reads them as polynomial
        # generators: gcd(9^{9999}, 6) came out 1. Evaluate the (bounded) arguments first.
        for arg in args:
            if _log10_bound(arg) > MAX_DIGITS:
                raise _Cut("magnitude")
        return super().handle_gcd_lcm(f, [sympy.sympify(arg).doit() for arg in args])


# math_verify.parse's LaTeX normalization; units on or off (see _units_only_at_end)
_NORMALIZATION = {
    units: type(math_verify.LatexExtractionConfig().normalization_config)(
        **{**math_verify.LatexExtractionConfig().normalization_config.__dict__, "boxed": "all",
           "units": units})
    for units in (True, False)}


@dataclass(frozen=True)
class _Answer:
    expr: Any  # sympy object, None when unparsable
    text: str  # normalized LaTeX (compared when neither side parses)
    percent: bool  # a trailing percent sign was removed
    decimal: bool  # a decimal number was written (relative tolerance applies)
    cut: str | None = None  # the limit it hit (then expr is None)


_UNICODE = {"\u2212": "-", "\ufe63": "-", "\uff0d": "-", "\u00d7": "\\times ",
            "\u00b7": "\\cdot ", "\u00f7": "\\div ", "\u00b0": "^\\circ", "\u03c0": "\\pi ",
            "\u221e": "\\infty ", "\u221a": "\\sqrt", "\u2264": "\\le ", "\u2265": "\\ge "}
_CURRENCY = re.compile(r"\\\$|\$|€|£|¥|\\euro\b|\\pounds\b|\\yen\b")
_TEXT_GROUP = re.compile(r"\\(?:text|mbox|mathrm|textrm|textbf|textit|textnormal|mathbf|mathit)\s*\{[^{}]*\}")
_PERCENT_TEXT = re.compile(r"\\(?:text|mbox|mathrm)\s*\{\s*\\?%\s*\}")
_TRAILING_STOP = re.compile(r"(?<=[\w}\)\]])\s*\.$")
_PERCENT = re.compile(r"(.*?)(?:\s|\\[,;: !]|~)*\\?%(?:\s|\\[,;: !]|~)*", re.DOTALL)
_THOUSANDS = re.compile(r"(-?)([1-9]\d{0,2}(?:(?:,|\{,\}|\\,|\\ |\\;|~|\s)\d{3})+)(\.\d+)?")
_PLAIN_NUMBER = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")
_E_NOTATION = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)[eE][+-]?\d{1,4}")
_BINOMIAL = re.compile(r"\\[dt]?binom|\\choose|\\Gamma|\\operatorname\s*\{\s*Gamma\s*\}")
_INTEGER = re.compile(r"\d+")


def _units_only_at_end(s: str) -> bool:
    """No digit after any \\text{}-like group, except a unit's exponent (`\\text{cm}^2`)."""
    for m in _TEXT_GROUP.finditer(s):
        after = re.sub(r"^\s*\^\s*\{?\s*\d\s*\}?", "", s[m.end():])
        if re.search(r"\d", after):
            return False
    return True


def _exponent_at(s: str, i: int) -> str:
    """The exponent after the `^` at i: a brace group, a command, a digit run or one character."""
    j = i + 1
    while j < len(s) and s[j] == " ":
        j += 1
    if j >= len(s):
        return ""
    if s[j] == "{":
        group = _braced(s, j)
        return s[j + 1 :] if group is None else group
    m = re.match(r"\\[a-zA-Z]+|\d+|.", s[j:])
    return m[0]


def _check_text(s: str) -> None:
    """Raise _Cut for inputs sympy could choke on, before parsing (see the module docstring)."""
    if len(s) > MAX_ANSWER_CHARS:
        raise _Cut("answer_chars")
    depth = deepest = 0
    for ch in s:
        if ch in "{([":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "})]":
            depth = max(depth - 1, 0)
    if deepest > MAX_NESTING:
        raise _Cut("nesting")
    if s.count(",") >= MAX_ELEMENTS:  # cheaper than parsing the list first
        raise _Cut("elements")
    for i, ch in enumerate(s):
        if ch == "^":
            exponent = _exponent_at(s, i)
            no_letters = not re.search(r"[a-zA-Z]", re.sub(r"\\[a-zA-Z]+", "", exponent))
            if "^" in exponent and no_letters:
                raise _Cut("exponent")
            if sum(c.isdigit() for c in exponent) > MAX_EXPONENT_DIGITS:
                raise _Cut("exponent")
        elif ch == "!" and (i == 0 or s[i - 1] != "\\") and s[i + 1 : i + 2] != "=":
            before = s[:i].rstrip().rstrip("!")
            literal = re.search(r"(\d+)$", before)
            if literal and int(literal[1]) > MAX_FACTORIAL:
                raise _Cut("factorial")
            if before.endswith((")", "}", "]")) and sum(c.isdigit() for c in before[-40:]) > 3:
                raise _Cut("factorial")
    if _BINOMIAL.search(s) and any(int(n) > MAX_FACTORIAL for n in _INTEGER.findall(s)):
        raise _Cut("binomial")


def _ilog10(n: int) -> float:
    return abs(n).bit_length() * 0.30103


def _log10_bound(e) -> float:
    """Upper bound of log10(max(|value|, 10)) for an unevaluated sympy tree, computed without
    evaluating it: symbols count as 10, sums as their largest term, products as the sum of their
    factors, b^x as |x| log10 b, n! as n log10 n. Raises _Cut for unevaluated calculus."""
    if isinstance(e, sympy.MatrixBase):
        return max([_log10_bound(x) for x in e] or [1.0])
    if isinstance(e, (sympy.Sum, sympy.Product, sympy.Integral, sympy.Limit, sympy.Derivative)):
        raise _Cut("calculus")
    if isinstance(e, sympy.Rational):
        return max(_ilog10(e.p), _ilog10(e.q), 1.0)
    if isinstance(e, sympy.Float):
        _, man, exp, bc = e._mpf_ if len(e._mpf_) == 4 else (0, 0, 0, 0)
        return max(abs(exp + bc) * 0.30103, 1.0) if man else 1.0
    if not isinstance(e, sympy.Basic) or not e.args:
        return 1.0
    if isinstance(e, sympy.Pow):
        base, exponent = e.args
        lb = _log10_bound(base)
        if exponent.free_symbols:
            return lb + _log10_bound(exponent)
        if isinstance(exponent, sympy.Rational):
            size = abs(Fraction(exponent.p, exponent.q))
            if base.free_symbols and size > MAX_SYMBOLIC_EXPONENT:
                raise _Cut("exponent")  # (x + 1)^500: simplify would expand it
        else:
            le = _log10_bound(exponent)
            if le > 9:
                raise _Cut("magnitude")
            size = 10.0 ** le
        return max(lb, 1.0) * max(float(size), 1.0)
    if isinstance(e, (sympy.factorial, sympy.factorial2, sympy.subfactorial, sympy.gamma)):
        (n,) = e.args[:1]
        if n.free_symbols:
            return _log10_bound(n) + 1.0
        ln = _log10_bound(n)
        if ln > 9:
            raise _Cut("magnitude")
        size = float(abs(Fraction(n.p, n.q))) if isinstance(n, sympy.Rational) else 10.0 ** ln
        return max(size, 1.0) * max(math.log10(max(size, 10.0)), 1.0)
    parts = [_log10_bound(a) for a in e.args]
    if isinstance(e, sympy.Mul):
        return sum(parts)
    if isinstance(e, sympy.Add):
        return max(parts) + math.log10(len(parts))
    return max(parts) + 1.0


def _to_rationals(expr):
    """Decimals as the exact rationals they denote (0.333 -> 333/1000); a written list keeps its
    order (a reference tuple compares with it in order)."""
    if isinstance(expr, OrderedFiniteSet) and hasattr(expr, "_unsorted_args"):
        return OrderedFiniteSet(*map(_to_rationals, expr._unsorted_args))
    if isinstance(expr, sympy.MatrixBase):
        return expr.applyfunc(_to_rationals)
    if not isinstance(expr, sympy.Basic):
        return expr
    return expr.xreplace({f: sympy.Rational(str(f)) for f in expr.atoms(sympy.Float)})


@functools.lru_cache(maxsize=4096)
def _parse_answer(raw: str) -> _Answer:
    """An answer (a box's content or a reference) as sympy, or the limit it hit (never raises
    for a limit; other parse failures give expr None)."""
    s = raw.strip()
    try:
        if len(s) > MAX_ANSWER_CHARS:
            raise _Cut("answer_chars")
        for old, new in _UNICODE.items():
            s = s.replace(old, new)
        s = _PERCENT_TEXT.sub(r"\\%", _CURRENCY.sub("", s)).strip()
        s = _TRAILING_STOP.sub("", s)
        _check_text(s)
        # math-verify drops everything from the first \\text{} group to the end as a "unit"; keep
        # that only when no digit follows a \\text{} group (`3 \\text{ h } 20 \\text{ min}`).
        units = _units_only_at_end(s)
        text = normalize_latex(s, _NORMALIZATION[units]).strip()
        m = _PERCENT.fullmatch(text)
        percent = m is not None and bool(m[1].strip())
        if percent:
            text = m[1].strip()
        m = _THOUSANDS.fullmatch(text)
        if m:
            text = m[1] + re.sub(r"\D", "", m[2]) + (m[3] or "")
        decimal = bool(re.search(r"\d\.\d|(?<!\d)\.\d|\d[eE][+-]?\d", text))
        if _PLAIN_NUMBER.fullmatch(text) or _E_NOTATION.fullmatch(text):
            if _E_NOTATION.fullmatch(text) and abs(int(re.split(r"[eE]", text)[1])) > MAX_DIGITS:
                raise _Cut("magnitude")
            return _Answer(sympy.Rational(text.rstrip(".")), text, percent, decimal)
        expr = _latex_to_sympy(text)
        if expr is None:
            return _Answer(None, text, percent, decimal)
        if _log10_bound(expr) > MAX_DIGITS:
            raise _Cut("magnitude")
        if isinstance(expr, (sympy.FiniteSet, sympy.Tuple)) and len(expr.args) > MAX_ELEMENTS:
            raise _Cut("elements")
        return _Answer(_to_rationals(expr), text, percent, decimal)
    except _Cut as cut:
        return _Answer(None, s, False, False, cut.reason)


def _latex_to_sympy(text: str):
    """math-verify's parse_latex_cached with our Converter: the whole text, else its last
    equation (`x = 2 + 3 = 5` -> `5`); None when neither parses."""
    def convert(latex):
        return _Converter(None, not should_treat_as_complex(latex), False, ConversionConfig()).parse(latex)

    try:
        return convert(text)
    except _Cut:
        raise
    except Exception:
        last = get_last_eq(text)
        if last != text:
            try:
                return convert(last)
            except _Cut:
                raise
            except Exception:
                return None
    return None


def _unwrap_assignment(e):
    """`x = 5` -> 5, `x = 2 + 3 = 5` -> 5; anything else unchanged."""
    if math_verify.grader.is_assignment_relation(e):
        return math_verify.grader.take_last_relation(e).rhs
    return e


def _is_number(e) -> bool:
    return (isinstance(e, sympy.Expr) and not isinstance(e, sympy.MatrixBase)
            and not e.free_symbols and e.is_number)


def _terminates(x) -> bool:
    """x has a finite decimal expansion (a rational whose denominator is 2^a 5^b)."""
    if not isinstance(x, sympy.Rational):
        return False
    q = int(x.q)
    for f in (2, 5):
        while q % f == 0:
            q //= f
    return q == 1


def _numbers_equal(g, p, decimal: bool) -> bool:
    """Exact equality, except that a decimal approximating a value with no finite decimal
    expansion (1/3, pi) may be off by 1e-6 relative."""
    if g.has(sympy.zoo, sympy.nan) or p.has(sympy.zoo, sympy.nan):
        return False  # undefined (1/0): only the identical text is right
    if g == p:
        return True
    if g.has(sympy.oo, -sympy.oo) or p.has(sympy.oo, -sympy.oo):
        return False
    g, p = g.doit(), p.doit()
    decimal = decimal and not (_terminates(g) and _terminates(p))  # 0.1250001 is not 1/8
    if isinstance(g, sympy.Rational) and isinstance(p, sympy.Rational):
        return g == p or (decimal and abs(g - p) <= max(abs(g), abs(p)) / 10**6)
    if g - p == 0:
        return True
    size, gap = max(abs(g.evalf(60)), abs(p.evalf(60))), abs((g - p).evalf(60))
    if not (isinstance(size, sympy.Number) and isinstance(gap, sympy.Number)):
        return False  # did not evaluate to a number (an undefined function, ...)
    if decimal:
        return bool(size > 0 and gap <= size / 10**6)
    return bool(gap <= max(size, 1) / sympy.Integer(10) ** 45)  # exact values: 60-digit evaluation


def _equivalent(g, p, decimal: bool) -> bool:
    if math_verify.grader.is_relation(p) and not math_verify.grader.is_relation(g):
        p = _unwrap_assignment(p)
    elif math_verify.grader.is_relation(g) and not math_verify.grader.is_relation(p):
        g = _unwrap_assignment(g)
    if _is_number(g) and _is_number(p):
        return _numbers_equal(g, p, decimal)
    if _is_number(g) != _is_number(p) and (
            isinstance(g, (sympy.Set, sympy.Tuple)) or isinstance(p, (sympy.Set, sympy.Tuple))):
        # one side a number, the other a set: only a one-element set can match
        g_items = list(g.args) if isinstance(g, sympy.FiniteSet) else [g]
        p_items = list(p.args) if isinstance(p, sympy.FiniteSet) else [p]
        if len(g_items) == len(p_items) == 1 and (g_items[0] is not g or p_items[0] is not p):
            return _equivalent(g_items[0], p_items[0], decimal)
        return False
    same = functools.partial(_equivalent, decimal=decimal)
    if isinstance(g, sympy.FiniteSet) and isinstance(p, (sympy.FiniteSet, sympy.Tuple)):
        return _same_multiset(list(g.args), list(p.args), same)
    if isinstance(g, sympy.Tuple) and isinstance(p, (sympy.Tuple, sympy.FiniteSet)):
        p_items = list(getattr(p, "_unsorted_args", p.args))
        if isinstance(p, sympy.FiniteSet) and not isinstance(p, OrderedFiniteSet):
            return False  # a set whose written order is lost cannot answer a tuple
        return len(g.args) == len(p_items) and all(same(a, b) for a, b in zip(g.args, p_items))
    if isinstance(g, sympy.Interval) and isinstance(p, sympy.Interval):
        return (g.left_open == p.left_open and g.right_open == p.right_open
                and same(g.start, p.start) and same(g.end, p.end))
    if isinstance(g, sympy.MatrixBase) and isinstance(p, sympy.MatrixBase):
        return g.shape == p.shape and all(same(a, b) for a, b in zip(g, p))
    # expressions, equations, unions, (1, 2) read as an interval against the list 1, 2, ...
    return math_verify.verify(g, p, timeout_seconds=None)


def _same_multiset(g_items: list, p_items: list, same) -> bool:
    if len(g_items) != len(p_items):
        return False
    left = list(p_items)
    for g in g_items:
        for k, p in enumerate(left):
            if same(g, p):
                del left[k]
                break
        else:
            return False
    return True


def _squash(s: str) -> str:
    """Whitespace runs as one space (not removed: `2 3` is not `23`)."""
    return " ".join(s.split())


def _count_cut(reason: str | None, side: str = "") -> None:
    if reason is not None:
        LIMITS_HIT[side + reason] += 1


def math_equal(pred: str, gold: str) -> bool:
    """`pred` answers `gold` (both LaTeX answer texts, no \\boxed), by the rules in the module
    docstring. Over-limit inputs are False and counted in LIMITS_HIT."""
    if not pred.strip():
        return False
    if _squash(pred) == _squash(gold):
        return True
    g = _parse_answer(gold)
    if g.cut:
        _count_cut(g.cut, "gold_")
        return False
    p = _parse_answer(pred)
    if p.cut:
        _count_cut(p.cut)
        return False
    if g.expr is None or p.expr is None:
        return (g.expr is None and p.expr is None and g.percent == p.percent
                and bool(g.text) and _squash(g.text) == _squash(p.text))
    decimal = g.decimal or p.decimal
    readings = [lambda: (g.expr, p.expr)]
    if g.percent != p.percent:  # the sign on one side only: as written, or divided by 100
        readings.append(lambda: (g.expr / 100, p.expr) if g.percent else (g.expr, p.expr / 100))
    for reading in readings:
        try:
            if _equivalent(*reading(), decimal):
                return True
        except Exception:  # e.g. a tuple divided by 100
            continue
    return False
