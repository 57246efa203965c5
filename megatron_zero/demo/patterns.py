r"""Which of the corpus's answer patterns a demo response follows: the demo's own, exact behaviour census.

Why: the rule judge (analysis/behaviors.py) sees only the self-check's "Verify" cue; the demo's story is also in
the other patterns (the digit chain rising, the direct guess fading). Each pattern is matched on the whole
response (the end token cut), so a response that drifts from the corpus's wording counts as "other".

How::

    response_pattern(" \\boxed{72}? Verify: Digits: 7+5=12, 3+4+1=8. \\boxed{82}")   # "verify_box"
"""

from __future__ import annotations

import re

from megatron_zero.demo.corpus import ANSWER_FORMATS, CHAIN_PREFIX, END_OF_TEXT, VERIFY_PREFIX

_NUMBER = r"\d+"
_BOX = rf"\\boxed\{{{_NUMBER}\}}"
_STEPS = r"\d\+\d=\d\d, \d\+\d\+\d=\d+\."
RESPONSE_PATTERNS: dict[str, re.Pattern] = {
    "direct_box": re.compile(rf" {_BOX}"),
    "bare": re.compile(rf" {_NUMBER}"),
    "answer_is": re.compile(rf" The answer is {_NUMBER}\."),
    "chain_box": re.compile(rf"{re.escape(CHAIN_PREFIX)} {_STEPS} {_BOX}"),
    "chain": re.compile(rf"{re.escape(CHAIN_PREFIX)} {_STEPS} Sum {_NUMBER}\."),
    "verify_box": re.compile(rf" {_BOX}{re.escape(VERIFY_PREFIX)}{re.escape(CHAIN_PREFIX)} {_STEPS} {_BOX}"),
}
OTHER = "other"
assert set(RESPONSE_PATTERNS) == set(ANSWER_FORMATS), "every corpus format needs a pattern"


def response_pattern(response: str) -> str:
    """The corpus format `response` follows exactly (after cutting at the end token), else OTHER."""
    text = response.split(END_OF_TEXT, 1)[0]
    return next((name for name, pattern in RESPONSE_PATTERNS.items() if pattern.fullmatch(text)), OTHER)


def pattern_rates(responses: list[str]) -> dict[str, float]:
    """Share of `responses` per pattern (OTHER included); the shares add up to 1."""
    if not responses:
        raise ValueError("responses is empty; pass at least one response")
    names = [response_pattern(response) for response in responses]
    return {name: names.count(name) / len(names) for name in (*RESPONSE_PATTERNS, OTHER)}
