"""Ray placement of the Megatron ranks: connect to Ray, check the nodes, reserve one bundle per rank.

Why: the trainer must know, before step 0, that every node and GPU it was configured for has joined (a node
that failed to start otherwise shows up as a placement group waiting forever), and ranks must map to hardware
deterministically: rank r is always the same GPU of the same node, so consecutive ranks (a TP group) share a
node and logs, checkpoints and failures name reproducible places.

How::

    connect_ray(cluster)                     # ClusterConfig.ray_address: join a running cluster or start one
    placement = create_placement(cluster)    # waits for the nodes, then for the bundles (startup_timeout_s)
    ...RayActorGroup(cluster, placement, log_dir)...
    rollout = create_rollout_placement(cluster)   # disaggregated SGLang engines (cluster.rollout_num_gpus)
    remove_placement(placement)

Layout: one bundle per rank, ``{"GPU": 1, "CPU": cpus_per_worker}`` (``{"CPU": cpus_per_worker}`` in CPU
mode). One node: STRICT_PACK (all bundles on that node or nothing). Several nodes: PACK, which fills a node
before using the next, so ranks of a node stay contiguous. Bundles are ordered by (node IP as a number, GPU id
on the node, bundle index); the GPU ids come from a probe task on each bundle, since Ray assigns them only
when something runs there.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional

import ray
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from megatron_zero.config.cluster import RAY_ADDRESS_AUTO, RAY_ADDRESS_LOCAL, ClusterConfig

# Fraction of its bundle a colocated Megatron rank reserves; an SGLang engine on the same bundle takes at most the
# rest (a scheduling reservation only).
COLOCATED_GPU_SHARE = 0.4

logger = logging.getLogger(__name__)

# How often to re-read ray.nodes() while nodes are still joining.
_NODE_POLL_INTERVAL_S = 2.0


class ClusterNotReadyError(RuntimeError):
    """Nodes, GPUs or the placement group did not become available within cluster.startup_timeout_s."""


@dataclass(frozen=True)
class Bundle:
    index: int  # index in the placement group, for PlacementGroupSchedulingStrategy
    node_id: str
    node_ip: str
    gpu_id: Optional[int]  # the GPU's id on its node; None in CPU mode


@dataclass(frozen=True)
class ClusterPlacement:
    placement_group: PlacementGroup
    bundles: tuple[Bundle, ...]  # bundles[r] hosts rank r

    def local_index(self, rank: int) -> int:
        """Position of ``rank`` among the ranks on its node (the torchrun LOCAL_RANK of a CPU worker)."""
        node_ip = self.bundles[rank].node_ip
        return sum(1 for bundle in self.bundles[:rank] if bundle.node_ip == node_ip)


# --------------------------------------------------------------------------- connecting


def connect_ray(cluster: ClusterConfig) -> None:
    """Join or start Ray as ``cluster.ray_address`` says; an already initialised Ray is kept as it is."""
    if ray.is_initialized():
        logger.info("Ray already initialised; using it")
        return
    if cluster.ray_address == RAY_ADDRESS_LOCAL:
        _start_local_ray(cluster)
    elif cluster.ray_address == RAY_ADDRESS_AUTO and not os.environ.get("RAY_ADDRESS"):
        # No address given anywhere: join a cluster started on this machine with `ray start`, if there is one.
        try:
            ray.init(address="auto")
        except ConnectionError:
            logger.info("no running Ray cluster found; starting a local one")
            _start_local_ray(cluster)
    else:
        # An explicit address, or RAY_ADDRESS under "auto" (ray.init reads it): failing to connect is an error,
        # never a silent switch to a local cluster.
        ray.init(address=cluster.ray_address)
    logger.info("Ray resources: %s", ray.cluster_resources())


def local_cluster_cpus(cluster: ClusterConfig) -> int:
    """Logical CPUs of a local Ray cluster for this run: the machine's cores, or the bundles' CPUs if more (a
    2-core machine runs two CPU ranks and a CPU rollout engine: Ray's CPUs are a scheduling count, not cores)."""
    needed = 0 if cluster.use_gpus else (cluster.num_workers + cluster.rollout_num_gpus) * cluster.cpus_per_worker
    return max(os.cpu_count() or 1, needed)


def _start_local_ray(cluster: ClusterConfig) -> None:
    """Start a Ray cluster on this machine, sized for the run; one that lacks the GPUs the run needs is refused at
    once (no node will join a local cluster, so waiting for one would only end at cluster.startup_timeout_s)."""
    ray.init(include_dashboard=False, num_cpus=local_cluster_cpus(cluster))
    if cluster.use_gpus:
        found = ray.cluster_resources().get("GPU", 0)
        if found < cluster.gpus_per_node:
            ray.shutdown()
            raise ClusterNotReadyError(
                f"the local Ray cluster started here has {found:g} GPUs, but the run places bundles of "
                f"cluster.gpus_per_node={cluster.gpus_per_node} GPUs; "
                "on a machine without GPUs set cluster.gpus_per_node=0 for `train` (CPU ranks; SGLang servers then "
                "run on CPU) or pass --device cpu to `eval` / `difficulty`, or join a GPU cluster (cluster."
                "ray_address, --ray-address)")


# --------------------------------------------------------------------------- node check


def _ip_sort_key(ip: str) -> tuple[int, int, str]:
    # Numeric order (10.0.0.2 before 10.0.0.10); a host name, which Ray rarely reports, sorts after all IPs.
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return (7, 0, ip)
    return (address.version, int(address), "")


def find_missing_nodes(nodes: list[dict[str, Any]], cluster: ClusterConfig) -> Optional[str]:
    """Compare ``ray.nodes()`` with the config; None when enough nodes joined, else what is missing.

    A node counts when it is alive and has at least the GPUs (CPU mode: CPUs) one node's ranks need.
    """
    resource, unit = ("GPU", "GPUs") if cluster.use_gpus else ("CPU", "CPUs")
    needed = cluster.gpus_per_node if cluster.use_gpus else cluster.workers_per_node * cluster.cpus_per_worker
    alive = sorted((node for node in nodes if node["Alive"]), key=lambda node: _ip_sort_key(node["NodeManagerAddress"]))
    usable = [node for node in alive if node["Resources"].get(resource, 0) >= needed]
    # Disaggregated rollout engines need GPUs (CPU mode: CPUs) beyond the ranks', on any node.
    per_rollout_gpu = 1 if cluster.use_gpus else cluster.cpus_per_worker
    total_needed = cluster.num_nodes * needed + cluster.rollout_num_gpus * per_rollout_gpu
    total = sum(node["Resources"].get(resource, 0) for node in alive)
    if len(usable) >= cluster.num_nodes and total >= total_needed:
        return None
    found = ", ".join(
        f"node {node['NodeManagerAddress']} with {node['Resources'].get(resource, 0):g} {unit}" for node in alive
    ) or "no live node"
    message = f"expected {cluster.num_nodes} node(s) x {needed} {unit}"
    if cluster.rollout_num_gpus:
        message += f" + {cluster.rollout_num_gpus * per_rollout_gpu:g} {unit} for rollout engines"
    message += f", found {found}; missing "
    if len(usable) < cluster.num_nodes:
        message += f"{cluster.num_nodes - len(usable)} node(s) with >= {needed} {unit}"
    else:
        message += f"{total_needed - total:g} {unit} for the rollout engines"
    dead = sorted(node["NodeManagerAddress"] for node in nodes if not node["Alive"])
    if dead:
        message += f"; dead node(s): {', '.join(dead)}"
    return message + (
        ". Start the missing nodes with `ray start --address=<head ip>:6379` (and check that each sees its GPUs), "
        "or lower cluster.num_nodes / cluster.gpus_per_node"
    )


def wait_for_nodes(cluster: ClusterConfig) -> None:
    """Poll ``ray.nodes()`` until the configured nodes joined; raise naming what is missing at the deadline."""
    deadline = time.monotonic() + cluster.startup_timeout_s
    reported = None
    while (missing := find_missing_nodes(ray.nodes(), cluster)) is not None:
        if time.monotonic() > deadline:
            raise ClusterNotReadyError(f"cluster incomplete after {cluster.startup_timeout_s:.0f} s: {missing}")
        if missing != reported:  # log changes only, not every poll
            logger.info("waiting for nodes: %s", missing)
            reported = missing
        time.sleep(_NODE_POLL_INTERVAL_S)


# --------------------------------------------------------------------------- placement


@ray.remote(num_cpus=0)
def _assigned_gpu_ids() -> list[int]:
    return [int(gpu) for gpu in ray.get_gpu_ids()]


def order_bundles(bundles: list[Bundle]) -> tuple[Bundle, ...]:
    """Rank order: node IP (numerically), then node id (nodes that share an IP, e.g. several Ray nodes on one
    machine, keep their ranks contiguous), then GPU id on the node, then bundle index."""
    return tuple(sorted(bundles, key=lambda b: (_ip_sort_key(b.node_ip), b.node_id,
                                                -1 if b.gpu_id is None else b.gpu_id, b.index)))


def create_placement(cluster: ClusterConfig) -> ClusterPlacement:
    """Wait for the nodes, reserve one bundle per rank, and order the bundles into ranks."""
    wait_for_nodes(cluster)
    strategy = "STRICT_PACK" if cluster.num_nodes == 1 else "PACK"
    return _place_bundles(cluster, cluster.num_workers, strategy, "Megatron ranks")


def create_rollout_placement(cluster: ClusterConfig) -> ClusterPlacement:
    """One bundle per GPU of the disaggregated rollout engines (``cluster.rollout_num_gpus``), after the ranks'
    placement took its nodes. PACK fills a node before the next, so engines whose tp_size divides the GPUs per
    node stay on one node (``plan_engines`` checks it)."""
    if not cluster.rollout_num_gpus:
        raise ValueError("cluster.rollout_num_gpus=0: no rollout GPUs to place")
    return _place_bundles(cluster, cluster.rollout_num_gpus, "PACK", "rollout engines")


def _place_bundles(cluster: ClusterConfig, num_bundles: int, strategy: str, purpose: str) -> ClusterPlacement:
    bundle_spec: dict[str, float] = {"CPU": cluster.cpus_per_worker}
    if cluster.use_gpus:
        bundle_spec["GPU"] = 1
    group = placement_group([dict(bundle_spec) for _ in range(num_bundles)], strategy=strategy)
    ready, _ = ray.wait([group.ready()], timeout=cluster.startup_timeout_s)
    if not ready:
        remove_placement_group(group)
        raise ClusterNotReadyError(
            f"placement group of {num_bundles} bundles {bundle_spec} ({strategy}) for the {purpose} was not placed "
            f"within {cluster.startup_timeout_s:.0f} s; Ray reports total {ray.cluster_resources()} and available "
            f"{ray.available_resources()}: another job may hold the resources, or a node lacks them"
        )
    node_ips = {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes()}
    node_of_bundle = placement_group_table(group)["bundles_to_node_id"]
    gpu_ids: list[Optional[int]] = [None] * num_bundles
    if cluster.use_gpus:
        probes = [
            _assigned_gpu_ids.options(
                num_gpus=1, scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i)
            ).remote()
            for i in range(num_bundles)
        ]
        gpu_ids = [ids[0] for ids in ray.get(probes, timeout=cluster.startup_timeout_s)]
    bundles = order_bundles([
        Bundle(index=i, node_id=node_of_bundle[i], node_ip=node_ips[node_of_bundle[i]], gpu_id=gpu_ids[i])
        for i in range(num_bundles)
    ])
    per_node = Counter(bundle.node_ip for bundle in bundles)
    logger.info("placed %d bundles for the %s (%s): %s", len(bundles), purpose, strategy,
                ", ".join(f"{ip}: {count}" for ip, count in per_node.items()))
    return ClusterPlacement(placement_group=group, bundles=bundles)


def remove_placement(placement: ClusterPlacement) -> None:
    remove_placement_group(placement.placement_group)
