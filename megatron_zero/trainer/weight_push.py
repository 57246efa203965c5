"""Colocated weight sync from every Megatron rank straight into the SGLang server on its own GPU.

Why: colocated SGLang servers take new weights as CUDA IPC handles (``/update_weights_from_tensor``), which only
a process holding the tensors on a GPU can create, and which a server rank opens cheaply only for a buffer on
its own GPU. Routing buckets through the driver would copy the model through host memory and needs CUDA in
the driver. So, as in slime's colocated mode, every rank receives every HF bucket
(``HFWeightStream(all_ranks=True)``: TP gather, then a broadcast from the owning stage), serialises its own copy
for the server rank that shares its GPU, and the first rank of each engine gathers the ``tp_size`` payloads and
posts them in one request. The driver only starts the push and collects the engines' stats.

Layout (from ``rollout/sglang_servers.plan_engines``): engine i runs on the GPUs of ranks
``[i * tp, (i + 1) * tp)``; its server rank j on the GPU of rank ``i * tp + j``, so entry j of the request is rank
``i * tp + j``'s payload.

How (on every rank, inside the rank workers)::

    push = ColocatedWeightPush(urls, sglang_config)          # collective: creates one gloo group per engine
    stats = push.push(HFWeightStream(model, arch, bridge, bucket_bytes=b, all_ranks=True), version)
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Optional, Sequence
from urllib.parse import urlsplit

import torch
import torch.distributed as dist

from megatron_zero.config.sglang import SGLangConfig
from megatron_zero.parallel.reshard import HFWeightStream
from megatron_zero.rollout.engine import WeightUpdateStats

logger = logging.getLogger(__name__)

# bucket -> (payload string for the server, buffer to keep alive until the server has copied it)
Serializer = Callable[[Sequence[tuple[str, torch.Tensor]]], tuple[str, torch.Tensor]]


def _serialize_for_sglang(bucket: Sequence[tuple[str, torch.Tensor]]) -> tuple[str, torch.Tensor]:
    from megatron_zero.rollout.sglang_engine import serialize_flattened_bucket

    return serialize_flattened_bucket(bucket)


class ColocatedWeightPush:
    """This rank's part in pushing weights to the colocated SGLang engines at ``engine_urls`` (engine order)."""

    def __init__(self, engine_urls: Sequence[str], config: SGLangConfig,
                 serialize: Serializer = _serialize_for_sglang) -> None:
        from megatron_zero.rollout.sglang_engine import SGLangEngine

        tp, world = config.tp_size, dist.get_world_size()
        if len(engine_urls) * tp != world:
            raise ValueError(f"{len(engine_urls)} engines x sglang.tp_size={tp} GPUs != {world} Megatron ranks: "
                             "every rank must share its GPU with exactly one server rank")
        self.rank = dist.get_rank()
        self.engine_index, self.server_rank = divmod(self.rank, tp)
        self.leader = self.engine_index * tp
        # Every rank creates every group, in the same order (torch.distributed requires it). gloo: only the
        # payload strings travel here; the tensors stay on their GPUs.
        groups = [dist.new_group(list(range(i * tp, (i + 1) * tp)), backend="gloo") for i in range(len(engine_urls))]
        self.group = groups[self.engine_index]
        self.serialize = serialize
        self.engine: Optional[SGLangEngine] = None
        if self.rank == self.leader:
            url = urlsplit(engine_urls[self.engine_index])
            self.engine = SGLangEngine(dataclasses.replace(config, host=url.hostname, port=url.port))

    def push(self, stream: HFWeightStream, version: int) -> Optional[WeightUpdateStats]:
        """Send every bucket of ``stream`` (built with ``all_ranks=True``); the engine's stats on its first rank."""
        if not stream.all_ranks:
            raise ValueError("ColocatedWeightPush needs HFWeightStream(all_ranks=True): every rank feeds its "
                             "server rank")
        if self.engine is not None:
            self.engine.begin_weight_update(version)
        for bucket in stream:
            payload, buffer = self.serialize(bucket)
            payloads: Optional[list] = [None] * self.group.size() if self.engine is not None else None
            dist.gather_object(payload, payloads, dst=self.leader, group=self.group)
            if self.engine is not None:
                self.engine.update_weights_from_ranks(bucket, payloads)
            # Each rank keeps its buffer alive until the server has copied it (the leader's request returned).
            dist.barrier(group=self.group)
            del buffer
        return self.engine.finish_weight_update() if self.engine is not None else None
