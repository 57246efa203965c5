"""Result types of grading: one `GradeResult` per response and `BatchGrades` per batch, with status counts.

Why: a grader that times out or fails must not look like a wrong answer. Every result carries a status, and a
batch counts them, so the trainer can log the counts and stop a run whose failure rate (timeouts + errors)
passes `RewardConfig.max_failure_rate`.
"""

import collections
import dataclasses
import enum
from typing import Optional


class GradeStatus(str, enum.Enum):
    # Graded: both answers parsed by math-verify and compared.
    OK = "ok"
    # No answer could be extracted (no box in strict mode; nothing at all otherwise).
    NO_ANSWER = "no_answer"
    # An answer was extracted but math-verify could not parse it (or the ground truth) into math; the two were
    # compared as text only. Counted apart so parser gaps show up in the logs.
    UNPARSED = "unparsed"
    # The grader worker ran over RewardConfig.timeout_s and was killed.
    TIMEOUT = "timeout"
    # The reward function raised, or its worker process died.
    ERROR = "error"


FAILURE_STATUSES = (GradeStatus.TIMEOUT, GradeStatus.ERROR)


@dataclasses.dataclass(frozen=True)
class GradeResult:
    score: float
    status: GradeStatus
    # The answer text taken from the response (None when there is none or the function does not say).
    extracted: Optional[str] = None
    # Where the answer came from: "boxed", "answer_is" or "last_number"; None without an answer.
    source: Optional[str] = None
    # Whether the answer matches the ground truth; None when the reward function does not say.
    correct: Optional[bool] = None
    # Why a timeout or error happened.
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class BatchGrades:
    results: list[GradeResult]
    # Wall-clock seconds the batch took to grade.
    seconds: float

    @property
    def scores(self) -> list[float]:
        return [result.score for result in self.results]

    @property
    def counts(self) -> dict[str, int]:
        """Number of results per status, every status present (zeros included)."""
        counter = collections.Counter(result.status for result in self.results)
        return {status.value: counter.get(status, 0) for status in GradeStatus}

    @property
    def num_failures(self) -> int:
        return sum(result.status in FAILURE_STATUSES for result in self.results)

    @property
    def failure_rate(self) -> float:
        return self.num_failures / len(self.results) if self.results else 0.0

    def check_failure_rate(self, max_failure_rate: float) -> None:
        """Raise when timeouts + errors exceed `max_failure_rate` of the batch: the grader, not the policy, failed."""
        if self.failure_rate > max_failure_rate:
            examples = [r.detail for r in self.results if r.status in FAILURE_STATUSES][:3]
            raise RuntimeError(
                f"grader failure rate {self.failure_rate:.3f} > reward.max_failure_rate={max_failure_rate} "
                f"(counts {self.counts} of {len(self.results)}); first failures: {examples}. Raise "
                "reward.timeout_s or reward.max_failure_rate if the answers are legitimately slow to verify"
            )
