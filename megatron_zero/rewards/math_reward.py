"""The recipe's rule-based math reward: extract the final answer, check it against the ground truth with math-verify.

Why: SimpleRL-Zoo rewards only the final answer (shared/reference/RECIPE.md): cut at the first end token, take
the last \\boxed{...}, compare through math-verify, 1.0 if equal else 0.0 (other score schemes in
`RewardConfig`). math-verify handles equivalent forms: 1/2 = 0.5 = \\frac{1}{2}, 1,000 = 1000, 50\\% = 50,
sets and intervals, \\text{(B)} = B.

How: `grade_math(response, ground_truth, config)` grades one response in this process with NO time limit, so it
is what grader workers run; plain answers take fast paths (fast_parse.py, fast_verify.py) that give
math-verify's grades without its LaTeX parser or simplify (`grade_math_reference` is math-verify alone).
Untrusted model output goes through `GraderPool` (megatron_zero/rewards/pool.py), which enforces
`RewardConfig.timeout_s` by killing the worker (grader_workers.py). math-verify's own timeouts use SIGALRM, which
fails off the main thread, so they are disabled here.
"""

import functools
from collections.abc import Callable
from typing import Optional

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
from sympy import Basic, MatrixBase

from megatron_zero.config.reward import RewardConfig
from megatron_zero.rewards.extraction import extract_answer
from megatron_zero.rewards.fast_parse import fast_parse, fast_paths_apply
from megatron_zero.rewards.fast_verify import certainly_wrong
from megatron_zero.rewards.types import GradeResult, GradeStatus

# A boxed answer is matched first; plain expressions are the fallback inside the span.
_EXTRACTION = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())


@functools.lru_cache(maxsize=4096)
def _reference_parse(text: str, wrap_in_box: bool) -> tuple:
    """math-verify's parse of an answer (cached: the samples of one prompt share a ground truth and often answers).

    A bare answer such as "\\frac{1}{2}" or "1,000" is wrapped in \\boxed{} so math-verify reads all of it as one
    LaTeX expression; a free-text span ("42 apples") is first parsed as is so math-verify finds the expression in
    it.
    """
    source = f"\\boxed{{{text}}}" if wrap_in_box else text
    return tuple(parse(source, extraction_config=_EXTRACTION, parsing_timeout=None, raise_on_error=True))


@functools.lru_cache(maxsize=4096)
def _parse(text: str, wrap_in_box: bool) -> tuple:
    """The same parse as math-verify's, without its LaTeX parser for plain numbers, intervals and sets."""
    fast = fast_parse(text, wrap_in_box)
    return fast.parsed if fast is not None else _reference_parse(text, wrap_in_box)


def _reference_verify(gold: tuple, predicted: tuple) -> bool:
    return verify(list(gold), list(predicted), timeout_seconds=None)


def _verify(gold: tuple, predicted: tuple) -> bool:
    """math-verify's verdict; a wrong number against an interval or a clearly different value skips `verify`."""
    return certainly_wrong(gold, predicted) is None and _reference_verify(gold, predicted)


def _is_math(parsed: tuple) -> bool:
    return any(isinstance(item, (Basic, MatrixBase)) for item in parsed)


def _grade(response: str, ground_truth: str, config: RewardConfig, parse_answer: Callable[[str, bool], tuple],
           compare: Callable[[tuple, tuple], bool]) -> GradeResult:
    scores = config.score_table()
    answer = extract_answer(response, config.stop_tokens, strict_boxed=config.strict_boxed)
    if answer is None:
        return GradeResult(score=scores["no_answer"], status=GradeStatus.NO_ANSWER, correct=False)
    gold = parse_answer(ground_truth.strip(), True)
    predicted = parse_answer(answer.text, answer.source != "answer_is")
    if not _is_math(predicted) and answer.source == "answer_is":
        # A bare LaTeX span without $ ("\\sqrt{2}", "B") is only found when boxed.
        predicted = parse_answer(answer.text, True)
    correct = compare(gold, predicted)
    return GradeResult(
        score=scores["correct" if correct else "wrong"],
        status=GradeStatus.OK if _is_math(gold) and _is_math(predicted) else GradeStatus.UNPARSED,
        extracted=answer.text,
        source=answer.source,
        correct=correct,
    )


def grade_math(response: str, ground_truth: str, config: RewardConfig) -> GradeResult:
    """Grade one response against its ground-truth answer (no time limit: run it inside `GraderPool`)."""
    if not fast_paths_apply():  # another math-verify version than the fast paths reproduce
        return grade_math_reference(response, ground_truth, config)
    return _grade(response, ground_truth, config, _parse, _verify)


def grade_math_reference(response: str, ground_truth: str, config: RewardConfig) -> GradeResult:
    """`grade_math` with math-verify's parse and verify for every answer: the grades the fast paths must
    reproduce, and the baseline tools/bench_rewards.py measures them against."""
    return _grade(response, ground_truth, config, _reference_parse, _reference_verify)


def math_reward(response: str, ground_truth: str, config: Optional[RewardConfig] = None) -> float:
    """Score of one response, graded in this process without a time limit (trusted input, tests, notebooks)."""
    return grade_math(response, ground_truth, config or RewardConfig()).score
