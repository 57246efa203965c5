"""The checks the launch scripts (examples/launch/) run around the trainer: before Ray starts, and before step 0.

Why: a multi-node job whose allocation does not fit its config should fail in seconds with one line, before
N nodes start Ray; and a node whose Ray failed to start should be named by the host name its allocation knows
(``scontrol show hostnames``), not surface as a placement group that never fills or as an IP address.

How (the scripts call these through ``megatron-zero launch``)::

    megatron-zero launch prepare --config C.yaml --nodes 2 --gpus-per-node 8 --cpus-per-node 64 key=value ...
        # validates the config and its files, checks the allocation against cluster.*, converts model_path once
        # when mcore_path is unset; prints the Megatron checkpoint's directory as its last line
    megatron-zero launch wait --config C.yaml --address 10.0.0.1:6379 --hosts node1,node2 key=value ...
        # waits up to cluster.startup_timeout_s until every host's Ray node joined; names the missing ones

``examples/launch/ray_node.sh`` gives each Ray node the custom resource ``launch_host:<host name>`` (amount 1,
requested by nothing), so nodes are told apart by name even where several share one machine and one IP.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Optional, Sequence

from megatron_zero.config.cluster import ClusterConfig
from megatron_zero.config.trainer import TrainConfig

logger = logging.getLogger(__name__)

# Keep in step with examples/launch/ray_node.sh, which sets it.
HOST_RESOURCE_PREFIX = "launch_host:"
_POLL_INTERVAL_S = 1.0


def required_nodes(cluster: ClusterConfig) -> int:
    """Nodes the job needs: the ranks' nodes, plus whole nodes for disaggregated rollout GPUs (the ranks fill
    theirs). In CPU mode rollout bundles are CPUs that fit beside the ranks."""
    if cluster.use_gpus and cluster.rollout_num_gpus:
        return cluster.num_nodes + math.ceil(cluster.rollout_num_gpus / cluster.gpus_per_node)
    return cluster.num_nodes


def check_allocation(cluster: ClusterConfig, num_nodes: int, gpus_per_node: int, cpus_per_node: int) -> None:
    """Raise one line naming the mismatch when the allocation (per-node counts of a homogeneous allocation)
    does not fit ``cluster``; a larger allocation is refused too, since its extra nodes would sit idle."""
    needed_nodes = required_nodes(cluster)
    if num_nodes != needed_nodes:
        rollout = (f" + {needed_nodes - cluster.num_nodes} for cluster.rollout_num_gpus={cluster.rollout_num_gpus}"
                   if needed_nodes != cluster.num_nodes else "")
        raise ValueError(f"the allocation has {num_nodes} node(s) but the config needs {needed_nodes} "
                         f"(cluster.num_nodes={cluster.num_nodes}{rollout}); submit with --nodes={needed_nodes} or "
                         f"change cluster.num_nodes")
    if cluster.use_gpus and gpus_per_node != cluster.gpus_per_node:
        raise ValueError(f"the allocation has {gpus_per_node} GPU(s) per node but cluster.gpus_per_node="
                         f"{cluster.gpus_per_node}; request --gpus-per-node={cluster.gpus_per_node} (or "
                         f"--gres=gpu:{cluster.gpus_per_node}) or set cluster.gpus_per_node={gpus_per_node}")
    needed_cpus = cluster.workers_per_node * cluster.cpus_per_worker
    if cpus_per_node < needed_cpus:
        raise ValueError(f"the allocation has {cpus_per_node} CPU(s) per node but {cluster.workers_per_node} ranks "
                         f"x cluster.cpus_per_worker={cluster.cpus_per_worker} need {needed_cpus}; request more "
                         f"CPUs per node (--exclusive or --cpus-per-task) or lower cluster.cpus_per_worker")


def prepare(config: TrainConfig) -> str:
    """Check the config's files, then the Megatron checkpoint: ``mcore_path``, or ``model_path`` converted into
    ``run.output_dir/base_mcore`` (skipped when a complete conversion is there). Returns its directory."""
    from megatron_zero.preflight.train import check_train_inputs
    from megatron_zero.trainer.setup import base_checkpoint

    check_train_inputs(config)
    return base_checkpoint(config)


def joined_hosts(nodes: list[dict[str, Any]]) -> set[str]:
    """Host names of the live Ray nodes of ``ray.nodes()`` that carry a launch_host resource."""
    return {resource[len(HOST_RESOURCE_PREFIX):] for node in nodes if node["Alive"]
            for resource in node["Resources"] if resource.startswith(HOST_RESOURCE_PREFIX)}


def missing_hosts(hosts: Sequence[str], nodes: list[dict[str, Any]]) -> list[str]:
    joined = joined_hosts(nodes)
    return [host for host in hosts if host not in joined]


def wait_for_hosts(cluster: ClusterConfig, address: str, hosts: Sequence[str],
                   timeout_s: Optional[float] = None) -> None:
    """Join the Ray cluster at ``address`` and wait until every host in ``hosts`` has a live node and the nodes
    hold what ``cluster`` needs (``find_missing_nodes``); at the deadline raise naming what is missing."""
    import ray

    from megatron_zero.cluster.placement import ClusterNotReadyError, find_missing_nodes

    timeout_s = cluster.startup_timeout_s if timeout_s is None else timeout_s
    ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            nodes = ray.nodes()
            missing = missing_hosts(hosts, nodes)
            shortfall = find_missing_nodes(nodes, cluster)
            if not missing and shortfall is None:
                named = f" ({', '.join(hosts)})" if hosts else ""
                logger.info("every node joined the Ray cluster at %s%s", address, named)
                return
            if time.monotonic() > deadline:
                if missing:
                    raise ClusterNotReadyError(
                        f"node(s) {', '.join(missing)} did not join the Ray cluster at {address} within "
                        f"{timeout_s:.0f} s (expected: {', '.join(hosts)}); see their Ray node logs (ray start "
                        "failed or cannot reach the head) or raise cluster.startup_timeout_s")
                raise ClusterNotReadyError(f"every host joined the Ray cluster at {address}, but {shortfall}")
            time.sleep(_POLL_INTERVAL_S)
    finally:
        ray.shutdown()
