"""Difficulty control: offline pass-rate filtering and online (DAPO-style) dynamic sampling.

Why: the paper's point is matching data difficulty to the base model. Offline, estimate each problem's pass rate
with n samples of the model and keep a band [low, high]. Online, a prompt whose n samples all get the same reward
has zero GRPO advantage and only dilutes the batch, so such groups are dropped and more are generated until the
batch holds the target number of groups.

Both are engine-agnostic: `estimate_pass_rates` takes a ``generate_and_grade(problems, n)`` callable and
`dynamic_sampling` a ``supply(num_groups)`` callable, so the trainer wraps whichever engine it runs.

How::

    rates = estimate_pass_rates(problems, generate_and_grade, num_samples=8)
    save_pass_rates(rates, "pass_rates.jsonl")
    kept = filter_by_pass_rate(problems, load_pass_rates("pass_rates.jsonl"), low=0.1, high=0.9)
    groups, report = dynamic_sampling(supply, num_groups=256, max_refill_rounds=3)
"""

import dataclasses
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from megatron_zero.data.problems import Problem

logger = logging.getLogger(__name__)

# (problems, n) -> for each problem, the rewards of its n samples.
GenerateAndGrade = Callable[[list[Problem], int], list[list[float]]]


@dataclasses.dataclass(frozen=True)
class PassRate:
    uid: str
    num_samples: int
    num_correct: int

    @property
    def pass_rate(self) -> float:
        return self.num_correct / self.num_samples


def estimate_pass_rates(
    problems: Sequence[Problem],
    generate_and_grade: GenerateAndGrade,
    num_samples: int,
    batch_size: int = 256,
    success_threshold: float = 1.0,
) -> dict[str, PassRate]:
    """Pass rate of each problem from `num_samples` samples; a sample is solved when its reward >= threshold."""
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples={num_samples} and batch_size={batch_size} must both be >= 1")
    rates: dict[str, PassRate] = {}
    for start in range(0, len(problems), batch_size):
        batch = list(problems[start : start + batch_size])
        rewards = generate_and_grade(batch, num_samples)
        if len(rewards) != len(batch) or any(len(group) != num_samples for group in rewards):
            raise ValueError(
                f"generate_and_grade returned {[len(group) for group in rewards]} rewards for {len(batch)} "
                f"problems; it must return {num_samples} rewards for each problem, in order"
            )
        for problem, group in zip(batch, rewards):
            num_correct = sum(reward >= success_threshold for reward in group)
            rates[problem.uid] = PassRate(problem.uid, num_samples, num_correct)
        logger.info("pass rates: %d of %d problems estimated", len(rates), len(problems))
    return rates


def save_pass_rates(rates: dict[str, PassRate], path: str | Path) -> None:
    with Path(path).open("w", encoding="utf-8") as f:
        for rate in rates.values():
            f.write(json.dumps({**dataclasses.asdict(rate), "pass_rate": rate.pass_rate}) + "\n")


def load_pass_rates(path: str | Path) -> dict[str, PassRate]:
    rates = {}
    with Path(path).open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rate = PassRate(str(row["uid"]), int(row["num_samples"]), int(row["num_correct"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                raise ValueError(
                    f"{path}:{line_number}: not a pass-rate row with uid, num_samples, num_correct ({error!r})"
                ) from error
            rates[rate.uid] = rate
    return rates


def filter_by_pass_rate(
    problems: Sequence[Problem], rates: dict[str, PassRate], low: float, high: float
) -> list[Problem]:
    """Problems whose pass rate is in [low, high]; every problem must have a rate."""
    missing = [problem.uid for problem in problems if problem.uid not in rates]
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(problems)} problems have no pass rate (first: {missing[:5]}); estimate them "
            "with estimate_pass_rates or use the table made for this dataset"
        )
    kept = [problem for problem in problems if low <= rates[problem.uid].pass_rate <= high]
    logger.info("pass-rate band [%g, %g]: kept %d of %d problems", low, high, len(kept), len(problems))
    return kept


@dataclasses.dataclass(frozen=True)
class SampleGroup:
    """All samples of one prompt: their rewards, plus whatever the trainer carries along (responses, tokens)."""

    uid: str
    rewards: tuple[float, ...]
    payload: Any = None

    @property
    def is_constant(self) -> bool:
        # Also true for a single sample: its advantage is zero too.
        return all(reward == self.rewards[0] for reward in self.rewards)


@dataclasses.dataclass(frozen=True)
class DynamicSamplingReport:
    num_rounds: int
    num_groups_seen: int
    # Groups whose rewards were all equal.
    num_groups_dropped: int
    # Non-constant groups beyond the target, left out because the batch was already full.
    num_groups_surplus: int
    num_groups_kept: int
    # Whether the batch reached the target number of groups.
    filled: bool


def dynamic_sampling(
    supply: Callable[[int], Sequence[SampleGroup]], num_groups: int, max_refill_rounds: int
) -> tuple[list[SampleGroup], DynamicSamplingReport]:
    """Collect `num_groups` non-constant groups from `supply(k)` (asked for the k groups still missing).

    After the first round at most `max_refill_rounds` more are made; a batch still short then is returned as
    is, with ``report.filled`` false and a warning.
    """
    if num_groups < 1:
        raise ValueError(f"num_groups={num_groups} must be >= 1")
    kept: list[SampleGroup] = []
    num_seen = num_dropped = num_surplus = num_rounds = 0
    while len(kept) < num_groups and num_rounds <= max_refill_rounds:
        groups = supply(num_groups - len(kept))
        num_rounds += 1
        num_seen += len(groups)
        for group in groups:
            if group.is_constant:
                num_dropped += 1
            elif len(kept) < num_groups:
                kept.append(group)
            else:
                num_surplus += 1
    report = DynamicSamplingReport(
        num_rounds=num_rounds,
        num_groups_seen=num_seen,
        num_groups_dropped=num_dropped,
        num_groups_surplus=num_surplus,
        num_groups_kept=len(kept),
        filled=len(kept) == num_groups,
    )
    if not report.filled:
        logger.warning(
            "dynamic sampling: only %d of %d groups after %d rounds (%d of %d seen had constant rewards)",
            len(kept), num_groups, num_rounds, num_dropped, num_seen,
        )
    return kept, report
