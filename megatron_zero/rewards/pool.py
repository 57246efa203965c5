"""A pool of grader processes with a hard per-item timeout: hostile model output never hangs or crashes training.

Why: math-verify hands answers to sympy, and ``\\boxed{9^{9^{9^{9}}}}`` or a few thousand nested braces keep
sympy busy for minutes. ``concurrent.futures.ProcessPoolExecutor`` cannot stop a busy worker, so this pool owns
its processes: each worker grades one item at a time, and a worker past its deadline is killed and replaced while
the others go on. Timeouts and errors are counted in the returned `BatchGrades`, never silently scored as wrong.

How::

    with GraderPool(RewardConfig()) as pool:                      # once per training run
        grades = pool.grade_batch(responses, ground_truths)       # any thread; batches are serialized
        grades.check_failure_rate(config.max_failure_rate)
        rewards = grades.scores

Workers come from the "forkserver" start method (fork is unsafe once torch or Ray threads run): the fork server
imports this module once, so starting or replacing a worker costs a fork plus a small math-verify warm-up.
"""

import dataclasses
import logging
import multiprocessing
import os
import pickle
import resource
import signal
import threading
import time
from collections import deque
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait
from typing import Optional

from megatron_zero.config.reward import RewardConfig
from megatron_zero.rewards.math_reward import grade_math
from megatron_zero.rewards.registry import RewardFn, call_reward, get_reward_fn
from megatron_zero.rewards.types import BatchGrades, GradeResult, GradeStatus

logger = logging.getLogger(__name__)

_READY = "ready"
# A worker must import and warm up within this; far above the ~1 s it takes, so only a broken setup trips it.
_STARTUP_TIMEOUT_S = 120.0
# A worker asked to exit gets this long before it is killed.
_SHUTDOWN_GRACE_S = 2.0


def _failure(config: RewardConfig, status: GradeStatus, detail: str) -> GradeResult:
    return GradeResult(score=config.score_table()["wrong"], status=status, detail=detail)


def _worker_main(conn: Connection, reward_fn: RewardFn, config: RewardConfig) -> None:
    # Ctrl-C belongs to the trainer, which then closes the pool; a worker dying on SIGINT would look like a crash.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if config.max_worker_memory_mb is not None:
        limit = config.max_worker_memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    # math-verify warns that its own (SIGALRM) timeout is off; this pool enforces the limit instead.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    # The first math-verify call compiles its regexes and LaTeX parser; pay that before the first deadline.
    grade_math("\\boxed{1}", "1", config)
    conn.send(_READY)
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the pool's process is gone
            return
        if message is None:
            return
        task_id, response, ground_truth = message
        try:
            result = call_reward(reward_fn, response, ground_truth, config)
        except Exception as error:  # the reward function's bug or a sympy failure: counted, not fatal
            result = _failure(config, GradeStatus.ERROR, f"{type(error).__name__}: {str(error)[:500]}")
        conn.send((task_id, result))


@dataclasses.dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: Connection
    ready: bool = False
    task_id: Optional[int] = None
    deadline: float = 0.0
    last_ground_truth: Optional[str] = None


class _PendingByAnswer:
    """Pending task ids grouped by ground truth, so a worker keeps grading one prompt's samples.

    Workers cache parsed answers; the samples of a prompt share its ground truth and often their answers, so
    sending them to the same worker parses each once instead of once per worker.
    """

    def __init__(self, ground_truths: Sequence[str]) -> None:
        self._by_truth: dict[str, deque[int]] = {}
        for task_id, truth in enumerate(ground_truths):
            self._by_truth.setdefault(truth, deque()).append(task_id)
        self._truth_order = deque(self._by_truth)
        self._num_left = len(ground_truths)

    def __bool__(self) -> bool:
        return self._num_left > 0

    def pop(self, preferred_truth: Optional[str]) -> int:
        """A task of `preferred_truth` if any is left, else one of the earliest ground truth with tasks left."""
        queue = self._by_truth.get(preferred_truth)
        if not queue:
            while not self._by_truth[self._truth_order[0]]:
                self._truth_order.popleft()
            queue = self._by_truth[self._truth_order[0]]
        self._num_left -= 1
        return queue.popleft()


