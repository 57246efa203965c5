"""The recipe's rule-based math reward: extract the final answer, check it against the ground truth with math-verify.

Why: SimpleRL-Zoo rewards only the final answer (shared/reference/RECIPE.md): cut at the first end token, take
the last \\boxed{...}, compare through math-verify, 1.0 if equal else 0.0 (other score schemes in
`RewardConfig`). math-verify handles equivalent forms: 1/2 = 0.5 = \\frac{1}{2}, 1,000 = 1000, 50\\% = 50,
sets and intervals, \\text{(B)} = B.

How: `grade_math(response, ground_truth, config)` grades one response in this process with NO time limit, so it
is what grader workers run; untrusted model output goes through `GraderPool` (megatron_zero/rewards/pool.py),
which enforces `RewardConfig.timeout_s` by killing the worker. math-verify's own timeouts use SIGALRM, which
fails off the main thread, so they are disabled here.
"""

import functools
from typing import Optional

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
from sympy import Basic, MatrixBase

from megatron_zero.config.reward import RewardConfig
from megatron_zero.rewards.extraction import extract_answer
from megatron_zero.rewards.types import GradeResult, GradeStatus

# A boxed answer is matched first; plain expressions are the fallback inside the span.
_EXTRACTION = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())


@functools.lru_cache(maxsize=4096)
def _parse(text: str, wrap_in_box: bool) -> tuple:
    """math-verify parse of an answer (cached: the samples of one prompt share a ground truth and often answers).

    A bare answer such as "\\frac{1}{2}" or "1,000" is wrapped in \\boxed{} so math-verify reads all of it as one
    LaTeX expression; a free-text span ("42 apples") is first parsed as is so math-verify finds the expression in
    it.
    """
    source = f"\\boxed{{{text}}}" if wrap_in_box else text
    return tuple(parse(source, extraction_config=_EXTRACTION, parsing_timeout=None, raise_on_error=True))


def _is_math(parsed: tuple) -> bool:
    return any(isinstance(item, (Basic, MatrixBase)) for item in parsed)


def grade_math(response: str, ground_truth: str, config: RewardConfig) -> GradeResult:
    """Grade one response against its ground-truth answer (no time limit: run it inside `GraderPool`)."""
    scores = config.score_table()
    answer = extract_answer(response, config.stop_tokens, strict_boxed=config.strict_boxed)
    if answer is None:
        return GradeResult(score=scores["no_answer"], status=GradeStatus.NO_ANSWER, correct=False)
    gold = _parse(ground_truth.strip(), True)
    predicted = _parse(answer.text, answer.source != "answer_is")
    if not _is_math(predicted) and answer.source == "answer_is":
        # A bare LaTeX span without $ ("\\sqrt{2}", "B") is only found when boxed.
        predicted = _parse(answer.text, True)
    correct = verify(list(gold), list(predicted), timeout_seconds=None)
    return GradeResult(
        score=scores["correct" if correct else "wrong"],
        status=GradeStatus.OK if _is_math(gold) and _is_math(predicted) else GradeStatus.UNPARSED,
        extracted=answer.text,
        source=answer.source,
        correct=correct,
    )


def math_reward(response: str, ground_truth: str, config: Optional[RewardConfig] = None) -> float:
    """Score of one response, graded in this process without a time limit (trusted input, tests, notebooks)."""
    return grade_math(response, ground_truth, config or RewardConfig()).score
