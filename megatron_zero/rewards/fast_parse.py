r"""Plain answers (integers, decimals, fractions of integers, multiples of square roots, integer intervals and sets,
choice letters) parsed without math-verify's LaTeX parser, into exactly the value and string math-verify's `parse`
returns for them.

Why: math-verify runs every answer through an ANTLR LaTeX grammar that costs 1-25 ms (an interval ``[3, 7)``
needs full-context prediction), while comparing two parsed numbers costs microseconds. Most answers are plain
numbers, so this is where grading time goes. Nothing here decides a grade: it only replaces the parse, and
math-verify's `verify` still compares the result, so a grade can differ from math-verify's only if a parse here
differs from math-verify's. Each pattern is therefore narrow (ASCII digits, single spaces, canonical numerals where
math-verify's normalisation rewrites them) and mirrors the normalisation and conversion code of math-verify 0.9 /
latex2sympy2_extended 1.11 it replaces; tests/test_rewards.py checks every path against math-verify's own parse
on generated and hand-picked answers. Anything else returns None and goes to math-verify. With other versions
installed, `fast_paths_apply()` is False and math_reward.py sends every answer to math-verify.

How: ``fast_parse("\\dfrac{3}{4}", wrap_in_box=True)`` gives ``FastParse("fraction", (Rational(3, 4),
"\\frac{3}{4}"))``, the same tuple as ``parse("\\boxed{\\dfrac{3}{4}}")``; ``fast_parse("x+1", True)`` is None.
"""

import dataclasses
import functools
import importlib.metadata
import logging
import re
from typing import Optional

import sympy
from latex2sympy2_extended.sets import FiniteSet

logger = logging.getLogger(__name__)

# The versions whose parse (and, for fast_verify.py, verify) code the fast paths mirror, and were tested against.
VERIFIED_VERSIONS = {"math-verify": "0.9.0", "latex2sympy2_extended": "1.11.0"}
# Longer answers go to math-verify: Python refuses int() of > 4300 digits, and no real answer is near this.
_MAX_CHARS = 100
_INT = r"-?[0-9]+"
# Numerals as Python's str(int) writes them: math-verify rewrites "a/b" to \frac only for these.
_CANONICAL_INT = r"(?:-?[1-9][0-9]*|0)"
_NATURAL = r"[1-9][0-9]*"

_INTEGER = re.compile(_INT)
# latex2sympy2_extended reads text like this as one number: "1,234" as 1234, "0,5" as 0.5 ("-0,5" fails); other
# comma lists ("1,2", "1, 234") are sets.
_COMMA_NUMBER = re.compile(r"-?[0-9]{1,3}(?:,[0-9]{3})+")
_THOUSANDS = re.compile(r"-?[1-9][0-9]{0,2}(?:,[0-9]{3})+")
_DECIMAL = re.compile(r"-?[0-9]+\.[0-9]+")
_SLASH = re.compile(rf"({_CANONICAL_INT})/({_NATURAL})")
_FRAC = re.compile(rf"(-?)\\[dt]?frac\{{({_CANONICAL_INT})\}}\{{({_NATURAL})\}}")
_INTERVAL = re.compile(rf"([\[(]) ?({_INT}) ?, ?({_INT}) ?([\])])")
_SET = re.compile(rf"\\{{ ?({_INT}(?: ?, ?{_INT})*) ?\\}}")
# A bare list in a box, "\boxed{1, 2}": a set, unless it is a number with thousands separators.
_LIST = re.compile(rf"{_INT}(?: ?, ?{_INT})+")
_LIST_SEPARATOR = re.compile(r" ?, ?")
# An integer multiple of a square root, braced: "2\sqrt{3}", "-\sqrt{12}" (unbraced "\sqrt3" is rewritten).
_RADICAL = re.compile(rf"(-?)((?:{_NATURAL})?)\\sqrt\{{({_NATURAL})\}}")
# A multiple-choice letter, bare or in parentheses; I is the imaginary unit, so the letters stop before it.
_CHOICE = re.compile(r"([A-H])|\(([A-H])\)")
# Unboxed, math-verify's expression regex keeps a decimal as written when its integer part has no leading zero.
_BARE_DECIMAL = re.compile(r"-?(?:[1-9][0-9]*|0)\.[0-9]+")


@functools.cache
def fast_paths_apply() -> bool:
    """Whether the installed math-verify is the one the fast paths reproduce (warns once when not)."""
    installed = {name: importlib.metadata.version(name) for name in VERIFIED_VERSIONS}
    if installed != VERIFIED_VERSIONS:
        logger.warning("grading fast paths are off: they mirror %s but %s is installed, so every answer goes to "
                       "math-verify (slower, same grades); check them with tests/test_rewards.py and update "
                       "megatron_zero.rewards.fast_parse.VERIFIED_VERSIONS", VERIFIED_VERSIONS, installed)
    return installed == VERIFIED_VERSIONS