class GraderPool:
    """Grades batches in `config.num_workers` processes, each item limited to `config.timeout_s` seconds."""

    def __init__(self, config: Optional[RewardConfig] = None) -> None:
        self.config = config or RewardConfig()
        self._reward_fn = get_reward_fn(self.config.reward_fn)
        module = getattr(self._reward_fn, "__module__", None)
        if module == "__main__" or "<" in getattr(self._reward_fn, "__qualname__", "<"):
            raise ValueError(
                f"reward.reward_fn={self.config.reward_fn!r} resolves to {self._reward_fn!r}, which grader processes "
                "cannot import; define it at module level in an importable module (not __main__, not a lambda)"
            )
        pickle.dumps(self._reward_fn)  # fails here, with pickle's message, rather than inside a worker
        # The CPUs this process may run on (a container's share, not the host's count).
        self.num_workers = self.config.num_workers or len(os.sched_getaffinity(0))
        self._context = multiprocessing.get_context("forkserver")
        # Only takes effect if this process has not started its fork server yet; workers import what is missing.
        self._context.set_forkserver_preload([__name__, module])
        self._lock = threading.Lock()
        self._closed = False
        started = time.monotonic()
        self._workers = [self._start_worker() for _ in range(self.num_workers)]
        while not all(worker.ready for worker in self._workers):
            waited = time.monotonic() - started
            if waited > _STARTUP_TIMEOUT_S:
                raise RuntimeError(f"grader workers did not start within {waited:.0f} s; is the machine overloaded?")
            self._receive(self._workers, [], timeout=_STARTUP_TIMEOUT_S - waited)
        logger.info("grader pool: %d workers ready in %.2f s", self.num_workers, time.monotonic() - started)

    def __enter__(self) -> "GraderPool":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _start_worker(self) -> _Worker:
        parent_conn, child_conn = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_worker_main, args=(child_conn, self._reward_fn, self.config), name="grader", daemon=True
        )
        process.start()
        child_conn.close()
        return _Worker(process=process, conn=parent_conn)

    def _replace(self, worker: _Worker) -> None:
        worker.process.kill()
        worker.process.join()
        worker.conn.close()
        self._workers[self._workers.index(worker)] = self._start_worker()

    def _receive(self, workers: list[_Worker], results: list[Optional[GradeResult]], timeout: float) -> None:
        """Wait up to `timeout` s for messages from `workers`; store results, mark workers ready, replace dead ones."""
        by_conn = {worker.conn: worker for worker in workers}
        for conn in wait(list(by_conn), timeout=timeout):
            worker = by_conn[conn]
            try:
                message = conn.recv()
            except (EOFError, OSError):
                worker.process.join()
                if not worker.ready:
                    raise RuntimeError(
                        f"a grader worker exited with code {worker.process.exitcode} while starting; its traceback "
                        "is on stderr (workers re-import the main module: a script run from stdin cannot work)"
                    ) from None
                if worker.task_id is not None:
                    results[worker.task_id] = _failure(
                        self.config, GradeStatus.ERROR, f"grader process died (exit code {worker.process.exitcode})"
                    )
                self._replace(worker)
                continue
            if message == _READY:
                worker.ready = True
                continue
            task_id, result = message
            assert task_id == worker.task_id, (task_id, worker.task_id)
            results[task_id] = result
            worker.task_id = None

    def grade_batch(self, responses: Sequence[str], ground_truths: Sequence[str]) -> BatchGrades:
        """Grade `responses[i]` against `ground_truths[i]`; one `GradeResult` per response, in order."""
        if len(responses) != len(ground_truths):
            raise ValueError(
                f"{len(responses)} responses but {len(ground_truths)} ground truths; pass one per response"
            )
        started = time.monotonic()
        results: list[Optional[GradeResult]] = [None] * len(responses)
        with self._lock:
            if self._closed:
                raise RuntimeError("GraderPool is closed; create a new one")
            pending = _PendingByAnswer(ground_truths)
            while pending or any(worker.task_id is not None for worker in self._workers):
                for worker in self._workers:
                    if pending and worker.ready and worker.task_id is None:
                        task_id = pending.pop(worker.last_ground_truth)
                        worker.last_ground_truth = ground_truths[task_id]
                        try:
                            worker.conn.send((task_id, str(responses[task_id]), str(ground_truths[task_id])))
                        except OSError:  # died since its last message; the replacement takes the next task
                            results[task_id] = _failure(self.config, GradeStatus.ERROR, "grader process died")
                            self._replace(worker)
                            continue
                        worker.task_id = task_id
                        worker.deadline = time.monotonic() + self.config.timeout_s
                deadlines = [worker.deadline for worker in self._workers if worker.task_id is not None]
                if deadlines:
                    self._receive(list(self._workers), results, max(0.0, min(deadlines) - time.monotonic()))
                else:  # every worker is a replacement still starting
                    self._receive(list(self._workers), results, _STARTUP_TIMEOUT_S)
                    if not any(worker.ready for worker in self._workers):
                        raise RuntimeError(
                            f"replacement grader workers did not start within {_STARTUP_TIMEOUT_S:.0f} s"
                        )
                now = time.monotonic()
                for worker in list(self._workers):
                    if worker.task_id is not None and worker.deadline <= now:
                        results[worker.task_id] = _failure(
                            self.config, GradeStatus.TIMEOUT, f"grading took over {self.config.timeout_s} s; killed"
                        )
                        self._replace(worker)
        grades = BatchGrades(results=results, seconds=time.monotonic() - started)
        if grades.num_failures:
            logger.warning("grader: %d of %d items failed: %s", grades.num_failures, len(results), grades.counts)
        return grades

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for worker in self._workers:
                try:
                    worker.conn.send(None)
                except OSError:  # already dead
                    pass
            for worker in self._workers:
                worker.process.join(_SHUTDOWN_GRACE_S)
                if worker.process.is_alive():
                    worker.process.kill()
                    worker.process.join()
                worker.conn.close()


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
