"""Config of the rule-based reward: which reward function, how answers are extracted and scored, and the grader pool.

Why: the reward is computed by `megatron_zero.rewards.GraderPool` in worker processes; this dataclass is all those
workers need, validated at construction so a typo fails before any rollout. Defaults are the SimpleRL-Zoo recipe
(shared/reference/RECIPE.md): cut at the first end token, last \\boxed{...} with "the answer is" / last-number
fallbacks, math-verify equivalence, 1.0 correct else 0.0, 10 s per item.

How: ``RewardConfig(score_scheme="format", strict_boxed=True)`` or ``OmegaConf.structured(RewardConfig)``.
``reward_fn`` is a plain string here (config/ imports no other package of ours); the preflight checks it against
the registry in ``megatron_zero/rewards/registry.py`` (preflight/names.py, run by ``load_config``), so a user's
reward registered by name must be registered (its module imported) before the config is loaded; an import path
"package.module:function" needs no registration. The score schemes are fixed tables, defined here.
"""

import dataclasses
from typing import Optional

from megatron_zero.config.problems import raise_problems

# The outcomes a score scheme gives a value to. Timeouts and grader errors score as "wrong".
OUTCOMES = ("correct", "wrong", "no_answer")
SCORE_SCHEMES: dict[str, dict[str, float]] = {
    # The recipe's default: no format reward.
    "binary": {"correct": 1.0, "wrong": 0.0, "no_answer": 0.0},
    # The old format-aware variant: a wrong boxed answer beats no answer at all.
    "format": {"correct": 1.0, "wrong": -0.5, "no_answer": -1.0},
}

# End-of-text / end-of-turn markers of the recipe's base models (Qwen2.5, Llama-3.1, Mistral, DeepSeek-Math).
DEFAULT_STOP_TOKENS = (
    "<|endoftext|>",
    "<|im_end|>",
    "</s>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<｜end▁of▁sentence｜>",
)


@dataclasses.dataclass(kw_only=True, frozen=True)
class RewardConfig:
    # A name registered in megatron_zero.rewards.registry ("math") or an import path "package.module:function".
    # The function is called as fn(response, ground_truth, config) and returns a GradeResult or a float.
    reward_fn: str = "math"
    # Only a \boxed{...} / \fbox{...} answer counts; no "the answer is" or last-number fallback.
    strict_boxed: bool = False
    # A name in SCORE_SCHEMES: "binary" (1 / 0 / 0, the recipe's default) or
    # "format" (1 / -0.5 / -1, the old format-aware variant), or "custom" to use `score_values`.
    score_scheme: str = "binary"
    # With score_scheme="custom": the score of each outcome, keys exactly correct, wrong, no_answer.
    # Timeouts and grader errors score as "wrong".
    score_values: Optional[dict[str, float]] = None
    # The response is cut at the first of these before extraction; an answer after an end token does not count.
    stop_tokens: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_STOP_TOKENS))
    # Wall-clock limit per response; a worker over it is killed and replaced, the item scored as a timeout.
    timeout_s: float = 10.0
    # Grader worker processes; None or 0 means one per CPU this process may use (os.sched_getaffinity).
    num_workers: Optional[int] = None
    # Address space a worker may add to what it holds at start: \\boxed{2^{2^{40}}} would otherwise allocate
    # gigabytes before its timeout. Over it, sympy raises MemoryError and the item scores as wrong. None: no cap.
    max_worker_memory_mb: Optional[int] = 4096
    # The trainer stops the run when the share of timeouts + errors in one batch exceeds this.
    max_failure_rate: float = 0.05

    def __post_init__(self) -> None:
        problems: list[str] = []  # every value problem of this config, raised together
        if not self.reward_fn:
            problems.append("reward.reward_fn='' must name a reward (e.g. 'math') or an import path "
                            "'package.module:function'")
        valid_schemes = sorted([*SCORE_SCHEMES, "custom"])
        if self.score_scheme not in valid_schemes:
            problems.append(f"reward.score_scheme={self.score_scheme!r} is unknown; use one of {valid_schemes}")
        if self.score_scheme == "custom":
            if self.score_values is None or set(self.score_values) != set(OUTCOMES):
                keys = None if self.score_values is None else sorted(self.score_values)
                problems.append(
                    f"reward.score_values has keys {keys}; score_scheme='custom' needs exactly {list(OUTCOMES)}, "
                    "e.g. {'correct': 1.0, 'wrong': -0.5, 'no_answer': -1.0}"
                )
        elif self.score_values is not None:
            problems.append(
                f"reward.score_values={self.score_values!r} is set but reward.score_scheme={self.score_scheme!r}; "
                "set score_scheme='custom' to use your own values, or drop score_values"
            )
        if any(not token for token in self.stop_tokens):
            problems.append(f"reward.stop_tokens={self.stop_tokens!r} contains an empty string; remove it")
        if not self.timeout_s > 0:
            problems.append(f"reward.timeout_s={self.timeout_s} must be > 0 (recipe: 10)")
        if self.num_workers is not None and self.num_workers < 0:
            problems.append(f"reward.num_workers={self.num_workers} must be >= 0 (0 or None: one per CPU)")
        if self.max_worker_memory_mb is not None and self.max_worker_memory_mb < 512:
            problems.append(
                f"reward.max_worker_memory_mb={self.max_worker_memory_mb} is below the ~500 MB a worker needs to "
                "import sympy; use >= 512 (default 4096) or None for no cap"
            )
        if not 0 <= self.max_failure_rate <= 1:
            problems.append(f"reward.max_failure_rate={self.max_failure_rate} must be in [0, 1]")
        raise_problems(problems)

    def score_table(self) -> dict[str, float]:
        """The score of each outcome (correct, wrong, no_answer) under this config's scheme."""
        return dict(self.score_values) if self.score_scheme == "custom" else dict(SCORE_SCHEMES[self.score_scheme])