@dataclasses.dataclass(frozen=True)
class FastParse:
    # Which pattern matched: "integer", "thousands", "decimal", "fraction", "radical", "interval", "set" or "choice".
    path: str
    # What math-verify's parse returns: (sympy value, normalised string).
    parsed: tuple


def _integer(text: str) -> sympy.Integer:
    # latex2sympy2_extended strips leading zeros and applies a leading minus to the number: the same value.
    return sympy.Integer(int(text))


def _integers(text: str) -> list[sympy.Integer]:
    return [_integer(item) for item in _LIST_SEPARATOR.split(text)]


def _interval(text: str) -> Optional[sympy.Basic]:
    match = _INTERVAL.fullmatch(text)
    if match is None:
        return None
    left_bracket, left_text, right_text, right_bracket = match.groups()
    left, right = _integer(left_text), _integer(right_text)
    left_open, right_open = left_bracket == "(", right_bracket == ")"
    # As latex2sympy2_extended converts an interval: one that would be empty is read as a pair.
    if (left_open and right_open and right <= left) or (not left_open and not right_open and right < left):
        return sympy.Tuple(left, right)
    return sympy.Interval(left, right, left_open=left_open, right_open=right_open)


def _radical(sign: str, coefficient: str, radicand: str) -> sympy.Basic:
    # latex2sympy2_extended builds these unevaluated (\sqrt{12} stays sqrt(12)), a leading minus as a factor -1.
    root = sympy.Pow(_integer(radicand), sympy.Rational(1, 2), evaluate=False)
    factors = ([sympy.Integer(-1)] if sign else []) + ([_integer(coefficient)] if coefficient else []) + [root]
    return root if len(factors) == 1 else sympy.Mul(*factors, evaluate=False)


def _boxed(text: str) -> Optional[FastParse]:
    """The parse of ``\\boxed{text}``."""
    if _INTEGER.fullmatch(text):
        return FastParse("integer", (_integer(text), text))
    if _COMMA_NUMBER.fullmatch(text):
        if _THOUSANDS.fullmatch(text):
            return FastParse("thousands", (_integer(text.replace(",", "")), text))
        return None
    if _DECIMAL.fullmatch(text):
        if text == "0.5":  # math-verify's normalisation rewrites exactly this decimal to a fraction
            return FastParse("decimal", (sympy.Rational(1, 2), "\\frac{1}{2}"))
        return FastParse("decimal", (sympy.Float(text), text))
    match = _SLASH.fullmatch(text)
    if match:
        numerator, denominator = match.groups()
        return FastParse("fraction", (sympy.Rational(int(numerator), int(denominator)),
                                      f"\\frac{{{numerator}}}{{{denominator}}}"))
    match = _FRAC.fullmatch(text)
    if match:
        sign, numerator, denominator = match.groups()
        value = sympy.Rational(int(numerator), int(denominator))
        return FastParse("fraction", (-value if sign else value, f"{sign}\\frac{{{numerator}}}{{{denominator}}}"))
    interval = _interval(text)
    if interval is not None:
        return FastParse("interval", (interval, text))
    match = _SET.fullmatch(text) or _LIST.fullmatch(text)
    if match:
        # Written order kept: FiniteSet remembers it (math-verify reads it for tuples of answers).
        return FastParse("set", (FiniteSet(*_integers(match.group(1) if match.re is _SET else text)), text))
    match = _RADICAL.fullmatch(text)
    if match:
        return FastParse("radical", (_radical(*match.groups()), text))
    match = _CHOICE.fullmatch(text)
    if match:
        # latex2sympy2_extended lower-cases symbols and makes them real (nothing here reads as complex).
        return FastParse("choice", (sympy.Symbol((match.group(1) or match.group(2)).lower(), real=True), text))
    return None


def fast_parse(text: str, wrap_in_box: bool) -> Optional[FastParse]:
    """Math-verify's parse of answer `text` (of ``\\boxed{text}`` when `wrap_in_box`), or None where it would take
    math-verify's parser to know it. `text` is stripped, as the extraction and the ground truths are."""
    if len(text) > _MAX_CHARS:
        return None
    if wrap_in_box:
        return _boxed(text)
    # Unboxed (an "the answer is" span), math-verify finds numbers by its own expression regex, which writes
    # a numeral without leading zeros; only such numerals are taken here.
    if re.fullmatch(_CANONICAL_INT, text):
        return FastParse("integer", (_integer(text), text))
    if _BARE_DECIMAL.fullmatch(text):
        return FastParse("decimal", (sympy.Float(text), text))
    return None
