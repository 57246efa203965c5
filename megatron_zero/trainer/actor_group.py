"""One Ray actor per Megatron rank: start them on the placement, join torch.distributed, call them with deadlines.

Why: the RL loop calls "every rank, this method" (log-probs, a train step, offload) and must never hang: a rank
that dies or stops answering fails the step with an error that says which rank, on which node, with which pid,
and what it logged last. Placement and rank bookkeeping live here, out of the loop (STYLE.md).

How::

    connect_ray(cluster)
    placement = create_placement(cluster)
    with RayActorGroup(cluster, placement, log_dir="runs/exp/logs") as group:
        group.initialize_parallel(parallel_config)          # RANK, WORLD_SIZE, MASTER_* + megatron groups
        group.setup("megatron_zero.trainer.actor_worker:ActorWorker", mcore_dir, actor_config, ...)
        group.run("onload")                                  # one result per rank, in rank order
        logps = group.run("logprobs", plan.scatter(batch))   # a DP_SHARDED method: one shard / result per replica
        group.run_rank0("some_rank0_only_method")

Workers: ``worker.RankWorker`` hosts whatever the ``"module:function"`` factory builds, so this module never
imports the actor. Each logs to ``<log_dir>/rank_<r>.log``.

Rendezvous: MASTER_ADDR is rank 0's node IP and MASTER_PORT a port found free on rank 0's own worker (a port
free on the driver's machine says nothing about rank 0's node).

GPUs: each worker asks Ray for GPUs on its bundle, so Ray sets its CUDA_VISIBLE_DEVICES to exactly its bundle's
GPU; the worker then sees one device, cuda:0, and LOCAL_RANK is 0. With ``cluster.colocate`` a worker takes only
``COLOCATED_GPU_SHARE`` of its bundle's GPU (and CPUs), leaving the rest for a rollout engine actor scheduled on
the same bundle index with a share <= 1 - COLOCATED_GPU_SHARE; Ray gives both the same CUDA_VISIBLE_DEVICES.
The share is a scheduling reservation only: memory is handed over by offload/onload, not enforced by Ray.

Deadlines: every call on the group is gathered with ``ray.wait`` against a deadline (``cluster.ray_call_timeout_s``
or ``timeout_s=``); collectives inside it time out after ``parallel.timeout_s``. After a failure the group
refuses further calls (its ranks may be stuck in a collective); shut it down and build a new one.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from megatron_zero.config.cluster import ClusterConfig
from megatron_zero.config.parallel import ParallelConfig
from megatron_zero.trainer.dispatch import Dispatch, RankLayout
from megatron_zero.cluster.node_files import LOG_TAIL_LINES, read_log_tail_on_node
from megatron_zero.cluster.placement import COLOCATED_GPU_SHARE, ClusterPlacement
from megatron_zero.trainer.worker import RankWorker, WorkerInfo, parse_factory_path

logger = logging.getLogger(__name__)

# In a timeout report, log tails of this many stuck ranks (all stuck ranks are named).
_MAX_TAILS_IN_REPORT = 4
# Deadline of reading a log tail on another node when reporting a failure.
_LOG_READ_TIMEOUT_S = 10.0


class RayWorkerError(RuntimeError):
    """A rank died, raised, or missed its deadline; the message names rank, node IP, pid and its last log lines."""


class RayWorkerTimeout(RayWorkerError, TimeoutError):
    """A rank did not return within the call's deadline."""


