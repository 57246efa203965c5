"""Weight updates of an SGLang 0.5.23 server: the payloads and the session protocol.

Every sync is one session: POST /begin_weight_update, the buckets, POST /end_weight_update (0.5.23 refuses updates
outside a session). Colocated: POST /update_weights_from_tensor, ``load_format="flattened_bucket"``, one base64
pickled CUDA IPC handle per server TP rank (``serialize_flattened_bucket``); disaggregated: POST
/update_weights_from_distributed while this process broadcasts over NCCL (``broadcast_bucket``). Each session checks
that it sends every tensor of the model exactly once.

``SGLangWeightUpdates`` holds the session methods of ``SGLangEngine`` (rollout/sglang_engine.py), which provides
the HTTP client and the server's state; trainer/weight_push.py drives them from the ranks.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import time
from typing import Mapping, Optional, Sequence

import torch

from megatron_zero.rollout.engine import WeightUpdateStats
from megatron_zero.rollout.fp8_weights import SCALE_SUFFIX, as_bytes
from megatron_zero.rollout.sglang_http import SGLangHTTPError

logger = logging.getLogger(__name__)

# Name of the NCCL group that /init_weights_update_group creates inside the server.
WEIGHT_GROUP_NAME = "megatron_zero_weights"


class CUDABoundaryError(RuntimeError):
    """Weights were offered for a colocated (CUDA IPC) update from a machine or tensor without CUDA."""


def serialize_flattened_bucket(named_tensors: Sequence[tuple[str, torch.Tensor]]) -> tuple[str, torch.Tensor]:
    """One bucket as SGLang's "flattened_bucket" payload: a base64 pickled dict holding one uint8 CUDA buffer
    (shared by IPC handle, not copied over HTTP) and each tensor's name, dtype, shape and byte range. On a machine
    without CUDA (the CPU server beside CPU ranks, rollout/sglang_cpu.py) the buffer is a CPU tensor in shared
    memory, which the server opens by name.

    Returns the payload and the buffer: the producer must keep the buffer alive until the server has loaded it,
    so hold it until the request returns.
    """
    off_gpu = [name for name, tensor in named_tensors if not tensor.is_cuda]
    if not torch.cuda.is_available():
        # The default sharing strategy passes a file descriptor over a multiprocessing connection the server never
        # opens (it unpickles an HTTP body): its scheduler then dies ("digest sent was rejected", measured). A
        # file_system handle names a /dev/shm file instead. Process-wide, and only ever set on CPU machines.
        torch.multiprocessing.set_sharing_strategy("file_system")
    elif off_gpu:
        raise CUDABoundaryError(
            f"colocated SGLang weight updates pass CUDA IPC handles, but {len(off_gpu)} tensor(s) are not on a "
            f"CUDA device (first: {off_gpu[0]!r}, CUDA available: {torch.cuda.is_available()}); move the bucket "
            "to the GPU or use sglang.colocated=False (NCCL broadcast)"
        )
    # Imported here: sglang is GPU-only (the gpu extra). These are the classes the server unpickles with.
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    if torch.cuda.is_available():
        # Pickle device UUIDs instead of indices: this process and the server see different CUDA_VISIBLE_DEVICES.
        # (The patch rewrites the device field of CUDA tensors' pickles; a CPU tensor's has none.)
        monkey_patch_torch_reductions()
    # Widest elements first: the server views each tensor's slice of the flat uint8 buffer as its dtype, which
    # needs the slice's offset to be a multiple of the element size; an FP8 bucket mixes 4-byte scales, 2-byte
    # norms and 1-byte weights, and in this order every offset is aligned.
    widest_first = sorted(named_tensors, key=lambda named: -named[1].element_size())
    bucket = FlattenedTensorBucket(named_tensors=widest_first)
    payload = {"flattened_tensor": bucket.get_flattened_tensor(), "metadata": bucket.get_metadata()}
    return MultiprocessingSerializer.serialize(payload, output_str=True), payload["flattened_tensor"]


def wait_first_failure(pending: Mapping[concurrent.futures.Future, str], timeout_s: float, what: str) -> None:
    """Wait for every future of ``pending`` (future -> who answers it); raise the first failure as soon as it comes,
    noting who failed and ``what`` was going on, or a TimeoutError naming who has not answered by ``timeout_s``.

    For requests whose counterpart is a collective: a server that fails its side never joins, and waiting for the
    others would only end at the collective's timeout."""
    pending = dict(pending)
    deadline = time.monotonic() + timeout_s
    while pending:
        done, _ = concurrent.futures.wait(pending, timeout=max(0.0, deadline - time.monotonic()),
                                          return_when=concurrent.futures.FIRST_COMPLETED)
        if not done:
            raise TimeoutError(f"{sorted(pending.values())} did not answer within {timeout_s} s while {what}")
        for future in done:
            who = pending.pop(future)
            try:
                future.result()
            except Exception as error:
                error.add_note(f"from {who} while {what}")
                raise


