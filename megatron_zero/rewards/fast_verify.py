r"""Wrong answers math-verify would reject, recognised without sympy's `simplify`: a number against an interval,
or a number or numeric expression clearly away from a numeric ground truth (``5`` or ``2\sqrt{5}`` against
``2\sqrt{3}``).

Why: once parsing is fast (fast_parse.py), grading time goes to math-verify's `verify` of wrong answers, which
ends in ``simplify(gold - answer)`` (1-30 ms) before it says no. Only "wrong" is decided here, and only where
math-verify's verify 0.9 can say nothing else. For two numeric expressions it says equal through structural
equality, rounding both to 6 decimals, ``(gold - answer).evalf() == 0`` or ``simplify(gold - answer) == 0`` (all
of which need the values to agree to 1e-6: sympy's rewriting keeps values), equal normalised strings (checked
here), or special rules for sets, relations, symbols and percentages (answers that have them are left to
math-verify). Anything not certain returns None and math-verify decides.

How: ``certainly_wrong(gold_parse, answer_parse)`` with parses as `math_reward._parse` returns them.
"""

import functools
import math
from typing import Optional

import sympy

# Values this far apart (relative to the larger, at least 1e-4) differ after rounding to 6 decimals too, and by far
# more than a 15-digit Float's precision or evalf's error.
_MIN_RELATIVE_GAP = 1e-4
_EVALF_DIGITS = 30


@functools.lru_cache(maxsize=4096)
def _numeric_value(expr: sympy.Basic) -> Optional[float]:
    """The real value of a number or numeric expression without special comparison rules, None otherwise."""
    if isinstance(expr, (sympy.Rational, sympy.Float)):
        value = float(expr)
    # Percentages (x * UnevaluatedExpr(1/100)) compare as integers in math-verify (50% = 50): not by value.
    elif isinstance(expr, sympy.Expr) and expr.is_number and not expr.has(sympy.UnevaluatedExpr):
        evaluated = expr.evalf(_EVALF_DIGITS)
        value = float(evaluated) if evaluated.is_Float else math.nan
    else:
        return None
    # A float's 16 digits are far finer than the gap below; beyond its range, math-verify decides.
    return value if math.isfinite(value) else None


def _split(parsed: tuple) -> Optional[tuple[sympy.Basic, str]]:
    if len(parsed) == 2 and isinstance(parsed[0], sympy.Basic) and isinstance(parsed[1], str):
        return parsed[0], parsed[1]
    return None


def certainly_wrong(gold: tuple, predicted: tuple) -> Optional[str]:
    """The reason math-verify's verify(gold, predicted) is False ("interval" or "numeric_gap"), or None when that
    is not certain without running it."""
    gold_split, predicted_split = _split(gold), _split(predicted)
    if gold_split is None or predicted_split is None:
        return None
    (gold_value, gold_text), (answer, answer_text) = gold_split, predicted_split
    if gold_text.strip() == answer_text.strip():
        return None
    # A sympy Interval is never a single point (Interval(a, a) is built as {a}): it differs from {answer}, and
    # math-verify's set comparison has no other rule for an interval against one number.
    if isinstance(gold_value, sympy.Interval) and isinstance(answer, (sympy.Rational, sympy.Float)):
        return "interval"
    gold_number, answer_number = _numeric_value(gold_value), _numeric_value(answer)
    if gold_number is None or answer_number is None:
        return None
    if abs(gold_number - answer_number) > _MIN_RELATIVE_GAP * max(1, abs(gold_number), abs(answer_number)):
        return "numeric_gap"
    return None
