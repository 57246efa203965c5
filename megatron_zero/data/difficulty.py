"""Difficulty control: offline pass-rate filtering and online (DAPO-style) dynamic sampling.

Why: the paper's point is matching data difficulty to the base model. Offline, estimate each problem's pass rate
with n samples of the model and keep a band [low, high]. Online, a prompt whose n samples all get the same reward
has zero GRPO advantage and only dilutes the batch, so such groups are dropped and more are generated until the
batch holds the target number of groups.

Both are engine-agnostic: `estimate_pass_rates` takes a ``generate_and_grade(problems, n)`` callable and
`dynamic_sampling` a ``supply(num_groups)`` callable, so the trainer wraps whichever engine it runs
(``megatron-zero difficulty`` wraps the eval engines: megatron_zero/evaluation/difficulty.py).

A table row carries each problem's fingerprint (its question and ground truth, hashed), so a table made for other
data - or for the same file after its rows moved, when uids are "<file stem>-<row>" - is refused rather than
applied to the wrong problems.

How::

    rates = estimate_pass_rates(problems, generate_and_grade, num_samples=8)
    save_pass_rates(rates, "pass_rates.jsonl")
    kept = filter_by_pass_rate(problems, load_pass_rates("pass_rates.jsonl"), low=0.1, high=0.9)
    kept, report = apply_pass_rate_filter(problems, config.data.pass_rate_filter)  # what the trainer calls
    groups, report = dynamic_sampling(supply, num_groups=256, max_refill_rounds=3)
"""

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

from megatron_zero.config.data import PassRateFilterConfig
from megatron_zero.data.problems import Problem
from megatron_zero.utils.files import atomic_write_text

logger = logging.getLogger(__name__)

# (problems, n) -> for each problem, the rewards of its n samples.
GenerateAndGrade = Callable[[list[Problem], int], list[list[float]]]


# How many offending uids an error shows.
_NUM_EXAMPLES = 5


def problem_fingerprint(problem: Problem) -> str:
    """A short hash of what makes a problem itself (question and ground truth; not the template)."""
    text = f"{problem.question}\x00{problem.ground_truth}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class PassRate:
    uid: str
    num_samples: int
    num_correct: int
    # problem_fingerprint of the problem the rate was estimated on.
    fingerprint: str

    @property
    def pass_rate(self) -> float:
        return self.num_correct / self.num_samples


def estimate_pass_rates(
    problems: Sequence[Problem],
    generate_and_grade: GenerateAndGrade,
    num_samples: int,
    batch_size: int = 256,
    success_threshold: float = 1.0,
    *,
    done: Sequence[list[PassRate]] = (),
    on_batch: Optional[Callable[[list[PassRate]], None]] = None,
) -> dict[str, PassRate]:
    """Pass rate of each problem from `num_samples` samples; a sample is solved when its reward >= threshold.

    ``done``: the rates of the first batches, from an interrupted run (utils/progress.py); those batches are not
    sampled again. ``on_batch`` gets each newly estimated batch's rates."""
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples={num_samples} and batch_size={batch_size} must both be >= 1")
    rates: dict[str, PassRate] = {}
    for index, batch_rates in enumerate(done):
        expected = [problem.uid for problem in problems[index * batch_size:(index + 1) * batch_size]]
        if [rate.uid for rate in batch_rates] != expected:
            raise ValueError(f"finished batch {index} holds rates of {[rate.uid for rate in batch_rates][:3]}..., not "
                             f"of this batch's problems {expected[:3]}...")
        rates.update((rate.uid, rate) for rate in batch_rates)
    for start in range(len(done) * batch_size, len(problems), batch_size):
        batch = list(problems[start : start + batch_size])
        rewards = generate_and_grade(batch, num_samples)
        if len(rewards) != len(batch) or any(len(group) != num_samples for group in rewards):
            raise ValueError(
                f"generate_and_grade returned {[len(group) for group in rewards]} rewards for {len(batch)} "
                f"problems; it must return {num_samples} rewards for each problem, in order"
            )
        batch_rates = [PassRate(problem.uid, num_samples, sum(reward >= success_threshold for reward in group),
                                problem_fingerprint(problem)) for problem, group in zip(batch, rewards)]
        rates.update((rate.uid, rate) for rate in batch_rates)
        if on_batch is not None:
            on_batch(batch_rates)
        logger.info("pass rates: %d of %d problems estimated", len(rates), len(problems))
    return rates


def save_pass_rates(rates: dict[str, PassRate], path: str | Path) -> None:
    """Written under a temporary name and renamed: an interrupted write leaves the previous table, not half of one
    (data.pass_rate_filter would refuse or misread it)."""
    atomic_write_text(path, "".join(json.dumps({**dataclasses.asdict(rate), "pass_rate": rate.pass_rate}) + "\n"
                                    for rate in rates.values()))


