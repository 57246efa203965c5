"""The colocated weight push on two Ray nodes: each replica serves its own engines, nothing crosses nodes at PP=1.

Two Ray nodes on this machine (``ray.cluster_utils.Cluster``), two CPU ranks each, one colocated engine of
``tp_size=2`` per node (fake SGLang servers, tests/test_sglang_engine.py). The ranks run the production path:
``RayActorGroup`` on a two-node placement, ``HFWeightStream(all_ranks=True)`` told each rank's Ray node, and
``ColocatedWeightPush`` with a CPU stand-in for CUDA IPC serialisation (tests/test_weight_push.py). Checked per
layout: the engines get the HF checkpoint bit for bit, and the bytes each rank received, by kind.

    python -m pytest tests/test_weight_push_nodes.py -q
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import ray

from megatron_zero.config.cluster import ClusterConfig
from megatron_zero.config.parallel import ParallelConfig
from megatron_zero.trainer.actor_group import RayActorGroup
from megatron_zero.cluster.placement import create_placement, remove_placement
from test_weight_push import BUCKET_BYTES, _check_engine, _cpu_serialize, _hf_tensors

TESTS_DIR = Path(__file__).resolve().parent
TWO_NODES = ClusterConfig(num_nodes=2, gpus_per_node=0, cpu_workers_per_node=2, cpus_per_worker=1,
                          ray_call_timeout_s=300.0, startup_timeout_s=120.0)
ENGINE_TP = 2  # one engine per node: ranks 0-1 and 2-3


class PushProbe:
    """A rank's policy weights and its part of the colocated push (what ActorWorker.push_weights does)."""

    def __init__(self, mcore_dir: str, hf_dir: str, urls: list[str]) -> None:
        from megatron_zero.actor.actor import load_model
        from megatron_zero.config.model import ModelConfig
        from megatron_zero.config.sglang import SGLangConfig
        from megatron_zero.trainer.weight_push import ColocatedWeightPush

        self.model, self.info = load_model(mcore_dir, ModelConfig(params_dtype="float32"))
        self.push_ = ColocatedWeightPush(urls, SGLangConfig(model_path=hf_dir, tp_size=ENGINE_TP, retry_backoff_s=0.0),
                                         serialize=_cpu_serialize)

    def push(self, version: int) -> dict:
        from megatron_zero.parallel.reshard import HFWeightStream

        node_id = ray.get_runtime_context().get_node_id()
        stream = HFWeightStream(self.model, self.info.arch, self.info.bridge, bucket_bytes=BUCKET_BYTES,
                                all_ranks=True, node_id=node_id)
        stats = self.push_.push(stream, version)
        return {"node": node_id, "received": stream.stats.received_bytes, "engine_names": stats and stats.names}


@pytest.fixture(scope="module")
def two_nodes():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    pythonpath = os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")]))
    ray.init(address=cluster.address, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    cluster.wait_for_nodes()
    yield
    ray.shutdown()
    cluster.shutdown()


def _push(two_nodes, tiny_qwen2, fakes, parallel: ParallelConfig, tmp_path) -> list[dict]:
    hf_dir, mcore_dir = tiny_qwen2
    placement = create_placement(TWO_NODES)
    try:
        with RayActorGroup(TWO_NODES, placement, tmp_path / "logs") as group:
            nodes = [info.node_id for info in group.infos]
            # The layout under test: ranks 0-1 on one node, 2-3 on the other.
            assert nodes[0] == nodes[1] != nodes[2] == nodes[3]
            group.initialize_parallel(parallel)
            group.setup("test_weight_push_nodes:PushProbe", mcore_dir, hf_dir,
                        [f"http://127.0.0.1:{fake.port}" for fake in fakes])
            per_rank = group.run("push", 3)
    finally:
        remove_placement(placement)
    expected = _hf_tensors(hf_dir)
    for index, fake in enumerate(fakes):
        _check_engine(fake, index * ENGINE_TP, ENGINE_TP, expected)  # bit for bit, every rank the full bucket
        assert per_rank[index * ENGINE_TP]["engine_names"] == set(expected)
    assert [rank["node"] for rank in per_rank] == nodes
    return per_rank


def test_tp2_push_moves_nothing_between_nodes(two_nodes, tiny_qwen2, fakes, tmp_path):
    # TP=2 x DP=2: each replica is one node's TP group and holds the whole model.
    per_rank = _push(two_nodes, tiny_qwen2, fakes, ParallelConfig(tensor_parallel_size=2, timeout_s=120.0), tmp_path)
    for rank in per_rank:
        assert rank["received"]["tp_gather"] > 0
        assert rank["received"]["cross_stage"] == 0 and rank["received"]["cross_node"] == 0


def test_pp2_stages_exchange_only_what_they_lack(two_nodes, tiny_qwen2, fakes, tmp_path):
    # PP=2 (x DP=2 at TP=1): stage 0 on one node, stage 1 on the other, so every cross-stage byte crosses nodes;
    # TP gathers stay on their node.
    cross_stage = {}
    for tp in (1, 2):
        for fake in fakes:
            fake.requests.clear()  # each push is checked on its own requests
        per_rank = _push(two_nodes, tiny_qwen2, fakes, ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=2,
                                                                       timeout_s=120.0), tmp_path / f"tp{tp}")
        for rank in per_rank:
            received = rank["received"]
            assert received["cross_stage"] > 0 and received["cross_node"] == received["cross_stage"]
            assert (received["tp_gather"] > 0) == (tp == 2)
        cross_stage[tp] = sum(rank["received"]["cross_stage"] for rank in per_rank)
    # At TP=2 a rank receives only its own TP shard of what its stage lacks (then gathers it from its TP peer on
    # its node), not the whole tensor: about half the bytes cross (norms are not split, hence a little more).
    assert 0.5 <= cross_stage[2] / cross_stage[1] < 0.6
