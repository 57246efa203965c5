"""Rule-based rewards: answer extraction, the math-verify reward, the reward registry and the grader pool.

Public entry points: `GraderPool` / `grade_batch` (untrusted output, per-item timeout; `GraderPool.session()`
gives a `GradingSession` that grades responses as they arrive), `math_reward` /
`grade_math` (one response, in-process), `register_reward` / `get_reward_fn`. Benchmark:
``python tools/bench_rewards.py --help``.
"""

from megatron_zero.rewards.extraction import ExtractedAnswer, cut_at_stop_tokens, extract_answer, last_boxed
from megatron_zero.rewards.math_reward import grade_math, math_reward
from megatron_zero.rewards.grading_session import GradingSession
from megatron_zero.rewards.pool import GraderPool, grade_batch, math_reward_batch
from megatron_zero.config.reward import OUTCOMES, SCORE_SCHEMES
from megatron_zero.rewards.registry import (
    REWARD_FUNCTIONS,
    RewardFn,
    call_reward,
    get_reward_fn,
    register_reward,
)
from megatron_zero.rewards.types import BatchGrades, GradeResult, GradeStatus

__all__ = [
    "OUTCOMES",
    "REWARD_FUNCTIONS",
    "SCORE_SCHEMES",
    "BatchGrades",
    "ExtractedAnswer",
    "GradeResult",
    "GradeStatus",
    "GraderPool",
    "GradingSession",
    "RewardFn",
    "call_reward",
    "cut_at_stop_tokens",
    "extract_answer",
    "get_reward_fn",
    "grade_batch",
    "grade_math",
    "last_boxed",
    "math_reward",
    "math_reward_batch",
    "register_reward",
]