def load_pass_rates(path: str | Path) -> dict[str, PassRate]:
    rates = {}
    with Path(path).open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rate = PassRate(str(row["uid"]), int(row["num_samples"]), int(row["num_correct"]),
                                str(row["fingerprint"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                raise ValueError(f"{path}:{line_number}: not a pass-rate row with uid, num_samples, num_correct, "
                                 f"fingerprint ({error!r}); write tables with `megatron-zero difficulty`") from None
            if not 0 <= rate.num_correct <= rate.num_samples or rate.num_samples < 1:
                raise ValueError(f"{path}:{line_number}: num_correct={rate.num_correct} of num_samples="
                                 f"{rate.num_samples} is not a pass rate")
            if rate.uid in rates:
                raise ValueError(f"{path}:{line_number}: uid {rate.uid!r} appears twice; one row per problem")
            rates[rate.uid] = rate
    if not rates:
        raise ValueError(f"{path} holds no pass-rate rows")
    return rates


def check_pass_rate_table(problems: Sequence[Problem], rates: dict[str, PassRate], origin: str = "the table") -> None:
    """Raise, in one line, unless every problem has a rate estimated on that same problem (uid and fingerprint)."""
    missing = [problem for problem in problems if problem.uid not in rates]
    if missing:
        # The same problems under other ids: the table was written with another uid field (the usual slip).
        by_content = {rate.fingerprint: rate.uid for rate in rates.values()}
        found = [by_content[problem_fingerprint(problem)] for problem in missing
                 if problem_fingerprint(problem) in by_content]
        hint = (f"; the table holds {len(found)} of them under other ids (e.g. {found[0]!r} for {missing[0].uid!r}): "
                "it was written with another uid field, so read the data with the one `megatron-zero difficulty "
                "--uid-field` used (data.train.uid_field; unset: <file stem>-<row>)") if found else (
                "; estimate them for this data with `megatron-zero difficulty` (same file and --uid-field as "
                "data.train.uid_field) or use the table made for this dataset")
        raise ValueError(f"{origin}: {len(missing)} of {len(problems)} problems have no pass rate (first: "
                         f"{[problem.uid for problem in missing[:_NUM_EXAMPLES]]}){hint}")
    changed = [problem.uid for problem in problems if rates[problem.uid].fingerprint != problem_fingerprint(problem)]
    if changed:
        raise ValueError(
            f"{origin}: {len(changed)} of {len(problems)} problems differ from the ones their rows were estimated "
            f"on (question or answer changed, or rows moved; first: {changed[:_NUM_EXAMPLES]}); the table was made "
            "for other data: re-estimate it with `megatron-zero difficulty`, or give the data stable uids "
            "(data.train.uid_field)"
        )


def filter_by_pass_rate(
    problems: Sequence[Problem], rates: dict[str, PassRate], low: float, high: float, origin: str = "the table"
) -> list[Problem]:
    """Problems whose pass rate is in [low, high]; every problem must have a rate (`check_pass_rate_table`)."""
    check_pass_rate_table(problems, rates, origin)
    kept = [problem for problem in problems if low <= rates[problem.uid].pass_rate <= high]
    logger.info("pass-rate band [%g, %g]: kept %d of %d problems", low, high, len(kept), len(problems))
    return kept


@dataclasses.dataclass(frozen=True)
class PassRateFilterReport:
    """What ``data.pass_rate_filter`` did; the trainer logs it and writes it to the run's summary."""

    pass_rate_file: str
    min_pass_rate: float
    max_pass_rate: float
    num_kept: int
    # Dropped below the band (too hard for the model) and above it (already solved).
    num_dropped_hard: int
    num_dropped_easy: int

    @property
    def num_dropped(self) -> int:
        return self.num_dropped_hard + self.num_dropped_easy


def apply_pass_rate_filter(
    problems: Sequence[Problem], config: PassRateFilterConfig
) -> tuple[list[Problem], Optional[PassRateFilterReport]]:
    """``problems`` in ``config``'s band, with the report; unchanged (report None) when no table is set."""
    if config.pass_rate_file is None:
        return list(problems), None
    field = f"data.pass_rate_filter.pass_rate_file={config.pass_rate_file!r}"
    if not Path(config.pass_rate_file).is_file():
        raise FileNotFoundError(f"{field} does not exist; write it with `megatron-zero difficulty`")
    rates = load_pass_rates(config.pass_rate_file)
    low, high = config.min_pass_rate, config.max_pass_rate
    kept = filter_by_pass_rate(problems, rates, low, high, origin=field)
    report = PassRateFilterReport(
        pass_rate_file=config.pass_rate_file,
        min_pass_rate=low,
        max_pass_rate=high,
        num_kept=len(kept),
        num_dropped_hard=sum(rates[problem.uid].pass_rate < low for problem in problems),
        num_dropped_easy=sum(rates[problem.uid].pass_rate > high for problem in problems),
    )
    if not kept:
        raise ValueError(
            f"data.pass_rate_filter band [{low:g}, {high:g}] keeps none of the {len(problems)} problems "
            f"({report.num_dropped_hard} below it, {report.num_dropped_easy} above it); widen the band "
            "(min_pass_rate / max_pass_rate) or use data that suits the model"
        )
    logger.info("pass-rate filter %s: dropped %d problems (%d below the band, %d above it)", config.pass_rate_file,
                report.num_dropped, report.num_dropped_hard, report.num_dropped_easy)
    return kept, report


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
