"""Reshard the Megatron actor's weights (any TP x PP) into size-bounded buckets of HF-named tensors.

Why: after every training step the rollout engines need the new policy in the HF layout they load
(``RolloutEngine.sync_weights(buckets, version)``). The HF <-> Megatron mapping already exists once,
in the model bridge, for the *canonical* layout (full tensors, global layer numbers); resharding is
therefore only "local parameters -> canonical tensors", followed by ``bridge.mcore_to_hf``.

How (every rank of the actor job runs the same code; only the sender gets buckets)::

    stream = HFWeightStream(actor.model, arch, bridge, bucket_bytes=512 * 2**20)
    if stream.is_sender:
        engine.sync_weights(stream, version=step)
    else:
        stream.drain()               # takes part in the collectives, yields nothing
    logger.info("weight sync %.2f s, %.2f GB/s", stream.stats.seconds, stream.stats.gb_per_s)

Local -> canonical names:
* ``decoder.layers.<i>`` of a pipeline stage is a *local* index; the TransformerLayer's
  ``layer_number`` (1-based, global: megatron adds the stage's offset) gives the global one.
* Transformer Engine layers fuse the pre-attention and pre-MLP norms into the following linear
  (``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``); they are renamed to the local
  spec's ``input_layernorm.weight`` / ``pre_mlp_layernorm.weight`` (the same map megatron-core's local
  spec declares for checkpoints).
* With tied embeddings and PP > 1 the last stage holds ``output_layer.weight``, a copy of the
  embedding kept equal by megatron's gradient all-reduce; the canonical layout has no such tensor,
  so the embedding is sent once, from the first stage.

TP gather (megatron's ``tensor_model_parallel`` / ``partition_dim`` parameter attributes tell which
parameters are split and along which dimension): a gather onto TP rank 0 of the TP group, then
* ``linear_qkv`` (weight and bias), the vocabulary-parallel embedding and output layer, and the
  row-parallel ``linear_proj`` / ``linear_fc2`` (dim 1): a plain concatenation. For QKV this
  reproduces the canonical grouped layout because each TP rank owns whole query groups
  (``[g0: q..q k v][g1: ...]``, ranks in group order); the tests check it bit for bit.
* ``linear_fc1``: each rank holds ``[gate_shard; up_shard]``, so every shard is split in halves and
  the gates are concatenated before the ups, giving the canonical ``[gate; up]``.

Collecting the pipeline stages (design choice): one sender, global rank 0 (first stage, TP rank 0,
data/context-parallel rank 0). Every rank walks the same global order of canonical names (the
bridge's ``weight_mappings``); for each name the owning stage's TP group of DP/CP rank 0 gathers it
onto its TP rank 0, and if that stage is not the sender's, its TP rank 0 sends the full tensor to rank 0 (point-to-point,
shape and dtype known from a metadata exchange at the start). Other data-parallel replicas do
nothing but the metadata exchange. This suits engines fed from one process (the CPU torch engine, or
disaggregated SGLang servers that rank 0 broadcasts to, ``trainer/weight_push.py``).

Every rank (``all_ranks=True``), for colocated SGLang servers (``trainer/weight_push.py``, slime's colocated
style): every GPU must hold each bucket to hand it to the server rank on the same GPU, and every data-parallel
replica already holds the whole model, so each replica serves itself and nothing crosses between replicas. At
PP=1 a rank gets each tensor by an all-gather within its own TP group (one node); at PP>1 the stage that owns a
tensor first broadcasts each TP shard over the pipeline group (the ranks of the same replica and TP rank on the
other stages), so a stage receives only the shards it lacks, 1/TP of the tensor per rank, before the same TP
all-gather. Each rank counts the bytes it received by kind (``ReshardStats.received_bytes``): from TP peers, from
another stage, and of those, from a rank on another node (``node_id``: each rank's node, e.g. its Ray node id).

Buckets: tensors are packed in order into buckets of at most ``bucket_bytes``; a single HF tensor
larger than that is sent alone in its own bucket (the only case a bucket exceeds the bound), since
splitting a tensor would force every engine to reassemble it.

Bucket tensors may alias the actor's parameters (TP=1 tensors under an identity mapping): consume
each bucket before the next optimizer step. Nothing here is an engine; engines only see buckets.
"""

