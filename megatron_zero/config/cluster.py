"""Config of the Ray cluster the trainer runs on: nodes, GPUs (or CPU workers), Ray address, deadlines.

Why: the placement group (``cluster/placement.py``) and the per-rank actor group (``trainer/actor_group.py``)
are sized from these values, and the parallel layout must fit them; checking both here makes a typo or a
layout that cannot fit fail before any Ray resource is requested.

How: ``ClusterConfig(num_nodes=2, gpus_per_node=8)`` for a GPU cluster, or
``ClusterConfig(gpus_per_node=0, cpu_workers_per_node=2)`` for the CPU demo; then
``cluster.check_layout(parallel_config)`` before creating the group. Works with ``OmegaConf.structured``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from megatron_zero.config.parallel import ParallelConfig
from megatron_zero.config.problems import raise_problems

# ray_address values with a meaning of their own; anything else is a cluster address passed to ray.init.
RAY_ADDRESS_AUTO = "auto"
RAY_ADDRESS_LOCAL = "local"


@dataclasses.dataclass(kw_only=True, frozen=True)
class ClusterConfig:
    num_nodes: int = 1
    # GPUs per node, one Megatron rank each; 0 runs every rank on CPU (gloo), sized by cpu_workers_per_node.
    gpus_per_node: int = 8
    # Ranks per node in CPU mode; must stay unset when gpus_per_node > 0 (there a rank is a GPU).
    cpu_workers_per_node: Optional[int] = None
    # CPUs reserved with each rank's GPU (or CPU worker): data loading, host-side work.
    cpus_per_worker: int = 1
    # "auto": join the running cluster when RAY_ADDRESS is set (e.g. under `ray job submit`) or one was
    # started on this machine with `ray start`, else start a local one. "local": always start a local one.
    # Anything else ("10.0.0.1:6379", "ray://head:10001"): connect there or fail.
    ray_address: str = RAY_ADDRESS_AUTO
    # Share each rank's GPU with a rollout engine actor (colocated RL): the rank takes only a fraction of its
    # bundle (see trainer/actor_group.py) so an engine actor fits on the same bundle.
    colocate: bool = False
    # Disaggregated rollout: GPUs of their own for the SGLang engines (a second placement group, filled node by
    # node after the ranks'; weights reach them by NCCL broadcast). 0: no such GPUs (the engines share the
    # ranks' GPUs with colocate=True, or the torch engine runs in the driver). CPU mode: bundles of
    # cpus_per_worker CPUs (tests start stand-in servers there).
    rollout_num_gpus: int = 0
    # Deadline of one call on all ranks (a train step, a log-prob pass). Must exceed parallel.timeout_s so a hung
    # collective raises its own error, with its traceback, before the Ray deadline fires.
    ray_call_timeout_s: float = 3600.0
    # Deadline of each startup stage: nodes joining, the placement group being placed, workers starting and
    # initialising torch.distributed.
    startup_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        problems: list[str] = []  # every value problem of this config, raised together
        if not (isinstance(self.num_nodes, int) and self.num_nodes >= 1):
            problems.append(f"cluster.num_nodes={self.num_nodes!r} must be an integer >= 1")
        if not (isinstance(self.gpus_per_node, int) and self.gpus_per_node >= 0):
            problems.append(f"cluster.gpus_per_node={self.gpus_per_node!r} must be an integer >= 0 (0 = CPU mode)")
        if self.gpus_per_node > 0 and self.cpu_workers_per_node is not None:
            problems.append(
                f"cluster.cpu_workers_per_node={self.cpu_workers_per_node} is only used in CPU mode, but "
                f"cluster.gpus_per_node={self.gpus_per_node}; remove cpu_workers_per_node or set gpus_per_node=0"
            )
        if self.gpus_per_node == 0 and not (
            isinstance(self.cpu_workers_per_node, int) and self.cpu_workers_per_node >= 1
        ):
            problems.append(
                f"cluster.cpu_workers_per_node={self.cpu_workers_per_node!r} must be an integer >= 1 in CPU mode "
                "(gpus_per_node=0); set it to the number of ranks per node, e.g. 2"
            )
        if not (isinstance(self.cpus_per_worker, int) and self.cpus_per_worker >= 1):
            problems.append(f"cluster.cpus_per_worker={self.cpus_per_worker!r} must be an integer >= 1")
        if not self.ray_address.strip():
            problems.append(
                f"cluster.ray_address={self.ray_address!r} is empty; use {RAY_ADDRESS_AUTO!r}, "
                f"{RAY_ADDRESS_LOCAL!r} or a cluster address such as '10.0.0.1:6379'"
            )
        if not (isinstance(self.rollout_num_gpus, int) and self.rollout_num_gpus >= 0):
            problems.append(f"cluster.rollout_num_gpus={self.rollout_num_gpus!r} must be an integer >= 0")
        if self.colocate and self.rollout_num_gpus:
            problems.append(
                f"cluster.colocate=True puts the rollout engines on the ranks' GPUs, but cluster.rollout_num_gpus="
                f"{self.rollout_num_gpus} gives them GPUs of their own; choose one: colocate=False for separate "
                "rollout GPUs, or rollout_num_gpus=0 for colocated engines"
            )
        for name in ("ray_call_timeout_s", "startup_timeout_s"):
            value = getattr(self, name)
            if not value > 0:
                problems.append(f"cluster.{name}={value} must be > 0 seconds")
        raise_problems(problems)

    @property
    def use_gpus(self) -> bool:
        return self.gpus_per_node > 0

    @property
    def workers_per_node(self) -> int:
        return self.gpus_per_node if self.use_gpus else self.cpu_workers_per_node

    @property
    def num_workers(self) -> int:
        """Megatron world size: one rank per GPU (or per CPU worker) on every node."""
        return self.num_nodes * self.workers_per_node

    def describe(self) -> str:
        unit = "GPUs" if self.use_gpus else "CPU workers"
        text = f"{self.num_nodes} node(s) x {self.workers_per_node} {unit} = {self.num_workers} {unit}"
        return text + (f" + {self.rollout_num_gpus} rollout {unit}" if self.rollout_num_gpus else "")

    def check_layout(self, parallel: ParallelConfig) -> int:
        """Check that TP x PP x CP x DP fills the cluster exactly and the deadlines nest; return DP."""
        model_parallel = parallel.model_parallel_size
        if self.num_workers % model_parallel != 0:
            divisors = [d for d in range(1, self.num_workers + 1) if self.num_workers % d == 0]
            raise ValueError(
                f"parallel layout does not fit the cluster: tensor_parallel_size x pipeline_parallel_size x "
                f"context_parallel_size = {parallel.tensor_parallel_size} x {parallel.pipeline_parallel_size} x "
                f"{parallel.context_parallel_size} = {model_parallel} does not divide {self.describe()}, so no "
                f"integer data-parallel size makes TP x PP x CP x DP = {self.num_workers}; choose sizes whose "
                f"product is one of {divisors}, or change cluster.num_nodes / cluster.gpus_per_node"
            )
        if self.ray_call_timeout_s <= parallel.timeout_s:
            raise ValueError(
                f"cluster.ray_call_timeout_s={self.ray_call_timeout_s} must be > parallel.timeout_s="
                f"{parallel.timeout_s}: otherwise a hung collective surfaces as a Ray deadline without the "
                f"collective's own error; raise ray_call_timeout_s or lower parallel.timeout_s"
            )
        return self.num_workers // model_parallel
