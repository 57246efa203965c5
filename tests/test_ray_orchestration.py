"""Ray orchestration on a local CPU cluster: config checks, placement, a 2-rank gloo group, failure reports.

The workers host ``Probe`` objects built from this module (``"test_ray_orchestration:Probe"``), so the Ray
cluster gets tests/ on its workers' PYTHONPATH. Everything runs on 2 CPUs; the whole file takes ~35 s
on an idle 2-core machine.
"""

from __future__ import annotations

import logging
import os
import random
import time
import uuid
from pathlib import Path

import pytest
import ray
from omegaconf import OmegaConf

from megatron_zero.config.cluster import ClusterConfig
from megatron_zero.config.parallel import ParallelConfig
from megatron_zero.trainer.actor_group import RayActorGroup, RayWorkerError, RayWorkerTimeout
from megatron_zero.trainer.dispatch import Dispatch, register
from megatron_zero.cluster.placement import (
    Bundle, create_placement, find_missing_nodes, order_bundles, remove_placement,
)
from megatron_zero.cluster.node_files import read_log_tail_remote

TESTS_DIR = Path(__file__).resolve().parent
CPU_CLUSTER = ClusterConfig(gpus_per_node=0, cpu_workers_per_node=2, cpus_per_worker=1,
                            ray_call_timeout_s=60.0, startup_timeout_s=60.0)
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
TP2 = ParallelConfig(tensor_parallel_size=2, timeout_s=30.0)

probe_logger = logging.getLogger("probe")


