"""One batch graded incrementally: `GradingSession` hands responses to the grader workers as they arrive.

Why: the trainer grades while the engine still generates, so a batch cannot wait until every response is in.
The caller's `submit` returns at once; a dispatcher thread gives each item to an idle worker, refills a worker
the moment it answers and has overdue workers killed (rewards/grader_workers.py), so grading overlaps the
caller's own work. `finish` returns the `BatchGrades`, failures counted by status.

How: open one with `GraderPool.session()` (rewards/pool.py), which serializes batches::

    with pool.session() as session:
        for index, response in finished_responses:
            session.submit(index, response, ground_truths[index])   # returns at once
        grades = session.finish()                                   # waits for the rest
"""

import logging
import multiprocessing
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Optional

from megatron_zero.rewards.grader_workers import STARTUP_TIMEOUT_S, GraderWorkers
from megatron_zero.rewards.types import BatchGrades, GradeResult

logger = logging.getLogger(__name__)


class _PendingByAnswer:
    """Pending task ids grouped by ground truth, so a worker keeps grading one prompt's samples.

    Workers cache parsed answers; the samples of a prompt share its ground truth and often their answers, so
    sending them to the same worker parses each once instead of once per worker.
    """

    def __init__(self) -> None:
        self._by_truth: dict[str, deque[int]] = {}
        self._truth_order: deque[str] = deque()  # ground truths in order of arrival, each with a queue
        self._num_left = 0

    def __bool__(self) -> bool:
        return self._num_left > 0

    def add(self, task_id: int, ground_truth: str) -> None:
        if ground_truth not in self._by_truth:
            self._by_truth[ground_truth] = deque()
            self._truth_order.append(ground_truth)
        self._by_truth[ground_truth].append(task_id)
        self._num_left += 1

    def pop(self, preferred_truth: Optional[str]) -> int:
        """A task of `preferred_truth` if any is left, else one of the earliest ground truth with tasks left."""
        queue = self._by_truth.get(preferred_truth)
        if not queue:
            while not self._by_truth[self._truth_order[0]]:
                # Dropped from both, so a later `add` of this ground truth queues it again.
                del self._by_truth[self._truth_order.popleft()]
            queue = self._by_truth[self._truth_order[0]]
        self._num_left -= 1
        return queue.popleft()


