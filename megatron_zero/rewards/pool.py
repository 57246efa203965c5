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

        with pool.session() as session:                           # or item by item, as responses arrive
            for index, response in finished_responses:            # e.g. while generation goes on
                session.submit(index, response, ground_truths[index])  # returns at once
            grades = session.finish()                             # waits for the rest

Workers come from the "forkserver" start method (fork is unsafe once torch or Ray threads run): the fork server
imports this module once, so starting or replacing a worker costs a fork plus a small math-verify warm-up. They
start without the caller's main module, so the pool works from a script without a ``__main__`` guard, from
``python -`` and from notebooks, wherever ``math_verify.verify`` does.
"""

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import pickle
import resource
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import MutableMapping, Sequence
from multiprocessing.connection import Connection, wait
from typing import Optional

from megatron_zero.config.reward import RewardConfig
from megatron_zero.rewards.math_reward import grade_math_reference
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
    # The first math-verify call compiles its regexes and LaTeX parser; pay that before the first deadline (through
    # the reference grader: grade_math's fast paths would answer this without math-verify's parser).
    grade_math_reference("\\boxed{1}", "1", config)
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

    Opened by `GraderPool.session()`, which it holds (batches are serialized) until `finish` or `abort`; use it as
    a context manager so an exception aborts it. A dispatcher thread hands a submitted item to an idle worker at
    once, refills a worker the moment it answers and kills a worker at its deadline, so grading runs while the
    caller does other work (the trainer: generation). Timeouts, errors and crashes are counted as in `grade_batch`.
    """

    def __init__(self, pool: "GraderPool") -> None:
        self._pool = pool
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
        self._pool._lock.release()

    def _dispatch(self) -> None:
        """The dispatcher thread: the only code touching the pool's workers while the session is open."""
        pool, config = self._pool, self._pool.config
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
                for worker in list(pool._workers):
                    if pending and worker.ready and worker.task_id is None:
                        task_id = pending.pop(worker.last_ground_truth)
                        pool._send(worker, task_id, *items.pop(task_id), self._results)
                now = time.monotonic()
                if len(self._results) > num_results:  # from the last wait, or a failed send just now
                    num_results, self._last_result = len(self._results), now
                deadlines = [worker.deadline for worker in pool._workers if worker.task_id is not None]
                if closing and not pending and not deadlines:
                    break
                timeout: Optional[float] = None  # nothing to do until an item arrives
                starving_since = None if deadlines or not pending else (starving_since or now)
                if deadlines:
                    timeout = max(0.0, min(deadlines) - now)
                elif starving_since is not None:  # every worker is a replacement still starting
                    timeout = starving_since + _STARTUP_TIMEOUT_S - now
                    if timeout <= 0:
                        raise RuntimeError(
                            f"replacement grader workers did not start within {_STARTUP_TIMEOUT_S:.0f} s"
                        )
                pool._receive(self._results, timeout, self._wake_reader)
                now = time.monotonic()
                for worker in list(pool._workers):
                    if worker.task_id is not None and worker.deadline <= now:
                        self._results[worker.task_id] = _failure(
                            config, GradeStatus.TIMEOUT, f"grading took over {config.timeout_s} s; killed"
                        )
                        pool._replace(worker)
        except BaseException as error:  # surfaces in the caller's next submit/finish
            self._error = error
        finally:
            if self._aborting or self._error is not None:
                # A worker still on an item of this session would answer into the next one: start afresh.
                for worker in list(pool._workers):
                    if worker.task_id is not None:
                        pool._replace(worker)


_MAIN_MODULE_LOCK = threading.Lock()
_MISSING = object()


@contextlib.contextmanager
def _main_module_hidden():
    """Start processes without the caller's main module: multiprocessing re-imports ``__main__`` in every new
    process (forkserver and spawn alike), which re-runs a script without an ``if __name__ == "__main__"`` guard
    (and starts another pool from inside the worker) and fails outright for ``python -`` or a notebook. Graders
    never need it (reward functions in ``__main__`` are refused), so while a worker starts ``__main__`` shows
    neither the spec nor the file that multiprocessing's preparation data is read from."""
    main = sys.modules["__main__"]
    with _MAIN_MODULE_LOCK:
        saved_spec, saved_file = getattr(main, "__spec__", None), main.__dict__.pop("__file__", _MISSING)
        main.__spec__ = None
        try:
            yield
        finally:
            main.__spec__ = saved_spec
            if saved_file is not _MISSING:
                main.__file__ = saved_file


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
            self._receive({}, timeout=_STARTUP_TIMEOUT_S - waited)
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
        with _main_module_hidden():
            process.start()
        child_conn.close()
        return _Worker(process=process, conn=parent_conn)

    def _replace(self, worker: _Worker) -> None:
        worker.process.kill()
        worker.process.join()
        worker.conn.close()
        self._workers[self._workers.index(worker)] = self._start_worker()

    def _receive(self, results: MutableMapping[int, GradeResult], timeout: Optional[float],
                 wake: Optional[Connection] = None) -> None:
        """Wait up to `timeout` s (None: no limit) for messages from the workers, or for `wake` to be readable;
        store results, mark workers ready, replace dead ones."""
        by_conn = {worker.conn: worker for worker in self._workers}
        for conn in wait([*by_conn, *([wake] if wake is not None else [])], timeout=timeout):
            worker = by_conn.get(conn)
            if worker is None:  # the wake-up; its reader drains it
                continue
            try:
                message = conn.recv()
            except (EOFError, OSError):
                worker.process.join()
                if not worker.ready:
                    raise RuntimeError(
                        f"a grader worker exited with code {worker.process.exitcode} while starting; its traceback "
                        "is on stderr"
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

    def _send(self, worker: _Worker, task_id: int, response: str, ground_truth: str,
              results: MutableMapping[int, GradeResult]) -> None:
        """Give an idle, ready worker one item and start its deadline."""
        worker.last_ground_truth = ground_truth
        try:
            worker.conn.send((task_id, response, ground_truth))
        except OSError:  # died since its last message; the replacement takes the next task
            results[task_id] = _failure(self.config, GradeStatus.ERROR, "grader process died")
            self._replace(worker)
            return
        worker.task_id = task_id
        worker.deadline = time.monotonic() + self.config.timeout_s

    def session(self) -> GradingSession:
        """Open an incremental batch (see `GradingSession`); waits while another batch is being graded."""
        self._lock.acquire()
        try:
            if self._closed:
                raise RuntimeError("GraderPool is closed; create a new one")
            return GradingSession(self)
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
