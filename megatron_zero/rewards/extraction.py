r"""Final-answer extraction from a model response, as the Qwen2.5-Math / SimpleRL-Zoo evaluation code does it.

Order: cut the response at the first end token; take the last ``\boxed{...}`` or ``\fbox{...}`` (braces
matched); otherwise, unless strict, the text after the last "the answer is" / "final answer is", then the last
number. Everything here is linear in the response length, so hostile text cannot make extraction slow.

    >>> extract_answer(r"so \boxed{\frac{1}{2}}.<|endoftext|>\boxed{3}", stop_tokens=["<|endoftext|>"])
    ExtractedAnswer(text='\\frac{1}{2}', source='boxed')
"""

import dataclasses
import re
from collections.abc import Sequence
from typing import Optional

_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# "\boxed 5" (no braces): the argument is the next token.
_BARE_BOX_ARGUMENT = re.compile(r"\s+([^\s$]+)")
_ANSWER_IS = re.compile(r"(?:the|final) answer is", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?:\s|$)|\n")
# Qwen2.5-Math's last-number fallback, applied after removing thousands separators.
_NUMBER = re.compile(r"-?\d*\.?\d+")


@dataclasses.dataclass(frozen=True)
class ExtractedAnswer:
    text: str
    # "boxed", "answer_is" or "last_number".
    source: str


def cut_at_stop_tokens(text: str, stop_tokens: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop token (all of it when none occurs)."""
    cut = len(text)
    for token in stop_tokens:
        index = text.find(token, 0, cut)
        if index != -1:
            cut = index
    return text[:cut]


def _last_match(pattern: re.Pattern, text: str) -> Optional[re.Match]:
    last = None
    for last in pattern.finditer(text):
        pass
    return last


def last_boxed(text: str) -> Optional[str]:
    """Argument of the last ``\\boxed`` / ``\\fbox`` in `text`; None when there is none or it is cut off."""
    last = _last_match(_BOX_COMMAND, text)
    return None if last is None else _box_argument(text, last)


def _box_argument(text: str, last: re.Match) -> Optional[str]:
    """The argument of the box command ``last`` matched; None when the text ends inside it."""
    start = last.end()
    while start < len(text) and text[start] == " ":
        start += 1
    if start == len(text):
        return None
    if text[start] != "{":
        bare = _BARE_BOX_ARGUMENT.match(text, last.end())
        return bare.group(1) if bare else None
    depth = 0
    for end in range(start, len(text)):
        char = text[end]
        # \{ and \} are literal braces (sets), not groups.
        if char == "{" and text[end - 1] != "\\":
            depth += 1
        elif char == "}" and text[end - 1] != "\\":
            depth -= 1
            if depth == 0:
                return text[start + 1 : end]
    # Unbalanced: the response was cut inside the box, so it has no complete boxed answer.
    return None


def _answer_is_span(text: str) -> Optional[str]:
    last = _last_match(_ANSWER_IS, text)
    if last is None:
        return None
    # The answer ends with its sentence: "The answer is 42. Let me check: 3 > 2." gives "42".
    span = _SENTENCE_END.split(text[last.end() :].strip(), 1)[0].strip()
    # Minerva style: "The final answer is $\\frac{1}{2}$. I hope it is correct."
    if span.startswith("$") and "$" in span[1:]:
        span = span[1 : span.index("$", 1)]
    return span.strip().strip("$").strip() or None


def extract_answer(text: str, stop_tokens: Sequence[str], strict_boxed: bool = False) -> Optional[ExtractedAnswer]:
    """The final answer of response `text`, or None when it has none."""
    text = cut_at_stop_tokens(text, stop_tokens)
    last = _last_match(_BOX_COMMAND, text)
    boxed = None if last is None else _box_argument(text, last)
    if boxed is not None and boxed.strip():
        return ExtractedAnswer(boxed.strip(), "boxed")
    if strict_boxed or (last is not None and boxed is None):
        # The response ends inside its last box (cut at the length limit): it was still writing its final answer,
        # so neither an earlier box nor a number inside the unfinished one is its answer. Truncation is no answer.
        return None
    span = _answer_is_span(text)
    if span is not None:
        return ExtractedAnswer(span, "answer_is")
    numbers = _NUMBER.findall(text.replace(",", ""))
    if numbers:
        return ExtractedAnswer(numbers[-1], "last_number")
    return None