def broadcast_bucket(bucket: Sequence[tuple[str, torch.Tensor]], group: torch.distributed.ProcessGroup,
                     answers: Sequence[tuple[str, concurrent.futures.Future]], timeout_s: float) -> None:
    """Broadcast ``bucket``'s tensors from rank 0 of ``group``, in order, to the servers whose announcements
    (``post_weights_from_distributed``) are ``answers`` (url, future), and wait for every answer.

    A server that refuses the bucket (HTTP 400) stops receiving, so the answers are watched while the broadcasts
    run and the first refusal is raised at once, naming the server (the group is then unusable: the run stops).
    """
    works = [torch.distributed.broadcast(as_bytes(tensor), src=0, group=group, async_op=True)
             for _, tensor in bucket]
    wait_first_failure({future: url for url, future in answers}, timeout_s,
                       f"broadcasting {[name for name, _ in bucket][:3]}... (sglang.control_timeout_s)")
    for work in works:
        work.wait()


class SGLangWeightUpdates:
    """The weight-update sessions of one SGLang server. Mixed into ``SGLangEngine``, which sets ``config``, ``url``,
    ``weight_group``, ``_client``, ``_expected_names`` (None: read from the checkpoint at the first session),
    ``_stats`` (the open session's, or None), ``_sync_start``, ``_released`` (memory tags released) and
    ``flush_cache()``."""

    _stats: Optional[WeightUpdateStats]

    # -- sessions ---------------------------------------------------------------------------------------

    def begin_weight_update(self, version: int) -> None:
        if self._stats is not None:
            raise RuntimeError(f"weight update {self._stats.version} on {self.url} is still open; "
                               "call finish_weight_update first")
        if "weights" in self._released:
            raise RuntimeError(f"SGLang server {self.url} has released its weights; resume them "
                               "(resume_weights) before a weight update")
        if self._expected_names is None:
            # Imported here: only needed once, and it pulls safetensors readers the serving path never uses.
            from megatron_zero.models.hf_io import HFCheckpointReader

            self._expected_names = frozenset(HFCheckpointReader(self.config.model_path).names())
        self._sync_start = time.perf_counter()
        # SGLang 0.5.23 takes weights only inside a session (scheduler_components/weight_updater.py); it waits for
        # running requests (the model-update writer lock). Not retried: a second begin is refused while one is open.
        self._client.post("/begin_weight_update", {}, timeout_s=self.config.control_timeout_s, retry=False)
        self._stats = WeightUpdateStats(version=version)

    def update_weights(self, bucket: Sequence[tuple[str, torch.Tensor]]) -> None:
        if not self.config.colocated:
            if self.weight_group is None:
                raise RuntimeError(f"rollout.sglang.colocated=False needs a weight_group: call "
                                   f"init_weights_update_group on {self.url}, create this side's group "
                                   "(parallel/weight_broadcast.py), and pass it as SGLangEngine(weight_group=...)")
            broadcast_bucket(bucket, self.weight_group, [(self.url, self.post_weights_from_distributed(bucket))],
                             self.config.control_timeout_s)
            return
        stats = self._check_bucket(bucket)
        # Buckets arrive sized by run.weight_sync_bucket_mb (the ranks' push, or the driver's resharding).
        self._update_from_tensor(bucket)
        stats.num_buckets += 1
        self._record(stats, bucket)

    def post_weights_from_distributed(self, bucket: Sequence[tuple[str, torch.Tensor]]
                                      ) -> concurrent.futures.Future:
        """Announce ``bucket`` to the server (POST /update_weights_from_distributed) and return at once with the
        answer's future; the caller then broadcasts the tensors (``broadcast_bucket``) on the group the server
        joined. Several servers on one group get the same announcement and receive one broadcast."""
        stats = self._check_bucket(bucket)
        payload = {
            "names": [name for name, _ in bucket],
            "dtypes": [str(tensor.dtype).removeprefix("torch.") for _, tensor in bucket],
            "shapes": [list(tensor.shape) for _, tensor in bucket],
            "group_name": WEIGHT_GROUP_NAME,
            "flush_cache": False,
        }
        # The server answers only after it has received every broadcast, which the caller sends meanwhile.
        answer = self._post_in_background("/update_weights_from_distributed", payload)
        stats.num_buckets += 1
        self._record(stats, bucket)
        return answer

    def update_weights_from_ranks(self, bucket: Sequence[tuple[str, torch.Tensor]], per_rank: Sequence[str]) -> None:
        """Colocated update in which server TP rank i opens the buffer of the actor rank on its own GPU:
        ``per_rank[i]`` is that rank's ``serialize_flattened_bucket(bucket)`` (``trainer/weight_push.py``).
        ``bucket`` is this process's copy, for the same name bookkeeping as ``update_weights``."""
        stats = self._check_bucket(bucket)
        self.update_weights_from_serialized(per_rank)
        stats.num_buckets += 1
        self._record(stats, bucket)

    @staticmethod
    def _record(stats: WeightUpdateStats, bucket: Sequence[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in bucket:
            stats.names.add(name)
            stats.num_tensors += 1
            stats.num_bytes += tensor.numel() * tensor.element_size()

    def _check_bucket(self, bucket: Sequence[tuple[str, torch.Tensor]]) -> WeightUpdateStats:
        if self._stats is None:
            raise RuntimeError("update_weights called outside a weight update; call begin_weight_update first")
        names = [name for name, _ in bucket]
        unknown = sorted(set(names) - self._expected_names)
        if unknown:
            raise ValueError(f"weight update for {self.url} names {len(unknown)} tensor(s) the model does not have: "
                             f"{unknown[:5]}")
        repeated = sorted({n for n, count in collections.Counter(names).items() if count > 1}
                          | (set(names) & self._stats.names))
        if repeated:
            raise ValueError(f"weight update version {self._stats.version} sends {repeated[:5]} more than once")
        return self._stats

    def _update_from_tensor(self, chunk: list[tuple[str, torch.Tensor]]) -> None:
        # One serialization per server TP rank, as SGLang 0.5.23's own Engine sends (entrypoints/engine.py
        # _serialize_tensors_per_rank): rank i deserializes only entry i (managers/tp_worker.py
        # deserialize_own_rank), and each serialization registers its own CUDA IPC reference count here, which
        # that one rank's release drops; one payload opened by every rank would drop a single count tp_size times.
        # The flattened_bucket load does not move the buffer (weight_updater._update_weights_from_flattened_bucket):
        # each rank opens it on this process's GPU and its weight loaders copy it onto their own. Each call flattens
        # its own copy of the bucket (tp_size x run.weight_sync_bucket_mb while the request runs).
        per_rank = [serialize_flattened_bucket(chunk) for _ in range(self.config.tp_size)]
        self.update_weights_from_serialized([serialized for serialized, _ in per_rank])
        del per_rank  # the buffers lived until every rank had copied them into its parameters

    def update_weights_from_serialized(self, per_rank: Sequence[str]) -> None:
        """Send one flattened bucket already serialised per TP rank of the server (entry i is opened by rank i).

        ``update_weights`` serializes a buffer of this process for every rank, so with tp_size > 1 ranks read
        across GPUs; a caller whose actor rank i shares GPU i with server rank i can instead gather each
        rank's own ``serialize_flattened_bucket`` and send them here.
        """
        if len(per_rank) != self.config.tp_size:
            raise ValueError(f"got {len(per_rank)} serialized buckets for a tp_size={self.config.tp_size} server")
        payload = {
            "serialized_named_tensors": list(per_rank),
            "load_format": "flattened_bucket",
            # One flush at the end of the sync (finish_weight_update), not one per bucket.
            "flush_cache": False,
        }
        self._client.post("/update_weights_from_tensor", payload, timeout_s=self.config.control_timeout_s)

    def destroy_weights_update_group(self) -> bool:
        """Drop the server's weight-broadcast group, if it still holds one from an earlier trainer (a server started
        by hand outlives a restarted run, and SGLang refuses a new group under a name it holds). True if it had one."""
        try:
            self._client.post("/destroy_weights_update_group", {"group_name": WEIGHT_GROUP_NAME},
                              timeout_s=self.config.control_timeout_s, retry=False)
            return True
        except SGLangHTTPError as error:
            # model_runner.py: (False, "The group to be destroyed does not exist.") -> HTTP 400.
            if error.status == 400 and "does not exist" in str(error):
                return False
            raise

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int,
                                  world_size: int, backend: str = "nccl") -> concurrent.futures.Future:
        """Ask the server to join a weight-broadcast group (its TP rank i becomes rank rank_offset + i).

        Returns at once with a future: the server blocks in the rendezvous until this side joins too, so the
        caller creates its own group (rank 0, same address) and then waits on the future.
        """
        payload = {"master_address": master_address, "master_port": master_port, "rank_offset": rank_offset,
                   "world_size": world_size, "group_name": WEIGHT_GROUP_NAME, "backend": backend}
        return self._post_in_background("/init_weights_update_group", payload)

    def _post_in_background(self, endpoint: str, payload: dict) -> concurrent.futures.Future:
        """POST once (no retry: a repeat fails inside SGLang) from a thread of its own; the answer's future. For
        requests SGLang answers only after this side has done its part of a collective."""
        executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sglang-collective")
        future = executor.submit(self._client.post, endpoint, payload, timeout_s=self.config.control_timeout_s,
                                 retry=False)
        executor.shutdown(wait=False)
        return future

    def finish_weight_update(self) -> WeightUpdateStats:
        if self._stats is None:
            raise RuntimeError("finish_weight_update called without begin_weight_update")
        stats, self._stats = self._stats, None
        # The session closes even when tensors are missing: an open one would refuse the next begin.
        self._client.post("/end_weight_update", {}, timeout_s=self.config.control_timeout_s, retry=False)
        missing = sorted(self._expected_names - stats.names)
        if missing:
            fp8_hint = ("; the server's checkpoint is block-FP8 and its scales were not sent: set "
                        "rollout.quantization=fp8" if all(name.endswith(SCALE_SUFFIX) for name in missing) else "")
            raise RuntimeError(f"weight update version {stats.version} for {self.url} left {len(missing)} tensor(s) "
                               f"of the model stale: {missing[:5]}{fp8_hint}")
        # Cached prefixes hold KV computed with the old weights.
        self.flush_cache()
        stats.seconds = time.perf_counter() - self._sync_start
        logger.info("SGLang %s: weights version %d, %d tensors, %.2f GB in %.2f s (%.2f GB/s)", self.url,
                    stats.version, stats.num_tensors, stats.num_bytes / 1e9, stats.seconds, stats.gb_per_s)
        return stats
