"""The per-rank process of a Ray actor group: hosts any per-rank object, logs to its own file.

Why: the trainer needs one process per Megatron rank that joins torch.distributed and then hosts the rank's
training object (``MegatronActor``, a reference model, a test probe). Keeping the worker generic, built from a
``"module:function"`` factory path, lets ``actor_group.py`` drive any per-rank object without importing it.
Each worker writes its log records to ``<log_dir>/rank_<r>.log`` so that when a rank dies, the driver can
show its last lines (``cluster/node_files.read_log_tail``).

How: not used directly; ``RayActorGroup`` wraps ``RankWorker`` with ``ray.remote`` and calls, in order,
``info``, ``free_port`` (rank 0), ``init_distributed`` (returns the rank's ``RankLayout``), ``setup(factory_path,
...)`` (returns the hosted methods' dispatch modes), then ``call(method, ...)``.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import ray

from megatron_zero.cluster.node_files import free_port
from megatron_zero.config.parallel import ParallelConfig
from megatron_zero.trainer.dispatch import Dispatch, RankLayout, dispatch_modes

logger = logging.getLogger(__name__)

_LOG_FORMAT = "%(asctime)s rank {rank} pid %(process)d %(levelname)s %(name)s: %(message)s"


@dataclass(frozen=True)
class WorkerInfo:
    rank: int
    node_ip: str
    node_id: str
    pid: int
    # GPUs Ray assigned to this worker (their ids on its node); CUDA_VISIBLE_DEVICES holds exactly these.
    gpu_ids: tuple[int, ...]
    log_path: str


def parse_factory_path(factory_path: str) -> tuple[str, str]:
    """``"package.module:function"`` -> (module, attribute); checked on the driver before workers are busy."""
    module_name, sep, attr = factory_path.partition(":")
    if not sep or not module_name or not attr or ":" in attr:
        raise ValueError(
            f"factory path {factory_path!r} must look like 'package.module:function', e.g. "
            "'megatron_zero.actor.actor:MegatronActor'"
        )
    return module_name, attr


def load_factory(factory_path: str) -> Callable[..., Any]:
    """The callable named by ``"package.module:function"`` (a class is a factory too)."""
    module_name, attr = parse_factory_path(factory_path)
    factory = getattr(importlib.import_module(module_name), attr, None)
    if not callable(factory):
        raise ValueError(f"factory path {factory_path!r}: module {module_name} has no callable named {attr!r}")
    return factory


class RankWorker:
    """One Megatron rank: joins torch.distributed, builds its object from a factory, runs its methods."""

    def __init__(self, rank: int, log_path: str) -> None:
        self._rank = rank
        self._log_path = log_path
        self._hosted: Optional[Any] = None
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_path)
        handler.setFormatter(logging.Formatter(_LOG_FORMAT.format(rank=rank)))
        # The root logger: records of every library in this process (megatron-core, ours) land in the file.
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        logger.info("rank %d started on node %s, CUDA_VISIBLE_DEVICES=%s", rank, ray.util.get_node_ip_address(),
                    os.environ.get("CUDA_VISIBLE_DEVICES"))

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            rank=self._rank,
            node_ip=ray.util.get_node_ip_address(),
            node_id=ray.get_runtime_context().get_node_id(),
            pid=os.getpid(),
            gpu_ids=tuple(int(gpu) for gpu in ray.get_gpu_ids()),
            log_path=self._log_path,
        )

    def free_port(self) -> int:
        return free_port()

    def init_distributed(self, rank: int, world_size: int, local_rank: int, master_addr: str, master_port: int,
                         parallel: ParallelConfig) -> "RankLayout":
        # Imported here, not at module level: torch takes seconds to import on a small machine, and workers
        # hosting objects that never join torch.distributed (light helpers, the tests' probes) do not need it.
        from megatron_zero.parallel.init import DistributedEnv, initialize_parallel
        from megatron_zero.utils.cpu_process import prepare_cpu_process

        prepare_cpu_process()

        env = DistributedEnv(rank=rank, world_size=world_size, local_rank=local_rank, master_addr=master_addr,
                             master_port=master_port)
        # Exported as well as passed: libraries started later in this process (dist_checkpointing helpers,
        # SGLang weight sync) read the torchrun variables.
        os.environ.update(
            RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
            MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port),
        )
        logger.info("rank %d: joining torch.distributed at %s:%d (world size %d, local rank %d)",
                    env.rank, env.master_addr, env.master_port, env.world_size, env.local_rank)
        initialize_parallel(parallel, env)
        return RankLayout.current()

    def setup(self, factory_path: str, *args: Any, **kwargs: Any) -> dict[str, Dispatch]:
        """Build the hosted object; returns how its methods split batches over DP replicas (``dispatch.py``)."""
        logger.info("rank %d: building %s", self._rank, factory_path)
        try:
            self._hosted = load_factory(factory_path)(*args, **kwargs)
        except BaseException:
            logger.exception("rank %d: building %s failed", self._rank, factory_path)
            raise
        return dispatch_modes(self._hosted)

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self._hosted is None:
            raise RuntimeError(f"rank {self._rank}: call({method!r}) before setup(); call the group's setup first")
        bound = getattr(self._hosted, method, None)
        if not callable(bound):
            raise AttributeError(f"rank {self._rank}: {type(self._hosted).__name__} has no method {method!r}")
        logger.info("rank %d: %s started", self._rank, method)
        start = time.perf_counter()
        try:
            result = bound(*args, **kwargs)
        except BaseException:
            logger.exception("rank %d: %s failed", self._rank, method)
            raise
        logger.info("rank %d: %s done in %.3f s", self._rank, method, time.perf_counter() - start)
        return result
