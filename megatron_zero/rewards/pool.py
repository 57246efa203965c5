"""The grader pool: grades batches of untrusted model output, each item with a hard timeout, batches one at a time.

Why: hostile model output must never hang or crash training. `GraderPool` owns the worker processes that grade
and kill an item past `RewardConfig.timeout_s` (rewards/grader_workers.py) and lets one batch at a time use them
(rewards/grading_session.py). Timeouts and errors are counted in the returned `BatchGrades`, never silently
scored as wrong.

How::

    with GraderPool(RewardConfig()) as pool:                      # once per training run
        grades = pool.grade_batch(responses, ground_truths)       # any thread; batches are serialized
        grades.check_failure_rate(config.max_failure_rate)
        rewards = grades.scores

        with pool.session() as session:                           # or item by item, as responses arrive
            for index, response in finished_responses:            # e.g. while generation goes on
                session.submit(index, response, ground_truths[index])  # returns at once
            grades = session.finish()                             # waits for the rest
"""

import threading
from collections.abc import Sequence
from typing import Optional

from megatron_zero.config.reward import RewardConfig
from megatron_zero.rewards.grader_workers import GraderWorkers
from megatron_zero.rewards.grading_session import GradingSession
from megatron_zero.rewards.types import BatchGrades


class GraderPool:
    """Grades batches in `config.num_workers` processes, each item limited to `config.timeout_s` seconds."""

    def __init__(self, config: Optional[RewardConfig] = None) -> None:
        self.config = config or RewardConfig()
        self._workers = GraderWorkers(self.config)
        self.num_workers = self._workers.num_workers
        # Held by the open session: one batch at a time uses the workers.
        self._lock = threading.Lock()
        self._closed = False

    def __enter__(self) -> "GraderPool":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def session(self) -> GradingSession:
        """Open an incremental batch (see `GradingSession`); waits while another batch is being graded."""
        self._lock.acquire()
        try:
            if self._closed:
                raise RuntimeError("GraderPool is closed; create a new one")
            return GradingSession(self._workers, release=self._lock.release)
        except BaseException:
            self._lock.release()
            raise

    def grade_batch(self, responses: Sequence[str], ground_truths: Sequence[str]) -> BatchGrades:
        """Grade `responses[i]` against `ground_truths[i]`; one `GradeResult` per response, in order."""
        if len(responses) != len(ground_truths):
            raise ValueError(
                f"{len(responses)} responses but {len(ground_truths)} ground truths; pass one per response"
            )
        with self.session() as session:
            for index, (response, ground_truth) in enumerate(zip(responses, ground_truths)):
                session.submit(index, response, ground_truth)
            return session.finish()

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._workers.close()


def grade_batch(
    responses: Sequence[str],
    ground_truths: Sequence[str],
    config: Optional[RewardConfig] = None,
    pool: Optional[GraderPool] = None,
) -> BatchGrades:
    """Grade a batch in `pool`, or in a pool made from `config` for this call only (pay its start-up each time)."""
    if pool is not None:
        if config is not None and config != pool.config:
            raise ValueError("pass either a pool or a config: the pool grades with its own pool.config")
        return pool.grade_batch(responses, ground_truths)
    with GraderPool(config) as own_pool:
        return own_pool.grade_batch(responses, ground_truths)


def math_reward_batch(
    responses: Sequence[str],
    ground_truths: Sequence[str],
    config: Optional[RewardConfig] = None,
    pool: Optional[GraderPool] = None,
) -> list[float]:
    """Scores only; timeouts and errors are still counted and logged by the pool. Prefer `grade_batch`."""
    return grade_batch(responses, ground_truths, config, pool).scores
