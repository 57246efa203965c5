"""Run a function on N local processes that form one torch.distributed job.

Used where a single command must run a model-parallel computation on one machine: the
``verify`` step of the conversion tool, the CPU demo, and tests. Each worker gets the torchrun
environment variables, calls ``initialize_parallel`` and then the given function; its return
value (picklable) comes back to the caller in rank order. A worker that raises makes the whole
call raise with that rank's traceback; a worker that neither returns nor fails within
``timeout_s`` is killed and named.

The function must be importable (module level): workers never inherit the caller's memory, so callers'
scripts need an ``if __name__ == "__main__":`` guard.

How workers start: without CUDA they fork from a ``forkserver`` that imported torch and megatron-core once per
calling process, because those imports cost 7-10 s per process on a 2-core machine and the conversion tool, the
benchmarks and the tests launch many short jobs. Forked children would inherit the server's environment and working
directory from when it started, so each worker takes the caller's current ones explicitly. With CUDA they ``spawn``:
a fork after anything touched CUDA (Transformer Engine's import queries the device) leaves the child unable to
use it, and on a GPU machine a job's run time dwarfs its imports.
"""

from __future__ import annotations

import io
import os
import queue
import socket
import time
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from megatron_zero.config.parallel import ParallelConfig


class WorkerFailed(RuntimeError):
    """A local worker raised, died or timed out; the message names the rank."""


def find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Imported once by the fork server (see the module docstring); the workers import the rest themselves.
_FORKSERVER_PRELOAD = ["megatron_zero.parallel.worker_imports"]


def _start_context():
    if torch.cuda.is_available():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_FORKSERVER_PRELOAD)
    return ctx


def _worker(rank: int, world_size: int, port: int, config: ParallelConfig, fn: Callable, args: tuple,
            results: "mp.Queue", num_threads: int, environ: dict[str, str], cwd: str) -> None:
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    from megatron_zero.utils.cpu_process import prepare_cpu_process

    prepare_cpu_process()
    from megatron_zero.parallel.init import destroy_parallel, initialize_parallel

    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(num_threads)
    try:
        initialize_parallel(config)
        value = fn(*args)
        # Serialised to bytes here: torch's queue pickling would share tensors through shared memory
        # that vanishes when this worker exits before the parent has read them (seen under load).
        buffer = io.BytesIO()
        torch.save(value, buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException:  # report everything, including KeyboardInterrupt/SystemExit, with the rank
        results.put((rank, False, traceback.format_exc()))
    finally:
        try:
            destroy_parallel()
        except Exception:
            pass


def run_local_workers(fn: Callable, config: ParallelConfig, world_size: int | None = None,
                      args: tuple = (), timeout_s: float = 600.0) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` (default TP x PP x CP) gloo/NCCL processes; return per-rank values."""
    world_size = world_size or config.model_parallel_size
    config.check_world_size(world_size)
    ctx = _start_context()
    results = ctx.Queue()
    port = find_free_port()
    # Share the cores instead of oversubscribing them: each worker gets its slice.
    num_threads = max(1, (os.cpu_count() or 1) // world_size)
    # Not daemonic: dist_checkpointing starts helper processes of its own; the finally block reaps them.
    procs = [
        ctx.Process(target=_worker, args=(rank, world_size, port, config, fn, args, results, num_threads,
                                          dict(os.environ), os.getcwd()))
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    values: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(values) < world_size:
            try:
                rank, ok, value = results.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in values and p.exitcode != 0]
                if dead:
                    raise WorkerFailed(f"local worker rank(s) {dead} died with exit code(s) "
                                       f"{[procs[r].exitcode for r in dead]} before reporting a result")
                if time.monotonic() > deadline:
                    missing = sorted(set(range(world_size)) - set(values))
                    raise WorkerFailed(f"local worker rank(s) {missing} did not finish within {timeout_s:.0f} s")
                continue
            if not ok:
                raise WorkerFailed(f"local worker rank {rank} failed:\n{value}")
            values[rank] = torch.load(io.BytesIO(value), weights_only=False)
    finally:
        # After a failure the other ranks may be stuck in a collective with the failed one: no grace for them.
        grace_s = 10 if len(values) == world_size else 0
        for proc in procs:
            proc.join(timeout=grace_s)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return [values[rank] for rank in range(world_size)]