class Probe:
    """The per-rank object the workers host in these tests."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def all_reduce(self, values: list[float]) -> dict:
        # Imported here: workers that never join torch.distributed skip the seconds-long torch import.
        import torch
        import torch.distributed as dist
        from megatron.core import parallel_state

        rank = dist.get_rank()
        tensor = torch.tensor(values, dtype=torch.float64) * self.scale * (rank + 1)
        dist.all_reduce(tensor, group=parallel_state.get_tensor_model_parallel_group())
        return {
            "sum": tensor.tolist(), "rank": rank, "backend": dist.get_backend(),
            "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
            "tp_size": parallel_state.get_tensor_model_parallel_world_size(),
            "env": {name: os.environ[name] for name in TORCHRUN_VARIABLES},
        }

    @register(Dispatch.DP_SHARDED)
    def shard_sum(self, shard: list[float], scale: float):
        """This replica's shard, summed over its TP group (1 rank here), returned by the replica's leader."""
        from megatron.core import parallel_state

        self.seen = shard
        if parallel_state.get_tensor_model_parallel_rank() != 0:
            return None
        return {"sum": sum(shard) * scale, "dp_rank": parallel_state.get_data_parallel_rank(), "pid": os.getpid()}

    @register(Dispatch.DP_SHARDED)
    def everyone_answers(self, shard: list[float]) -> int:
        return len(shard)

    def seen_shard(self) -> list[float]:
        return self.seen

    def pid(self) -> int:
        return os.getpid()

    def exit_if_pid(self, pid: int, token: str) -> int:
        if os.getpid() == pid:
            probe_logger.info("about to exit: %s", token)
            os._exit(3)
        return os.getpid()

    def sleep_if_pid(self, pid: int, seconds: float) -> int:
        if os.getpid() == pid:
            time.sleep(seconds)
        return os.getpid()


# --------------------------------------------------------------------------- pure checks (no Ray cluster)


def _node(ip: str, gpus: float, alive: bool = True, cpus: float = 16) -> dict:
    return {"NodeID": ip, "Alive": alive, "NodeManagerAddress": ip, "Resources": {"CPU": cpus, "GPU": gpus}}


def test_missing_node_message_names_found_missing_and_dead_nodes():
    cluster = ClusterConfig(num_nodes=2, gpus_per_node=8)
    head_without_gpus = _node("10.0.0.1", 0)
    nodes = [_node("10.0.0.2", 8), head_without_gpus, _node("10.0.0.3", 4), _node("10.0.0.4", 8, alive=False)]
    message = find_missing_nodes(nodes, cluster)
    assert message is not None
    assert "expected 2 node(s) x 8 GPUs" in message
    assert "node 10.0.0.1 with 0 GPUs, node 10.0.0.2 with 8 GPUs, node 10.0.0.3 with 4 GPUs" in message
    assert "missing 1 node(s) with >= 8 GPUs" in message
    assert "dead node(s): 10.0.0.4" in message
    assert find_missing_nodes(nodes + [_node("10.0.0.5", 8)], cluster) is None
    # CPU mode counts CPUs: 2 workers x 3 CPUs each need 6 on a node.
    cpu_cluster = ClusterConfig(gpus_per_node=0, cpu_workers_per_node=2, cpus_per_worker=3)
    assert "missing 1 node(s) with >= 6 CPUs" in find_missing_nodes([_node("127.0.0.1", 0, cpus=4)], cpu_cluster)
    assert find_missing_nodes([_node("127.0.0.1", 0, cpus=6)], cpu_cluster) is None
    assert "no live node" in find_missing_nodes([], cluster)


def test_missing_rollout_gpus_are_named():
    # 2 training nodes x 8 GPUs + 4 GPUs for disaggregated engines: the 4 may sit on any node.
    cluster = ClusterConfig(num_nodes=2, gpus_per_node=8, rollout_num_gpus=4)
    nodes = [_node("10.0.0.1", 8), _node("10.0.0.2", 8)]
    message = find_missing_nodes(nodes, cluster)
    assert "expected 2 node(s) x 8 GPUs + 4 GPUs for rollout engines" in message
    assert "missing 4 GPUs for the rollout engines" in message
    assert "missing 1 GPUs" in find_missing_nodes(nodes + [_node("10.0.0.3", 3)], cluster)
    assert find_missing_nodes(nodes + [_node("10.0.0.3", 4)], cluster) is None


def test_bundles_are_ordered_by_numeric_node_ip_then_gpu_id():
    ips = ["10.0.0.10", "10.0.0.2", "192.168.1.1", "10.0.1.1"]
    bundles = [Bundle(index=i, node_id=f"id-{ip}", node_ip=ip, gpu_id=gpu)
               for i, (ip, gpu) in enumerate((ip, gpu) for ip in ips for gpu in (3, 0, 2, 1))]
    shuffled = bundles[:]
    random.Random(0).shuffle(shuffled)
    # Independent reference: brute-force order by the IP's octets as integers, then the GPU id.
    expected = sorted(bundles, key=lambda b: ([int(part) for part in b.node_ip.split(".")], b.gpu_id))
    assert order_bundles(shuffled) == tuple(expected)
    assert [b.node_ip for b in expected[:4]] == ["10.0.0.2"] * 4


@pytest.mark.parametrize("kwargs, field", [
    ({"num_nodes": 0}, "cluster.num_nodes=0"),
    ({"gpus_per_node": -1}, "cluster.gpus_per_node=-1"),
    ({"gpus_per_node": 8, "cpu_workers_per_node": 2}, "cluster.cpu_workers_per_node=2"),
    ({"gpus_per_node": 0}, "cluster.cpu_workers_per_node=None"),
    ({"cpus_per_worker": 0}, "cluster.cpus_per_worker=0"),
    ({"ray_address": " "}, "cluster.ray_address=' '"),
    ({"ray_call_timeout_s": 0}, "cluster.ray_call_timeout_s=0"),
    ({"startup_timeout_s": -5.0}, "cluster.startup_timeout_s=-5.0"),
])
def test_cluster_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field.replace("(", r"\(").replace(")", r"\)")):
        ClusterConfig(**kwargs)


def test_layout_check_names_sizes_and_valid_choices():
    cluster = ClusterConfig(num_nodes=2, gpus_per_node=8)
    assert cluster.num_workers == 16
    assert cluster.check_layout(ParallelConfig(tensor_parallel_size=2, pipeline_parallel_size=2)) == 4
    with pytest.raises(ValueError, match=r"2 x 3 x 1 = 6 does not divide 2 node\(s\) x 8 GPUs = 16 GPUs") as err:
        cluster.check_layout(ParallelConfig(tensor_parallel_size=2, pipeline_parallel_size=3))
    assert "[1, 2, 4, 8, 16]" in str(err.value)
    with pytest.raises(ValueError, match="cluster.ray_call_timeout_s=100.0 must be > parallel.timeout_s=600.0"):
        ClusterConfig(num_nodes=2, gpus_per_node=8, ray_call_timeout_s=100.0).check_layout(ParallelConfig())
    structured = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ClusterConfig),
                                                     {"gpus_per_node": 0, "cpu_workers_per_node": 3}))
    assert structured.num_workers == 3


# --------------------------------------------------------------------------- a local Ray cluster


@pytest.fixture(scope="module")
def ray_cluster():
    # The workers import this module by name to build Probe.
    pythonpath = os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    yield
    ray.shutdown()


@pytest.fixture
def placement(ray_cluster):
    placement = create_placement(CPU_CLUSTER)
    yield placement
    remove_placement(placement)


@pytest.fixture
def group(placement, tmp_path):
    group = RayActorGroup(CPU_CLUSTER, placement, log_dir=tmp_path / "logs")
    yield group
    group.shutdown()


def test_cpu_placement_is_one_bundle_per_worker_in_rank_order(placement):
    node_ip = ray.util.get_node_ip_address()
    assert [b.index for b in placement.bundles] == [0, 1]
    assert [b.node_ip for b in placement.bundles] == [node_ip, node_ip]
    assert [b.gpu_id for b in placement.bundles] == [None, None]
    assert [placement.local_index(rank) for rank in range(2)] == [0, 1]
    table = ray.util.placement_group_table(placement.placement_group)
    assert table["strategy"] == "STRICT_PACK"
    assert list(table["bundles"].values()) == [{"CPU": 1.0}, {"CPU": 1.0}]


def test_two_rank_group_runs_a_real_tp_all_reduce_and_reports_worker_errors(group, tmp_path):
    with pytest.raises(ValueError, match="must look like 'package.module:function'"):
        group.setup("test_ray_orchestration.Probe")
    master_addr, master_port = group.initialize_parallel(TP2)
    group.setup("test_ray_orchestration:Probe", scale=0.5)
    values = [1.0, -2.0, 3.5]
    results = group.run("all_reduce", values)
    # Reference: every rank contributes values * 0.5 * (rank + 1); the TP group holds both ranks.
    expected = [sum(v * 0.5 * (rank + 1) for rank in range(2)) for v in values]
    infos = group.infos
    assert len({info.pid for info in infos}) == 2
    assert master_addr == infos[0].node_ip
    for rank, result in enumerate(results):
        assert result["sum"] == expected  # exact: every term is a short binary fraction
        assert (result["rank"], result["tp_rank"], result["tp_size"], result["backend"]) == (rank, rank, 2, "gloo")
        assert result["env"] == {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                                 "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)}
        assert "joining torch.distributed" in (tmp_path / "logs" / f"rank_{rank}.log").read_text()
    assert group.run_rank0("pid") == infos[0].pid
    # An exception inside a worker comes back with the rank and the worker's traceback; the group then refuses
    # further calls (other ranks could be waiting in a collective).
    with pytest.raises(RayWorkerError, match=r"rank \d failed in no_such_method(.|\n)*Probe has no method"):
        group.run("no_such_method")
    with pytest.raises(RuntimeError, match="unusable: rank \\d failed in no_such_method"):
        group.run("pid")


def test_dp_sharded_call_gives_each_replica_only_its_shard(group):
    group.initialize_parallel(ParallelConfig(timeout_s=30.0))  # TP=1: two data-parallel replicas
    group.setup("test_ray_orchestration:Probe", scale=1.0)
    assert [(layout.dp_rank, layout.is_replica_leader) for layout in group.layouts] == [(0, True), (1, True)]
    shards = [[1.0, 2.0], [10.0]]
    results = group.run("shard_sum", shards, 0.5)
    # One result per replica, in replica order, each computed from that replica's shard alone.
    assert [(r["dp_rank"], r["sum"]) for r in results] == [(0, 1.5), (1, 5.0)]
    assert [r["pid"] for r in results] == [info.pid for info in group.infos]
    assert group.run("seen_shard") == shards  # an ALL_RANKS call: every rank's result, in rank order
    with pytest.raises(ValueError, match=r"shard_sum splits its batch over data-parallel replicas: its first "
                                         r"argument must be a list of 2 shards"):
        group.run("shard_sum", [[1.0]], 0.5)


def test_dp_sharded_method_must_answer_from_leaders_only(group):
    group.initialize_parallel(TP2)  # one replica of two ranks: only TP rank 0 may answer
    group.setup("test_ray_orchestration:Probe", scale=1.0)
    assert [r["dp_rank"] for r in group.run("shard_sum", [[1.0]], 1.0)] == [0]
    with pytest.raises(RayWorkerError, match=r"everyone_answers \(DP_SHARDED\): rank 1 \(replica 0, not the "
                                             r"leader\) returned a result"):
        group.run("everyone_answers", [[1.0]])


def test_worker_that_dies_mid_call_is_reported_with_rank_and_log_tail(group):
    group.setup("test_ray_orchestration:Probe", scale=1.0)
    victim = group.infos[1]
    token = uuid.uuid4().hex
    start = time.monotonic()
    with pytest.raises(RayWorkerError) as err:
        group.run("exit_if_pid", victim.pid, token, timeout_s=30.0)
    assert time.monotonic() - start < 20.0
    message = str(err.value)
    assert "rank 1 died during exit_if_pid" in message
    assert f"(node {victim.node_ip}, pid {victim.pid})" in message
    assert f"about to exit: {token}" in message  # the worker's last log line
    assert not isinstance(err.value, RayWorkerTimeout)
    with pytest.raises(RuntimeError, match="unusable: rank 1 died"):
        group.run("exit_if_pid", 0, token)


def test_call_past_its_deadline_raises_a_timeout_naming_the_rank(group):
    group.setup("test_ray_orchestration:Probe", scale=1.0)
    sleeper = group.infos[0]
    start = time.monotonic()
    with pytest.raises(RayWorkerTimeout) as err:
        group.run("sleep_if_pid", sleeper.pid, 60.0, timeout_s=1.0)
    assert time.monotonic() - start < 10.0
    message = str(err.value)
    assert "rank(s) [0] did not finish sleep_if_pid within 1.0 s" in message
    assert f"rank 0 (node {sleeper.node_ip}, pid {sleeper.pid})" in message
    assert "sleep_if_pid started" in message
    assert "rank 1 (node" not in message


def test_log_tail_is_read_on_the_workers_node(ray_cluster, tmp_path):
    log = tmp_path / "rank_0.log"
    log.write_text("".join(f"line {i}\n" for i in range(30)))
    node_id = ray.get_runtime_context().get_node_id()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ref = read_log_tail_remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)
                                        ).remote(str(log), 3)
    assert ray.get(ref, timeout=30) == "line 27\nline 28\nline 29"


def test_a_local_cluster_has_the_cpus_the_runs_bundles_need():
    """Ray's CPUs are a scheduling count: a 2-core machine still places two CPU ranks and a CPU rollout engine's
    bundle (otherwise the placement would wait cluster.startup_timeout_s and fail)."""
    from megatron_zero.config.cluster import ClusterConfig
    from megatron_zero.cluster.placement import local_cluster_cpus

    cores = os.cpu_count()
    separate = ClusterConfig(gpus_per_node=0, cpu_workers_per_node=2, rollout_num_gpus=1, cpus_per_worker=2)
    assert local_cluster_cpus(separate) == max(cores, 6)
    assert local_cluster_cpus(ClusterConfig(gpus_per_node=0, cpu_workers_per_node=1)) == max(cores, 1)
    assert local_cluster_cpus(ClusterConfig(gpus_per_node=8)) == cores  # GPU runs: Ray counts the cores
