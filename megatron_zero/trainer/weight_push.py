"""Weight sync from the Megatron ranks straight into the SGLang servers, colocated or disaggregated.

Why (colocated, ``ColocatedWeightPush``): colocated SGLang servers take new weights as CUDA IPC handles
(``/update_weights_from_tensor``), which only a process holding the tensors on a GPU can create, and which a
server rank opens cheaply only for a buffer on its own GPU. Routing buckets through the driver would copy the model through host memory and needs CUDA in
the driver. So, as in slime's colocated mode, every rank receives every HF bucket
(``HFWeightStream(all_ranks=True)``: TP gather, then a broadcast from the owning stage), serialises its own copy
for the server rank that shares its GPU, and the first rank of each engine gathers the ``tp_size`` payloads and
posts them in one request. The driver only starts the push and collects the engines' stats.

Layout (from ``rollout/sglang_servers.plan_engines``): engine i runs on the GPUs of ranks
``[i * tp, (i + 1) * tp)``; its server rank j on the GPU of rank ``i * tp + j``, so entry j of the request is rank
``i * tp + j``'s payload.

Why (disaggregated, ``BroadcastWeightPush``): servers on GPUs of their own cannot open CUDA IPC handles of the
trainer's GPUs; they join one process group with Megatron rank 0 (``parallel/weight_broadcast.py``; engine i's
server rank j is group rank ``1 + i * tp + j``), every engine is told the names, dtypes and shapes of a bucket,
and rank 0 broadcasts each tensor once to all of them (NCCL on GPUs). Only rank 0 needs the full bucket
(``HFWeightStream`` with its default ``all_ranks=False``); the other ranks take part in the TP gather.

How (on every rank, inside the rank workers; both are collectives)::

    push = ColocatedWeightPush(urls, sglang_config)          # creates one gloo group per engine
    stats = push.push(HFWeightStream(model, arch, bridge, bucket_bytes=b, all_ranks=True), version)

    push = BroadcastWeightPush(urls, sglang_config)          # rank 0 and the servers form the broadcast group
    stats = push.push(HFWeightStream(model, arch, bridge, bucket_bytes=b), version)
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import Callable, Optional, Sequence
from urllib.parse import urlsplit

import ray.util
import torch
import torch.distributed as dist

from megatron_zero.config.sglang import SGLangConfig
from megatron_zero.parallel.reshard import SENDER_RANK, HFWeightStream
from megatron_zero.parallel.weight_broadcast import abandon_rendezvous, init_weight_broadcast_group
from megatron_zero.rollout.engine import WeightUpdateStats
from megatron_zero.rollout.fp8_weights import encode_bucket
from megatron_zero.rollout.sglang_engine import SGLangEngine
from megatron_zero.rollout.sglang_weights import (
    WEIGHT_GROUP_NAME, broadcast_bucket, serialize_flattened_bucket, wait_first_failure,
)
from megatron_zero.cluster.node_files import free_port

logger = logging.getLogger(__name__)

# bucket -> (payload string for the server, buffer to keep alive until the server has copied it)
Serializer = Callable[[Sequence[tuple[str, torch.Tensor]]], tuple[str, torch.Tensor]]


class ColocatedWeightPush:
    """This rank's part in pushing weights to the colocated SGLang engines at ``engine_urls`` (engine order)."""

    def __init__(self, engine_urls: Sequence[str], config: SGLangConfig,
                 serialize: Serializer = serialize_flattened_bucket, *, quantization: Optional[str] = None) -> None:
        tp, world = config.tp_size, dist.get_world_size()
        if len(engine_urls) * tp != world:
            raise ValueError(f"{len(engine_urls)} engines x rollout.sglang.tp_size={tp} GPUs != {world} Megatron "
                             "ranks: every rank must share its GPU with exactly one server rank")
        self.rank = dist.get_rank()
        self.engine_index, self.server_rank = divmod(self.rank, tp)
        self.leader = self.engine_index * tp
        # Every rank creates every group, in the same order (torch.distributed requires it). gloo: only the
        # payload strings travel here; the tensors stay on their GPUs.
        groups = [dist.new_group(list(range(i * tp, (i + 1) * tp)), backend="gloo") for i in range(len(engine_urls))]
        self.group = groups[self.engine_index]
        self.serialize = serialize
        self.quantization = quantization  # rollout.quantization: what each bucket becomes before it leaves
        self.engine: Optional[SGLangEngine] = None
        if self.rank == self.leader:
            self.engine = _engine_at(engine_urls[self.engine_index], config)

    def push(self, stream: HFWeightStream, version: int) -> Optional[WeightUpdateStats]:
        """Send every bucket of ``stream`` (built with ``all_ranks=True``); the engine's stats on its first rank."""
        if not stream.all_ranks:
            raise ValueError("ColocatedWeightPush needs HFWeightStream(all_ranks=True): every rank feeds its "
                             "server rank")
        if self.engine is not None:
            self.engine.begin_weight_update(version)
        for bucket in stream:
            bucket = encode_bucket(bucket, self.quantization)
            payload, buffer = self.serialize(bucket)
            payloads: Optional[list] = [None] * self.group.size() if self.engine is not None else None
            dist.gather_object(payload, payloads, dst=self.leader, group=self.group)
            if self.engine is not None:
                self.engine.update_weights_from_ranks(bucket, payloads)
            # Each rank keeps its buffer alive until the server has copied it (the leader's request returned).
            dist.barrier(group=self.group)
            del buffer
        return self.engine.finish_weight_update() if self.engine is not None else None


