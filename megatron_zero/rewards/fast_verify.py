r"""Wrong answers math-verify would reject, recognised without sympy's `simplify`: a number against an interval,
or a number clearly away from a numeric ground truth (``5`` against ``2\sqrt{3}``).

Why: once parsing is fast (fast_parse.py), grading time goes to math-verify's `verify` of wrong answers, which
ends in ``simplify(gold - answer)`` (5-30 ms) before it says no. Only "wrong" is decided here, and only where
math-verify's verify 0.9 can say nothing else: it says equal through structural equality, rounding both to 6
decimals, ``simplify(gold - answer) == 0`` (all three need the values to agree: sympy's rewriting keeps values),
equal normalised strings (checked here), or special rules for sets, relations, symbols and percentages (their
gold answers are left to math-verify). Anything not certain returns None and math-verify decides.

How: ``certainly_wrong(gold_parse, answer_parse)`` with parses as `math_reward._parse` returns them.
"""

import functools
from typing import Optional

import sympy

# Values this far apart (relative to the answer, at least 1e-4) differ after rounding to 6 decimals too, and by far
# more than a 15-digit Float's precision.
_MIN_RELATIVE_GAP = 1e-4
_EVALF_DIGITS = 30


@functools.lru_cache(maxsize=4096)
def _numeric_value(gold: sympy.Expr) -> Optional[sympy.Float]:
    """The real value of a numeric ground truth with no special comparison rules, None otherwise."""
    # Percentages (x * UnevaluatedExpr(1/100)) compare as integers in math-verify (50% = 50): not by value.
    if not gold.is_number or gold.has(sympy.UnevaluatedExpr):
        return None
    value = gold.evalf(_EVALF_DIGITS)
    return value if value.is_Float and value.is_finite else None


def _split(parsed: tuple) -> Optional[tuple[sympy.Basic, str]]:
    if len(parsed) == 2 and isinstance(parsed[0], sympy.Basic) and isinstance(parsed[1], str):
        return parsed[0], parsed[1]
    return None


def certainly_wrong(gold: tuple, predicted: tuple) -> Optional[str]:
    """The reason math-verify's verify(gold, predicted) is False ("interval" or "numeric_gap"), or None when that
    is not certain without running it. `predicted` must be a plain number (Integer, Rational or Float)."""
    gold_split, predicted_split = _split(gold), _split(predicted)
    if gold_split is None or predicted_split is None:
        return None
    (gold_value, gold_text), (answer, answer_text) = gold_split, predicted_split
    if not isinstance(answer, (sympy.Rational, sympy.Float)) or gold_text.strip() == answer_text.strip():
        return None
    # A sympy Interval is never a single point (Interval(a, a) is built as {a}): it differs from {answer}, and
    # math-verify's set comparison has no other rule for an interval against one number.
    if isinstance(gold_value, sympy.Interval):
        return "interval"
    if isinstance(gold_value, sympy.Expr) and not isinstance(gold_value, (sympy.Rational, sympy.Float)):
        value = _numeric_value(gold_value)
        if value is not None and abs(value - answer) > _MIN_RELATIVE_GAP * max(1, abs(answer)):
            return "numeric_gap"
    return None