class RayActorGroup:
    """The ranks of one Megatron job, one Ray actor each; see the module docstring."""

    def __init__(self, cluster: ClusterConfig, placement: ClusterPlacement, log_dir: str | Path) -> None:
        if len(placement.bundles) != cluster.num_workers:
            raise ValueError(f"placement has {len(placement.bundles)} bundles but the cluster config needs "
                             f"{cluster.num_workers} ({cluster.describe()}); create the placement from this config")
        self._cluster = cluster
        self._placement = placement
        self._failure: Optional[str] = None
        self._layouts: list[RankLayout] = []
        self._modes: dict[str, Dispatch] = {}
        log_dir = Path(log_dir).resolve()
        share = COLOCATED_GPU_SHARE if cluster.colocate else 1.0
        remote_worker = ray.remote(RankWorker)
        self._workers = [
            remote_worker.options(
                num_cpus=cluster.cpus_per_worker * share,
                num_gpus=share if cluster.use_gpus else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement.placement_group, placement_group_bundle_index=bundle.index
                ),
            ).remote(rank, str(log_dir / f"rank_{rank}.log"))
            for rank, bundle in enumerate(placement.bundles)
        ]
        # What is known before a worker reports in, for errors during startup.
        self._infos = [
            WorkerInfo(rank=rank, node_ip=bundle.node_ip, node_id=bundle.node_id, pid=-1, gpu_ids=(),
                       log_path=str(log_dir / f"rank_{rank}.log"))
            for rank, bundle in enumerate(placement.bundles)
        ]
        try:
            self._infos = self._gather([worker.info.remote() for worker in self._workers], "startup",
                                       cluster.startup_timeout_s)
        except RayWorkerError:
            self.shutdown()  # the ranks that did start would otherwise hold their bundles
            raise
        logger.info("started %d workers: %s", len(self._workers),
                    ", ".join(f"rank {i.rank} {i.node_ip} pid {i.pid} gpus {list(i.gpu_ids)}" for i in self._infos))

    @property
    def world_size(self) -> int:
        return len(self._workers)

    @property
    def infos(self) -> list[WorkerInfo]:
        return list(self._infos)

    def __enter__(self) -> "RayActorGroup":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # ----------------------------------------------------------------------- setup

    def initialize_parallel(self, parallel: ParallelConfig) -> tuple[str, int]:
        """Set the torchrun variables on every rank, start torch.distributed + megatron parallel state.

        Returns the rendezvous (MASTER_ADDR, MASTER_PORT).
        """
        self._cluster.check_layout(parallel)
        self._check_usable()
        master_addr = self._infos[0].node_ip
        master_port = self._gather([self._workers[0].free_port.remote()], "free_port",
                                   self._cluster.startup_timeout_s)[0]
        refs = [
            worker.init_distributed.remote(
                rank, self.world_size,
                # GPU: Ray narrowed CUDA_VISIBLE_DEVICES to this rank's GPU, which is then cuda:0.
                0 if self._cluster.use_gpus else self._placement.local_index(rank),
                master_addr, master_port, parallel,
            )
            for rank, worker in enumerate(self._workers)
        ]
        self._layouts = self._gather(refs, "init_distributed", self._cluster.startup_timeout_s)
        return master_addr, master_port

    @property
    def layouts(self) -> list[RankLayout]:
        """Each rank's place in megatron's parallel state (after ``initialize_parallel``), in rank order."""
        if not self._layouts:
            raise RuntimeError("the group's ranks have no parallel layout yet; call initialize_parallel first")
        return list(self._layouts)

    @property
    def data_parallel_size(self) -> int:
        return self.layouts[0].dp_size

    def setup(self, factory_path: str, *args: Any, timeout_s: Optional[float] = None, **kwargs: Any) -> None:
        """Build each rank's hosted object: ``factory(*args, **kwargs)`` from ``"package.module:function"``."""
        parse_factory_path(factory_path)
        self._check_usable()
        args, kwargs = _put_once(args, kwargs)
        self._modes = self._gather([worker.setup.remote(factory_path, *args, **kwargs) for worker in self._workers],
                                   f"setup({factory_path})", self._call_timeout(timeout_s))[0]

    # ----------------------------------------------------------------------- calls

    def run(self, method: str, *args: Any, timeout_s: Optional[float] = None, **kwargs: Any) -> list[Any]:
        """Call ``method`` of every rank's hosted object, split as the method declares (``dispatch.py``).

        ``ALL_RANKS``: the same arguments everywhere, results in rank order. ``DP_SHARDED``: ``args[0]`` holds one
        shard per data-parallel replica; results are the replica leaders', in replica order.
        """
        self._check_usable()
        if self._modes.get(method, Dispatch.ALL_RANKS) is Dispatch.DP_SHARDED:
            return self._run_sharded(method, args, kwargs, timeout_s)
        args, kwargs = _put_once(args, kwargs)
        return self._gather([worker.call.remote(method, *args, **kwargs) for worker in self._workers], method,
                            self._call_timeout(timeout_s))

    def _run_sharded(self, method: str, args: tuple, kwargs: dict[str, Any], timeout_s: Optional[float]) -> list[Any]:
        layouts = self.layouts
        num_replicas = layouts[0].dp_size
        if not args or not isinstance(args[0], (list, tuple)) or len(args[0]) != num_replicas:
            raise ValueError(f"{method} splits its batch over data-parallel replicas: its first argument must be a "
                             f"list of {num_replicas} shards (one per replica), got {type(args[0]).__name__ if args else 'nothing'}")
        # Each shard into the object store once; a rank fetches only its replica's (a top-level ref argument is
        # resolved on the worker that receives it).
        shard_refs = [ray.put(shard) for shard in args[0]]
        shared, kwargs = _put_once(args[1:], kwargs)
        results = self._gather([worker.call.remote(method, shard_refs[layout.dp_rank], *shared, **kwargs)
                                for worker, layout in zip(self._workers, layouts)], method,
                               self._call_timeout(timeout_s))
        leaders = {layout.dp_rank: layout.rank for layout in layouts if layout.is_replica_leader}
        for layout, result in zip(layouts, results):
            if (result is None) == layout.is_replica_leader:
                self._failure = f"{method} broke its dispatch contract"
                raise RayWorkerError(f"{method} (DP_SHARDED): rank {layout.rank} (replica {layout.dp_rank}, "
                                     f"{'leader' if layout.is_replica_leader else 'not the leader'}) returned "
                                     f"{'None' if result is None else 'a result'}; exactly each replica's leader "
                                     "(TP, PP and CP rank 0) returns one")
        return [results[leaders[replica]] for replica in range(num_replicas)]

    def run_rank0(self, method: str, *args: Any, timeout_s: Optional[float] = None, **kwargs: Any) -> Any:
        """Call ``method`` on rank 0 only; it must not enter a collective (the other ranks are not in it)."""
        self._check_usable()
        return self._gather([self._workers[0].call.remote(method, *args, **kwargs)], method,
                            self._call_timeout(timeout_s))[0]

    def shutdown(self) -> None:
        for worker in self._workers:
            ray.kill(worker, no_restart=True)
        self._workers = []
        self._failure = self._failure or "the group was shut down"

    # ----------------------------------------------------------------------- failures

    def _call_timeout(self, timeout_s: Optional[float]) -> float:
        return self._cluster.ray_call_timeout_s if timeout_s is None else timeout_s

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise RuntimeError(f"this actor group is unusable: {self._failure}; shut it down and create a new one")

    def _gather(self, refs: list[ray.ObjectRef], what: str, timeout_s: float) -> list[Any]:
        """Results of one ref per rank (rank order), or RayWorkerError for the first rank that fails or is late."""
        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        deadline = time.monotonic() + timeout_s
        while rank_of:
            ready, _ = ray.wait(list(rank_of), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                late = sorted(rank_of.values())
                self._failure = f"rank(s) {late} did not finish {what} within {timeout_s:.1f} s"
                raise RayWorkerTimeout(self._failure + ":\n" + self._describe(late[:_MAX_TAILS_IN_REPORT]))
            rank = rank_of.pop(ready[0])
            try:
                results[rank] = ray.get(ready[0])
            except ray.exceptions.RayActorError as err:
                self._failure = f"rank {rank} died during {what}"
                raise RayWorkerError(f"{self._failure} ({err.__class__.__name__}):\n{self._describe([rank])}") from err
            except ray.exceptions.RayError as err:
                self._failure = f"rank {rank} failed in {what}"
                raise RayWorkerError(f"{self._failure}:\n{err}\n{self._describe([rank])}") from err
        return results

    def _describe(self, ranks: list[int]) -> str:
        return "\n".join(
            f"rank {info.rank} (node {info.node_ip}, pid {info.pid if info.pid > 0 else 'not started'}), "
            f"last lines of {info.log_path}:\n"
            f"{self._log_tail(info)}"
            for info in (self._infos[rank] for rank in ranks)
        )

    def _log_tail(self, info: WorkerInfo) -> str:
        return read_log_tail_on_node(info.log_path, info.node_id, info.node_ip, LOG_TAIL_LINES, _LOG_READ_TIMEOUT_S)


def _put_once(args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    # One object-store copy shared by all ranks, instead of Ray serialising the arguments once per rank.
    return tuple(ray.put(arg) for arg in args), {key: ray.put(value) for key, value in kwargs.items()}
