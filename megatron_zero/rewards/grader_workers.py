"""The grader pool's worker processes: started, fed one item at a time, killed at their deadline, replaced.

Why: math-verify hands answers to sympy, and ``\\boxed{9^{9^{9^{9}}}}`` or a few thousand nested braces keep
sympy busy for minutes. ``concurrent.futures.ProcessPoolExecutor`` cannot stop a busy worker, so `GraderWorkers`
owns its processes: each grades one item at a time, and one past its deadline is killed and replaced while the
others go on. A timeout, a reward function that raises and a worker that dies each become a failed `GradeResult`
(scored as wrong, counted by its status), never an exception in the trainer.

How: `GraderPool` (rewards/pool.py) holds one `GraderWorkers`; only one thread at a time (a grading session's
dispatcher) calls `send`, `receive`, `kill_overdue` and `restart_busy`.

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
from collections.abc import Iterator, MutableMapping
from multiprocessing.connection import Connection, wait
from typing import Optional

from megatron_zero.config.reward import RewardConfig
from megatron_zero.rewards.math_reward import grade_math_reference
from megatron_zero.rewards.registry import RewardFn, call_reward, get_reward_fn
from megatron_zero.rewards.types import GradeResult, GradeStatus

logger = logging.getLogger(__name__)

_READY = "ready"
# A worker must import and warm up within this; far above the ~1 s it takes, so only a broken setup trips it.
STARTUP_TIMEOUT_S = 120.0
# A worker asked to exit gets this long before it is killed.
_SHUTDOWN_GRACE_S = 2.0


def _failure(config: RewardConfig, status: GradeStatus, detail: str) -> GradeResult:
    return GradeResult(score=config.score_table()["wrong"], status=status, detail=detail)


def _address_space_bytes() -> int:
    """This process's virtual address space now (0 where /proc is absent).

    The cap counts from here: a worker forks from the one forkserver of its process, which another user may have
    started with torch imported (parallel/local_launch.py preloads torch and megatron-core on CPU); the CUDA build
    of torch 2.14.1 alone maps ~3.9 GB, which would leave a fixed 4 GiB cap no room for grading (measured:
    MemoryError in math-verify's warm-up)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[0]) * resource.getpagesize()
    except OSError:
        return 0


def _worker_main(conn: Connection, reward_fn: RewardFn, config: RewardConfig) -> None:
    # Ctrl-C belongs to the trainer, which then closes the pool; a worker dying on SIGINT would look like a crash.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if config.max_worker_memory_mb is not None:
        limit = _address_space_bytes() + config.max_worker_memory_mb * 2**20
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
class GraderWorker:
    """One worker process and the item it is on (`task_id` None: idle)."""

    process: multiprocessing.process.BaseProcess
    conn: Connection
    ready: bool = False
    task_id: Optional[int] = None
    deadline: float = 0.0
    # The ground truth of its last item: the dispatcher prefers giving it the same prompt's samples next.
    last_ground_truth: Optional[str] = None


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


class GraderWorkers:
    """`config.num_workers` worker processes running `config.reward_fn`, each item limited to `config.timeout_s`.

    The constructor returns once every worker is ready. Results land in the `results` mapping the caller passes
    to `send`, `receive` and `kill_overdue`, keyed by the caller's task id.
    """

    def __init__(self, config: RewardConfig) -> None:
        self._config = config
        self._reward_fn = get_reward_fn(config.reward_fn)
        module = getattr(self._reward_fn, "__module__", None)
        if module == "__main__" or "<" in getattr(self._reward_fn, "__qualname__", "<"):
            raise ValueError(
                f"reward.reward_fn={config.reward_fn!r} resolves to {self._reward_fn!r}, which grader processes "
                "cannot import; define it at module level in an importable module (not __main__, not a lambda)"
            )
        pickle.dumps(self._reward_fn)  # fails here, with pickle's message, rather than inside a worker
        # The CPUs this process may run on (a container's share, not the host's count).
        self.num_workers = config.num_workers or len(os.sched_getaffinity(0))
        self._context = multiprocessing.get_context("forkserver")
        # Only takes effect if this process has not started its fork server yet; workers import what is missing.
        self._context.set_forkserver_preload([__name__, module])
        started = time.monotonic()
        self._workers = [self._start_worker() for _ in range(self.num_workers)]
        while not all(worker.ready for worker in self._workers):
            waited = time.monotonic() - started
            if waited > STARTUP_TIMEOUT_S:
                raise RuntimeError(f"grader workers did not start within {waited:.0f} s; is the machine overloaded?")
            self.receive({}, timeout=STARTUP_TIMEOUT_S - waited)
        logger.info("grader pool: %d workers ready in %.2f s", self.num_workers, time.monotonic() - started)

    def __iter__(self) -> Iterator[GraderWorker]:
        """The current workers (a replaced one is gone, its replacement in its place)."""
        return iter(list(self._workers))

    def idle(self) -> list[GraderWorker]:
        """Ready workers on no item."""
        return [worker for worker in self._workers if worker.ready and worker.task_id is None]

    def next_deadline(self) -> Optional[float]:
        """The earliest deadline (``time.monotonic()``) of a busy worker; None when none is busy."""
        return min((worker.deadline for worker in self._workers if worker.task_id is not None), default=None)

    def send(self, worker: GraderWorker, task_id: int, response: str, ground_truth: str,
             results: MutableMapping[int, GradeResult]) -> None:
        """Give an idle, ready worker one item and start its deadline."""
        worker.last_ground_truth = ground_truth
        try:
            worker.conn.send((task_id, response, ground_truth))
        except OSError:  # died since its last message; the replacement takes the next task
            results[task_id] = _failure(self._config, GradeStatus.ERROR, "grader process died")
            self._replace(worker)
            return
        worker.task_id = task_id
        worker.deadline = time.monotonic() + self._config.timeout_s

    def receive(self, results: MutableMapping[int, GradeResult], timeout: Optional[float],
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
                        self._config, GradeStatus.ERROR, f"grader process died (exit code {worker.process.exitcode})"
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

    def kill_overdue(self, results: MutableMapping[int, GradeResult]) -> None:
        """Score each item past its deadline as a timeout; kill and replace its worker."""
        now = time.monotonic()
        for worker in list(self._workers):
            if worker.task_id is not None and worker.deadline <= now:
                results[worker.task_id] = _failure(
                    self._config, GradeStatus.TIMEOUT, f"grading took over {self._config.timeout_s} s; killed"
                )
                self._replace(worker)

    def restart_busy(self) -> None:
        """Kill and replace every worker still on an item (whose answer must not reach a later batch)."""
        for worker in list(self._workers):
            if worker.task_id is not None:
                self._replace(worker)

    def close(self) -> None:
        """Ask every worker to exit; kill those that have not after a grace period."""
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

    def _start_worker(self) -> GraderWorker:
        parent_conn, child_conn = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_worker_main, args=(child_conn, self._reward_fn, self._config), name="grader", daemon=True
        )
        with _main_module_hidden():
            process.start()
        child_conn.close()
        return GraderWorker(process=process, conn=parent_conn)

    def _replace(self, worker: GraderWorker) -> None:
        worker.process.kill()
        worker.process.join()
        worker.conn.close()
        self._workers[self._workers.index(worker)] = self._start_worker()