class GradingSession:
    """One batch graded incrementally: `submit` each response as it arrives, then `finish` for the grades.

    Opened by `GraderPool.session()`, which it holds (batches are serialized) until `finish` or `abort` calls
    `release`; use it as a context manager so an exception aborts it. A dispatcher thread hands a submitted item
    to an idle worker at once, refills a worker the moment it answers and kills a worker at its deadline, so
    grading runs while the caller does other work (the trainer: generation). Timeouts, errors and crashes are
    counted as in `GraderPool.grade_batch`.
    """

    def __init__(self, workers: GraderWorkers, release: Callable[[], None]) -> None:
        self._workers = workers
        self._release = release
        self._first_submit: Optional[float] = None
        self._last_result: Optional[float] = None
        self._results: dict[int, GradeResult] = {}
        self._submitted: set[int] = set()
        # Shared with the dispatcher thread, under `_state_lock`.
        self._state_lock = threading.Lock()
        self._inbox: list[tuple[int, str, str]] = []
        self._closing = False  # finish() was called: grade what is left, then stop
        self._aborting = False
        self._wake_pending = False
        self._error: Optional[BaseException] = None
        self._done = False  # finished or aborted: the pool is released
        # Wakes the dispatcher from `wait` on the workers' pipes when an item arrives or the caller finishes.
        self._wake_reader, self._wake_writer = multiprocessing.Pipe(duplex=False)
        self._thread = threading.Thread(target=self._dispatch, name="grader-dispatch", daemon=True)
        self._thread.start()

    def __enter__(self) -> "GradingSession":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.abort()

    def submit(self, index: int, response: str, ground_truth: str) -> None:
        """Queue `response` as item `index` (0, 1, ... in any order, each once); returns without waiting.
        Call it from one thread (the one that opened the session)."""
        if self._error is not None:
            raise RuntimeError(f"grading failed: {self._error}") from self._error
        if self._closing or self._done:
            raise RuntimeError("this grading session is finished; open a new one with pool.session()")
        if not isinstance(index, int) or index < 0 or index in self._submitted:
            raise ValueError(f"grading index {index!r} is negative, not an int or already submitted; "
                             "submit each of 0, 1, ..., n-1 once")
        self._submitted.add(index)
        if self._first_submit is None:
            self._first_submit = time.monotonic()
        with self._state_lock:
            self._inbox.append((index, str(response), str(ground_truth)))
        self._wake()

    def finish(self) -> BatchGrades:
        """Wait for every submitted item; one `GradeResult` per index 0..n-1, in index order."""
        if self._done or self._closing:
            raise RuntimeError("this grading session is already finished")
        with self._state_lock:
            self._closing = True
        self._wake()
        self._stop()
        if self._error is not None:
            raise RuntimeError(f"grading failed: {self._error}") from self._error
        missing = sorted(set(range(len(self._submitted))) - self._submitted)
        if missing:
            raise ValueError(f"grading indices {missing[:10]} were never submitted; submit each of 0, 1, ..., "
                             f"n-1 once (got {len(self._submitted)} items up to {max(self._submitted)})")
        results = [self._results[index] for index in range(len(self._submitted))]
        # The grading span: from the first item to the last grade (the caller's time around them is not ours).
        seconds = self._last_result - self._first_submit if self._first_submit is not None else 0.0
        grades = BatchGrades(results=results, seconds=seconds)
        if grades.num_failures:
            logger.warning("grader: %d of %d items failed: %s", grades.num_failures, len(results), grades.counts)
        return grades

    def abort(self) -> None:
        """Drop what is left (workers still grading are killed and replaced) and release the pool (idempotent)."""
        if self._done:
            return
        with self._state_lock:
            self._aborting = True
        self._wake()
        self._stop()

    def _wake(self) -> None:
        # At most one wake-up message in the pipe, so a burst of submits never fills it and blocks; sent under the
        # lock, so the dispatcher that sees `_wake_pending` finds the message there.
        with self._state_lock:
            if not self._wake_pending:
                self._wake_pending = True
                self._wake_writer.send_bytes(b"")

    def _stop(self) -> None:
        self._thread.join()
        self._wake_reader.close()
        self._wake_writer.close()
        self._done = True
        self._release()

    def _dispatch(self) -> None:
        """The dispatcher thread: the only code touching the pool's workers while the session is open."""
        workers = self._workers
        pending = _PendingByAnswer()
        items: dict[int, tuple[str, str]] = {}
        starving_since: Optional[float] = None  # when items began to wait with no worker started
        num_results = 0
        try:
            while True:
                with self._state_lock:
                    inbox, self._inbox = self._inbox, []
                    closing, aborting = self._closing, self._aborting
                    if self._wake_pending:
                        self._wake_reader.recv_bytes()
                        self._wake_pending = False
                if aborting:
                    break
                for index, response, ground_truth in inbox:
                    items[index] = (response, ground_truth)
                    pending.add(index, ground_truth)
                for worker in workers.idle():
                    if not pending:
                        break
                    task_id = pending.pop(worker.last_ground_truth)
                    workers.send(worker, task_id, *items.pop(task_id), self._results)
                now = time.monotonic()
                if len(self._results) > num_results:  # from the last wait, or a failed send just now
                    num_results, self._last_result = len(self._results), now
                deadline = workers.next_deadline()
                if closing and not pending and deadline is None:
                    break
                timeout: Optional[float] = None  # nothing to do until an item arrives
                starving_since = None if deadline is not None or not pending else (starving_since or now)
                if deadline is not None:
                    timeout = max(0.0, deadline - now)
                elif starving_since is not None:  # every worker is a replacement still starting
                    timeout = starving_since + STARTUP_TIMEOUT_S - now
                    if timeout <= 0:
                        raise RuntimeError(
                            f"replacement grader workers did not start within {STARTUP_TIMEOUT_S:.0f} s"
                        )
                workers.receive(self._results, timeout, self._wake_reader)
                workers.kill_overdue(self._results)
        except BaseException as error:  # surfaces in the caller's next submit/finish
            self._error = error
        finally:
            if self._aborting or self._error is not None:
                # A worker still on an item of this session would answer into the next one: start afresh.
                workers.restart_busy()