def _engine_at(url: str, config: SGLangConfig) -> SGLangEngine:
    parts = urlsplit(url)
    return SGLangEngine(dataclasses.replace(config, host=parts.hostname, port=parts.port))


class BroadcastWeightPush:
    """Rank 0 broadcasts the policy to disaggregated SGLang engines at ``engine_urls``; see the module docstring.

    Built on every rank (collective construction); only rank 0 opens the group: it picks a free port on its node
    (``master_address``: this node's IP by default), drops a group an engine kept from an earlier run, asks every
    engine to join, joins itself, and fails at the first engine that refuses instead of waiting for the
    rendezvous timeout. ``backend``: "nccl" (GPU tensors) or
    "gloo" (CPU tensors, tests).
    """

    def __init__(self, engine_urls: Sequence[str], config: SGLangConfig, *, backend: str,
                 master_address: Optional[str] = None, quantization: Optional[str] = None) -> None:
        if not engine_urls:
            raise ValueError("BroadcastWeightPush needs at least one engine url")
        self.config = config
        self.quantization = quantization  # rollout.quantization: what each bucket becomes before it leaves
        self.engines = []
        self.group: Optional[dist.ProcessGroup] = None
        if dist.get_rank() != SENDER_RANK:
            return
        if master_address is None:
            master_address = ray.util.get_node_ip_address()
        master_port = free_port()
        world_size = 1 + len(engine_urls) * config.tp_size
        self.engines = [_engine_at(url, config) for url in engine_urls]
        for engine in self.engines:
            if engine.destroy_weights_update_group():
                logger.info("%s still had a weight broadcast group from an earlier run; dropped it", engine.url)
        joined = {engine.init_weights_update_group(master_address, master_port, rank_offset=1 + i * config.tp_size,
                                                   world_size=world_size, backend=backend): engine.url
                  for i, engine in enumerate(self.engines)}
        # This side's rendezvous blocks until every server joined; in a daemon thread, so a failed engine leaves
        # nothing that holds the process open until the rendezvous timeout.
        own: concurrent.futures.Future = concurrent.futures.Future()
        abandoned = threading.Event()

        def join() -> None:
            try:
                own.set_result(init_weight_broadcast_group(master_address, master_port, 0, world_size, backend=backend,
                                                           timeout_s=config.control_timeout_s,
                                                           group_name=WEIGHT_GROUP_NAME, abandoned=abandoned))
            except BaseException as error:  # handed to the waiting thread, which raises it
                own.set_exception(error)

        joining = threading.Thread(target=join, name="weight-group-join", daemon=True)
        joining.start()
        joined[own] = f"the trainer (rank 0, {master_address}:{master_port})"
        try:
            wait_first_failure(joined, config.control_timeout_s, f"joining the weight broadcast group of "
                               f"{world_size} ranks at {master_address}:{master_port} (sglang.control_timeout_s)")
        except BaseException:
            abandon_rendezvous(master_address, master_port, world_size, abandoned, joining)
            raise
        self.group = own.result()
        logger.info("weight broadcast group up: rank 0 + %d engine(s) x %d server rank(s), %s at %s:%d",
                    len(self.engines), config.tp_size, backend, master_address, master_port)

    def push(self, stream: HFWeightStream, version: int) -> Optional[WeightUpdateStats]:
        """Send every bucket of ``stream`` (built with ``all_ranks=False``); the sync's stats on rank 0."""
        if stream.all_ranks:
            raise ValueError("BroadcastWeightPush sends from rank 0 only: build HFWeightStream(all_ranks=False)")
        if self.group is None:
            stream.drain()  # this rank's part in the gathers
            return None
        start = time.perf_counter()
        for engine in self.engines:
            engine.begin_weight_update(version)
        for bucket in stream:
            bucket = encode_bucket(bucket, self.quantization)
            answers = [(engine.url, engine.post_weights_from_distributed(bucket)) for engine in self.engines]
            broadcast_bucket(bucket, self.group, answers, self.config.control_timeout_s)
        per_engine = [engine.finish_weight_update() for engine in self.engines]
        return dataclasses.replace(per_engine[0], seconds=time.perf_counter() - start)
