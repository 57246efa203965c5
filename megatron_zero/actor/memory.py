"""Moving a model's device memory to the host and back, for colocated rollout engines.

Why: with SGLang on the same GPUs, the actor (weights, gradient buffers, optimizer state) and the frozen
reference model must give their GPU memory back while the engine generates, and take it again for training.

How: ``offloader = StorageOffloader("actor")``; ``offloader.offload(unique_storages_by_kind({...}))`` copies each
storage to (pinned) host memory and frees it in place with ``resize_(0)``; ``offloader.onload()`` reallocates and
copies back. Resizing the storage, not re-pointing tensors, keeps every view valid (params are views into
DDP's contiguous buffers, optimizer shards views of those). On a CPU-only machine the host copy is in the
same memory, so nothing is freed, but the same code and bookkeeping run. Under FP8 the models first drop
Transformer Engine's cached FP8 weight copies (``drop_fp8_workspaces``), which are not parameters.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Iterable, Optional

import torch

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class MemoryMove:
    """What one offload or onload moved: bytes per kind (e.g. "weights", "grads", "optimizer")."""

    direction: str
    bytes_by_kind: dict[str, int]
    num_storages: int

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_by_kind.values())


def unique_storages_by_kind(tensors_by_kind: dict[str, Iterable[Optional[torch.Tensor]]]
                            ) -> dict[str, list[torch.UntypedStorage]]:
    """The distinct non-empty storages behind each kind's tensors; a storage seen under an earlier kind (or
    twice) is counted once, so views into one buffer are moved once."""
    seen: set[int] = set()
    kinds: dict[str, list[torch.UntypedStorage]] = {}
    for kind, tensors in tensors_by_kind.items():
        kinds[kind] = []
        for tensor in tensors:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            if storage.nbytes() == 0 or storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            kinds[kind].append(storage)
    return kinds


def drop_fp8_workspaces(model: torch.nn.Module) -> None:
    """Drop Transformer Engine's cached FP8 weight copies: every module's ``_fp8_workspaces`` dict (TE 2.x
    module/base.py), emptied in place.

    Why: megatron-core passes ``is_first_microbatch`` to TE's linears (extensions/transformer_engine.py), so each
    keeps the FP8 cast of its weight (row-wise, and column-wise for the backward: 1-2 bytes per weight element of
    its TP shard) in that dict from one step to the next; offloading parameters, grads and optimizer state leaves
    them on the GPU through rollout. Dropping them costs one allocation at the next step: TE casts the weights
    into the cached copy on every first microbatch anyway, and makes a new one when none is cached. Turning the cache
    off instead (TransformerConfig.disable_parameter_transpose_cache) would cast on every microbatch. The planner
    counts them (planning/actor_memory.py FP8_TRAIN_WORKSPACE_BYTES)."""
    for module in model.modules():
        workspaces = getattr(module, "_fp8_workspaces", None)
        if workspaces:
            workspaces.clear()


class StorageOffloader:
    """Frees device storages into host copies and restores them; ``name`` appears in errors and logs."""

    def __init__(self, name: str) -> None:
        self.name = name
        # (kind, device storage, host copy) of everything offload() freed; None while on the device.
        self._saved: Optional[list[tuple[str, torch.UntypedStorage, torch.Tensor]]] = None

    @property
    def offloaded(self) -> bool:
        return self._saved is not None

    def offload(self, storages_by_kind: dict[str, list[torch.UntypedStorage]]) -> MemoryMove:
        if self.offloaded:
            raise RuntimeError(f"offload(): the {self.name} is already offloaded; call onload() first")
        saved: list[tuple[str, torch.UntypedStorage, torch.Tensor]] = []
        bytes_by_kind: dict[str, int] = {}
        for kind, storages in storages_by_kind.items():
            bytes_by_kind[kind] = 0
            for storage in storages:
                host = torch.empty(storage.nbytes(), dtype=torch.uint8, device="cpu",
                                   pin_memory=torch.cuda.is_available())
                host.untyped_storage().copy_(storage)
                bytes_by_kind[kind] += storage.nbytes()
                storage.resize_(0)
                saved.append((kind, storage, host))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self._saved = saved
        move = MemoryMove(direction="offload", bytes_by_kind=bytes_by_kind, num_storages=len(saved))
        logger.info("%s offload: %d storages, %.1f MiB %s", self.name, len(saved), move.total_bytes / 2**20,
                    bytes_by_kind)
        return move

    def onload(self) -> MemoryMove:
        if not self.offloaded:
            raise RuntimeError(f"onload(): the {self.name} is not offloaded; call offload() first")
        bytes_by_kind: dict[str, int] = {}
        for kind, storage, host in self._saved:
            storage.resize_(host.numel())
            storage.copy_(host.untyped_storage())
            bytes_by_kind[kind] = bytes_by_kind.get(kind, 0) + host.numel()
        move = MemoryMove(direction="onload", bytes_by_kind=bytes_by_kind, num_storages=len(self._saved))
        self._saved = None
        logger.info("%s onload: %d storages, %.1f MiB", self.name, move.num_storages, move.total_bytes / 2**20)
        return move
