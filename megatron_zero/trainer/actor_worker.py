"""What each Megatron rank hosts in its Ray worker: the policy, the frozen reference, the weight stream.

Built by ``RayActorGroup.setup("megatron_zero.trainer.actor_worker:ActorWorker", ...)`` after the
group has initialised torch.distributed and megatron's parallel state. Every method is called on
all ranks at once (they run collectives). The batch methods are ``DP_SHARDED`` (``dispatch.py``): each
data-parallel replica gets its own shard of the batch and its leader returns the replica's result; the
others are ``ALL_RANKS``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import ray
import torch

from megatron_zero.actor.actor import MegatronActor, ReferenceModel
from megatron_zero.actor.batching import ActorBatch
from megatron_zero.config.actor import ActorConfig
from megatron_zero.config.algorithm import PolicyLossConfig
from megatron_zero.config.model import ModelConfig
from megatron_zero.config.sglang import SGLangConfig
from megatron_zero.models.mcore_checkpoint import read_checkpoint_info
from megatron_zero.parallel.reshard import HFWeightStream
from megatron_zero.rollout.fp8_weights import encode_bucket, fp8_as_bytes
from megatron_zero.trainer.dispatch import Dispatch, RankLayout, register
from megatron_zero.trainer.weight_push import BroadcastWeightPush, ColocatedWeightPush

logger = logging.getLogger(__name__)


class ActorWorker:
    def __init__(self, mcore_dir: str, actor: ActorConfig, loss: PolicyLossConfig, model: ModelConfig,
                 with_reference: bool, engine_urls: Optional[list[str]] = None,
                 sglang: Optional[SGLangConfig] = None, quantization: Optional[str] = None) -> None:
        """``quantization``: rollout.quantization, what the weights become on their way to the engines."""
        self.info = read_checkpoint_info(mcore_dir)
        self.model_config = model
        self.actor = MegatronActor(actor, loss, model, mcore_dir)
        # The reference is only needed for the KL term; it stays frozen at the base weights.
        self.reference = ReferenceModel(mcore_dir, model, actor) if with_reference else None
        self.layout = RankLayout.current()
        # SGLang servers (engine_urls, in engine order) take weights from the ranks, not through the driver
        # (weight_push.py): colocated, every rank feeds the server rank on its GPU; disaggregated, rank 0
        # broadcasts to all of them (NCCL; gloo when the tensors are on CPU, as in the tests).
        self.quantization = quantization
        self.weight_push: Optional[ColocatedWeightPush | BroadcastWeightPush] = None
        if engine_urls and sglang.colocated:
            self.weight_push = ColocatedWeightPush(engine_urls, sglang, quantization=quantization)
        elif engine_urls:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            self.weight_push = BroadcastWeightPush(engine_urls, sglang, backend=backend, quantization=quantization)

    def _replica_result(self, value):
        """``value`` from the replica's leader, None from its other ranks (which hold the same)."""
        return value if self.layout.is_replica_leader else None

    @register(Dispatch.DP_SHARDED)
    def logprobs(self, shard: ActorBatch) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """Old-policy log-probs and entropies [rows, width] of this replica's rows."""
        return self._replica_result(self.actor.compute_logprobs(shard))

    @register(Dispatch.DP_SHARDED)
    def ref_logprobs(self, shard: ActorBatch) -> Optional[torch.Tensor]:
        if self.reference is None:
            raise RuntimeError("ref_logprobs called but the worker was built without a reference model "
                               "(loss.kl_coef is 0)")
        return self._replica_result(self.reference.compute_logprobs(shard))

    @register(Dispatch.DP_SHARDED)
    def train(self, shard: ActorBatch, max_response_length: int) -> Optional[dict[str, float]]:
        """One optimizer step on the mini-batch the replicas' shards make up together (DDP reduces the
        gradients). The metrics are global (reduced over DP) but ``replica_model_tokens``: the token positions
        this replica's model ran in this step, counted from its inputs."""
        counted = self.actor.tokens.num_tokens
        metrics = self.actor.train_step(shard, max_response_length=max_response_length)
        metrics["replica_model_tokens"] = float(self.actor.tokens.num_tokens - counted)
        return self._replica_result(metrics)

    def model_tokens(self) -> dict[str, int]:
        """Token positions this rank's policy and reference models have run since they were built."""
        return {"policy": self.actor.tokens.num_tokens,
                "reference": self.reference.tokens.num_tokens if self.reference is not None else 0}

    def _weight_stream(self, bucket_bytes: int, all_ranks: bool = False) -> HFWeightStream:
        return HFWeightStream(self.actor.model, self.info.arch, self.info.bridge, bucket_bytes=bucket_bytes,
                              all_ranks=all_ranks, node_id=ray.get_runtime_context().get_node_id())

    def weight_buckets(self, bucket_bytes: int) -> tuple[Optional[list[list[tuple[str, torch.Tensor]]]], dict]:
        """The policy's weights as HF-named buckets on rank 0 (copied: they leave this process), encoded for
        rollout.quantization (FP8 tensors as their bytes: ``fp8_from_bytes`` restores them), None elsewhere; and
        every rank's stats: the bytes it received resharding and, on rank 0, the bytes of the buckets as sent."""
        stream = self._weight_stream(bucket_bytes)
        buckets = None
        if stream.is_sender:
            buckets = [encode_bucket([(name, tensor.detach().clone()) for name, tensor in bucket], self.quantization)
                       for bucket in stream]
        else:
            stream.drain()
        stats = stream.stats
        sent = sum(t.numel() * t.element_size() for bucket in buckets or [] for _, t in bucket)
        buckets = None if buckets is None else [fp8_as_bytes(bucket) for bucket in buckets]
        return buckets, {"reshard_seconds": stats.seconds, "bytes": sent, "buckets": stats.num_buckets,
                         "received_bytes": stats.received_bytes}

    def push_weights(self, version: int, bucket_bytes: int) -> dict[str, Any]:
        """Send the policy to the SGLang engines (every rank takes part). Every rank returns the bytes it
        received resharding; where an engine reported, also its sync's seconds and bytes."""
        if self.weight_push is None:
            raise RuntimeError("push_weights: this worker was built without SGLang engines (engine_urls)")
        stream = self._weight_stream(bucket_bytes, all_ranks=isinstance(self.weight_push, ColocatedWeightPush))
        stats = self.weight_push.push(stream, version)
        engine = None if stats is None else {"seconds": stats.seconds, "bytes": float(stats.num_bytes)}
        return {"engine": engine, "received_bytes": stream.stats.received_bytes}

    def offload(self) -> dict[str, int]:
        """Free the actor's device memory (weights, grads, optimizer state) for the colocated engine."""
        return self.actor.offload().bytes_by_kind

    def onload(self) -> dict[str, int]:
        return self.actor.onload().bytes_by_kind

    def save(self, checkpoint_dir: str) -> None:
        self.actor.save_checkpoint(Path(checkpoint_dir))

    def load(self, checkpoint_dir: str) -> None:
        self.actor.load_checkpoint(Path(checkpoint_dir))
