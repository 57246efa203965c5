"""What each Megatron rank hosts in its Ray worker: the policy, the frozen reference, the weight stream.

Built by ``RayActorGroup.setup("megatron_zero.trainer.actor_worker:ActorWorker", ...)`` after the
group has initialised torch.distributed and megatron's parallel state. Every method is called on
all ranks at once (they run collectives); results that only one rank holds are returned by that
rank and None by the others.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch

from megatron_zero.actor.actor import MegatronActor, ReferenceModel
from megatron_zero.actor.batching import ActorBatch
from megatron_zero.config.actor import ActorConfig
from megatron_zero.config.algorithm import PolicyLossConfig
from megatron_zero.config.model import ModelConfig
from megatron_zero.config.sglang import SGLangConfig
from megatron_zero.models.mcore_checkpoint import read_checkpoint_info
from megatron_zero.parallel.reshard import HFWeightStream
from megatron_zero.trainer.weight_push import BroadcastWeightPush, ColocatedWeightPush

logger = logging.getLogger(__name__)


class ActorWorker:
    def __init__(self, mcore_dir: str, actor: ActorConfig, loss: PolicyLossConfig, model: ModelConfig,
                 with_reference: bool, engine_urls: Optional[list[str]] = None,
                 sglang: Optional[SGLangConfig] = None) -> None:
        self.info = read_checkpoint_info(mcore_dir)
        self.model_config = model
        self.actor = MegatronActor(actor, loss, model, mcore_dir)
        # The reference is only needed for the KL term; it stays frozen at the base weights.
        self.reference = ReferenceModel(mcore_dir, model, actor) if with_reference else None
        self.rank = torch.distributed.get_rank()
        # SGLang servers (engine_urls, in engine order) take weights from the ranks, not through the driver
        # (weight_push.py): colocated, every rank feeds the server rank on its GPU; disaggregated, rank 0
        # broadcasts to all of them (NCCL; gloo when the tensors are on CPU, as in the tests).
        self.weight_push: Optional[ColocatedWeightPush | BroadcastWeightPush] = None
        if engine_urls and sglang.colocated:
            self.weight_push = ColocatedWeightPush(engine_urls, sglang)
        elif engine_urls:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            self.weight_push = BroadcastWeightPush(engine_urls, sglang, backend=backend)

    def logprobs(self, batch: ActorBatch) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        logp, entropy = self.actor.compute_logprobs(batch)
        return (logp, entropy) if self.rank == 0 else None

    def ref_logprobs(self, batch: ActorBatch) -> Optional[torch.Tensor]:
        if self.reference is None:
            raise RuntimeError("ref_logprobs called but the worker was built without a reference model "
                               "(loss.kl_coef is 0)")
        logp = self.reference.compute_logprobs(batch)
        return logp if self.rank == 0 else None

    def train(self, batch: ActorBatch, max_response_length: int) -> Optional[dict[str, float]]:
        metrics = self.actor.train_step(batch, max_response_length=max_response_length)
        return metrics if self.rank == 0 else None

    def weight_buckets(self, bucket_bytes: int) -> Optional[tuple[list[list[tuple[str, torch.Tensor]]], dict]]:
        """The policy's weights as HF-named buckets, on rank 0 (copied: they leave this process)."""
        stream = HFWeightStream(self.actor.model, self.info.arch, self.info.bridge, bucket_bytes=bucket_bytes)
        if not stream.is_sender:
            stream.drain()
            return None
        buckets = [[(name, tensor.detach().clone()) for name, tensor in bucket] for bucket in stream]
        stats = stream.stats
        return buckets, {"reshard_seconds": stats.seconds, "bytes": stats.num_bytes, "buckets": stats.num_buckets}

    def push_weights(self, version: int, bucket_bytes: int) -> Optional[dict[str, float]]:
        """Send the policy to the SGLang engines (every rank takes part); stats where an engine reported."""
        if self.weight_push is None:
            raise RuntimeError("push_weights: this worker was built without SGLang engines (engine_urls)")
        stream = HFWeightStream(self.actor.model, self.info.arch, self.info.bridge, bucket_bytes=bucket_bytes,
                                all_ranks=isinstance(self.weight_push, ColocatedWeightPush))
        stats = self.weight_push.push(stream, version)
        if stats is None:
            return None
        return {"seconds": stats.seconds, "bytes": float(stats.num_bytes)}

    def offload(self) -> dict[str, int]:
        """Free the actor's device memory (weights, grads, optimizer state) for the colocated engine."""
        return self.actor.offload().bytes_by_kind

    def onload(self) -> dict[str, int]:
        return self.actor.onload().bytes_by_kind

    def save(self, checkpoint_dir: str) -> None:
        self.actor.save_checkpoint(Path(checkpoint_dir))

    def load(self, checkpoint_dir: str) -> None:
        self.actor.load_checkpoint(Path(checkpoint_dir))