from __future__ import annotations

import logging
import re
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from megatron_zero.models.common.architecture import DecoderArchitecture
from megatron_zero.models.common.bridge import ModelBridge

logger = logging.getLogger(__name__)

SENDER_RANK = 0
RECEIVED_KINDS = ("tp_gather", "cross_stage", "cross_node")
_LOCAL_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# Transformer Engine parameter names -> local-spec names (megatron-core's local spec maps the same pairs).
_TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
_GATED_FC1 = "mlp.linear_fc1.weight"
_TIED_OUTPUT = "output_layer.weight"


@dataclass
class ReshardStats:
    """One sync as seen by the actor: what was sent and how long it took.

    ``seconds`` is the wall time from the first bucket request to the end of the stream, consumer
    included (what a training step waits for); ``reshard_seconds`` only the time spent gathering and
    packing inside the stream.
    """

    num_tensors: int = 0
    num_bytes: int = 0
    num_buckets: int = 0
    max_bucket_bytes: int = 0
    seconds: float = 0.0
    reshard_seconds: float = 0.0
    # Bytes this rank received while resharding: "tp_gather" from its TP peers, "cross_stage" from another
    # pipeline stage, "cross_node" the part of those two that came from a rank on another node.
    received_bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RECEIVED_KINDS, 0))

    @property
    def gb_per_s(self) -> float:
        return self.num_bytes / 1e9 / self.seconds if self.seconds > 0 else float("nan")


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside megatron's DistributedDataParallel (or any ``.module`` wrapper)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def local_canonical_params(model: torch.nn.Module, arch: DecoderArchitecture) -> dict[str, torch.nn.Parameter]:
    """This rank's parameters under their canonical names (global layer numbers, local-spec names)."""
    gpt = unwrap_model(model)
    layer_offsets: dict[int, int] = {}
    if hasattr(gpt, "decoder"):
        for local_index, layer in enumerate(gpt.decoder.layers):
            layer_offsets[local_index] = layer.layer_number - 1  # layer_number is global and 1-based
    params: dict[str, torch.nn.Parameter] = {}
    for name, param in gpt.named_parameters():
        if arch.tie_word_embeddings and name == _TIED_OUTPUT:
            continue  # a copy of the embedding on the last stage (module docstring)
        match = _LOCAL_LAYER_RE.match(name)
        if match:
            suffix = _TE_ALIASES.get(match.group(2), match.group(2))
            name = f"decoder.layers.{layer_offsets[int(match.group(1))]}.{suffix}"
        params[name] = param
    return params


def _is_tp_split(param: torch.Tensor, tp_size: int) -> bool:
    return tp_size > 1 and bool(getattr(param, "tensor_model_parallel", False))


def _join_tp_shards(name: str, shards: list[torch.Tensor], partition_dim: int) -> torch.Tensor:
    """The canonical tensor from its TP shards in TP-rank order."""
    if name.endswith(_GATED_FC1):
        # Each shard is [gate_shard; up_shard]; canonical is [gate; up].
        halves = [torch.chunk(shard, 2, dim=0) for shard in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=partition_dim)


@dataclass(frozen=True)
class _Owner:
    """Where a canonical tensor lives: the rank that sends it to the sender, its full shape, and its TP shards."""

    pp_rank: int
    global_rank: int  # TP rank 0, DP/CP rank 0 of the owning stage
    shape: tuple[int, ...]
    dtype: torch.dtype
    partition_dim: Optional[int]  # None: not split over TP (every TP rank holds the whole tensor)
    local_shape: tuple[int, ...]  # one TP rank's shard


class HFWeightStream:
    """Iterable of HF-named buckets on the sender; iterate (or ``drain``) on every rank of the actor job."""

    def __init__(self, model: torch.nn.Module, arch: DecoderArchitecture, bridge: ModelBridge, *,
                 bucket_bytes: int, all_ranks: bool = False, node_id: Optional[str] = None) -> None:
        from megatron.core import parallel_state

        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes={bucket_bytes} must be >= 1 (bytes per bucket of HF tensors)")
        self.model, self.arch, self.bridge, self.bucket_bytes = model, arch, bridge, bucket_bytes
        self.mappings = bridge.mapping_by_mcore_name(arch)
        self.order = [m.mcore for m in bridge.weight_mappings(arch)]
        self.rank = dist.get_rank()
        # all_ranks: every rank gets every bucket (each owner broadcasts its tensors to the world), for engines
        # fed from every GPU at once (weight_push.py); otherwise only SENDER_RANK does.
        self.all_ranks = all_ranks
        self.is_sender = all_ranks or self.rank == SENDER_RANK
        self.pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        self.pp_group = parallel_state.get_pipeline_model_parallel_group()
        self.pp_ranks = dist.get_process_group_ranks(self.pp_group)  # global ranks in stage order
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.tp_size = parallel_state.get_tensor_model_parallel_world_size()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.tp_ranks = dist.get_process_group_ranks(self.tp_group)  # global ranks in TP-rank order
        # Which node each rank is on, to count the bytes that crossed nodes; exchanged with the owners.
        self.node_id = node_id or socket.gethostname()
        self._node_of_rank: list[str] = []
        # Only one data/context-parallel replica of each stage gathers; the others hold the same weights.
        self.is_gatherer = parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0
        self.stats = ReshardStats()
        self._owners: Optional[dict[str, _Owner]] = None

    # ---- one-time metadata ----------------------------------------------------------------------

    def _local_params(self) -> dict[str, torch.nn.Parameter]:
        params = local_canonical_params(self.model, self.arch)
        unmapped = sorted(set(params) - set(self.mappings))
        if unmapped:
            raise KeyError(f"rank {self.rank}: Megatron parameters without an HF mapping for model_type="
                           f"{self.arch.model_type!r}: {unmapped}")
        return params

    def _exchange_owners(self, params: dict[str, torch.nn.Parameter]) -> dict[str, _Owner]:
        """Every rank learns who sends each canonical tensor, with its full shape, and every rank's node
        (collective on the world)."""
        mine: dict[str, tuple] = {}
        if self.is_gatherer and self.tp_rank == 0:
            for name, param in params.items():
                shape = list(param.shape)
                partition_dim = param.partition_dim if _is_tp_split(param, self.tp_size) else None
                if partition_dim is not None:
                    shape[partition_dim] *= self.tp_size
                mine[name] = (tuple(shape), param.dtype, partition_dim, tuple(param.shape))
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (self.rank, self.pp_rank, self.node_id, mine))
        self._node_of_rank = [node for _, _, node, _ in everyone]
        owners: dict[str, _Owner] = {}
        for rank, pp_rank, _, names in everyone:
            for name, (shape, dtype, partition_dim, local_shape) in names.items():
                if name in owners:
                    raise AssertionError(f"{name} is owned by ranks {owners[name].global_rank} and {rank}")
                owners[name] = _Owner(pp_rank, rank, shape, dtype, partition_dim, local_shape)
        missing = [name for name in self.order if name not in owners]
        if missing:
            raise KeyError(f"canonical tensors no pipeline stage holds (model_type={self.arch.model_type!r}): {missing}")
        return owners

    # ---- the stream -----------------------------------------------------------------------------

    def _received(self, tensor: torch.Tensor, src: int, kind: str) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        self._received_bytes[kind] += nbytes
        if self._node_of_rank[src] != self.node_id:
            self._received_bytes["cross_node"] += nbytes

    def _gather_tp(self, name: str, local: torch.Tensor, owner: _Owner) -> Optional[torch.Tensor]:
        """The full canonical tensor on TP rank 0 (None on the others) from this TP group's shards."""
        if owner.partition_dim is None:
            return local if self.tp_rank == 0 else None
        # gather, not all_gather: only TP rank 0 sends on, so the other ranks need no copy.
        shards = [torch.empty_like(local) for _ in range(self.tp_size)] if self.tp_rank == 0 else None
        dist.gather(local.contiguous(), shards, group_dst=0, group=self.tp_group)
        if shards is None:
            return None
        for peer in self.tp_ranks[1:]:
            self._received(local, peer, "tp_gather")
        return _join_tp_shards(name, shards, owner.partition_dim)

    def _all_gather_tp(self, name: str, local: torch.Tensor, owner: _Owner) -> torch.Tensor:
        """The full canonical tensor on every rank of this TP group."""
        if owner.partition_dim is None:
            return local
        shards = [torch.empty_like(local) for _ in range(self.tp_size)]
        dist.all_gather(shards, local.contiguous(), group=self.tp_group)
        for peer in self.tp_ranks:
            if peer != self.rank:
                self._received(local, peer, "tp_gather")
        return _join_tp_shards(name, shards, owner.partition_dim)

    def _canonical_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full canonical tensors in global order, on the sender(s); other ranks only do their part."""
        params = self._local_params()
        if self._owners is None:
            self._owners = self._exchange_owners(params)
        device = next(iter(params.values())).device if params else torch.device("cpu")
        for name in self.order:
            owner = self._owners[name]
            if self.all_ranks:
                yield name, self._replica_local_tensor(name, params, owner, device)
                continue
            full = None
            if self.is_gatherer and owner.pp_rank == self.pp_rank:
                full = self._gather_tp(name, params[name].detach(), owner)
                if full is not None and tuple(full.shape) != owner.shape:
                    raise AssertionError(f"{name}: gathered {tuple(full.shape)}, expected {owner.shape}")
            if owner.global_rank == self.rank:
                if not self.is_sender:
                    dist.send(full.contiguous(), dst=SENDER_RANK)
                    continue
            elif self.is_sender:
                full = torch.empty(owner.shape, dtype=owner.dtype, device=device)
                dist.recv(full, src=owner.global_rank)
                self._received(full, owner.global_rank, "cross_stage")
            if self.is_sender:
                yield name, full

    def _replica_local_tensor(self, name: str, params: dict[str, torch.nn.Parameter], owner: _Owner,
                              device: torch.device) -> torch.Tensor:
        """The full tensor on this rank from its own replica (module docstring): the owning stage's shard over
        the pipeline group when this stage lacks it, then the TP all-gather."""
        if owner.pp_rank == self.pp_rank:
            local = params[name].detach().contiguous()
        else:
            local = torch.empty(owner.local_shape, dtype=owner.dtype, device=device)
        if len(self.pp_ranks) > 1:
            src = self.pp_ranks[owner.pp_rank]
            dist.broadcast(local, src=src, group=self.pp_group)
            if src != self.rank:
                self._received(local, src, "cross_stage")
        full = self._all_gather_tp(name, local, owner)
        if tuple(full.shape) != owner.shape:
            raise AssertionError(f"{name}: assembled {tuple(full.shape)}, expected {owner.shape}")
        return full

    def _buckets(self) -> Iterator[list[tuple[str, torch.Tensor]]]:
        bucket: list[tuple[str, torch.Tensor]] = []
        size = 0
        for name, full in self._canonical_tensors():
            for hf_name, tensor in self.bridge.mcore_to_hf(self.arch, name, full, self.mappings):
                nbytes = tensor.numel() * tensor.element_size()
                if bucket and size + nbytes > self.bucket_bytes:
                    yield bucket
                    bucket, size = [], 0
                bucket.append((hf_name, tensor))
                size += nbytes
        if bucket:
            yield bucket

    def __iter__(self) -> Iterator[list[tuple[str, torch.Tensor]]]:
        stats = ReshardStats()
        self._received_bytes = stats.received_bytes
        start = time.perf_counter()
        inside = 0.0
        buckets = self._buckets()
        while True:
            entered = time.perf_counter()
            bucket = next(buckets, None)
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # GPU copies are asynchronous; time what has finished
            inside += time.perf_counter() - entered
            if bucket is None:
                break
            nbytes = sum(t.numel() * t.element_size() for _, t in bucket)
            stats.num_buckets += 1
            stats.num_tensors += len(bucket)
            stats.num_bytes += nbytes
            stats.max_bucket_bytes = max(stats.max_bucket_bytes, nbytes)
            yield bucket
        stats.seconds = time.perf_counter() - start
        stats.reshard_seconds = inside
        self.stats = stats
        if self.is_sender:
            logger.info("weight stream: %d tensors in %d buckets, %.1f MiB, %.3f s (%.3f s resharding), %.2f GB/s",
                        stats.num_tensors, stats.num_buckets, stats.num_bytes / 2**20, stats.seconds,
                        stats.reshard_seconds, stats.gb_per_s)

    def drain(self) -> ReshardStats:
        """Run the whole stream, dropping buckets: what non-sender ranks call (the sender may too)."""
        for _ in self:
            pass
        return self.stats
