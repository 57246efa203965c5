"""Where the rollout engine runs beside the actor, and how the actor's weights reach it: chosen once at setup.

Two choices, each a small strategy object, so the step loop (trainer/loop.py) never tests a mode:

- the **layout**: ``ColocatedEngines`` (the engine shares the ranks' accelerators and the two take turns: memory
  is released and resumed in a fixed order at every phase switch) or ``SeparateEngines`` (the engine has devices
  of its own, or is the embedded torch engine: no phase switch);
- the **weight transport**, by engine kind: ``RanksPushToServers`` (SGLang servers take the weights from the
  ranks, colocated by shared memory / CUDA IPC or broadcast from rank 0: trainer/weight_push.py) or
  ``DriverSendsBuckets`` (the torch engine in the driver receives rank 0's resharded buckets).

How: ``layout = engine_layout(config, engine)`` right after the engine starts (colocated, the engine then releases
its memory before the actor loads), ``layout.attach(group)`` once the ranks are up; then per step
``before_training()``, ``sync_weights(version)``, ``after_sync()``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

from megatron_zero.config.trainer import TrainConfig
from megatron_zero.parallel.reshard import RECEIVED_KINDS
from megatron_zero.rollout.engine import RolloutEngine
from megatron_zero.rollout.fp8_weights import fp8_from_bytes


# --------------------------------------------------------------------------- weight transports


class RanksPushToServers:
    """Every rank pushes its part of the policy to the SGLang servers (weight_push.py); each engine's first rank
    reports. A first sync at startup proves the path before the first rollout rather than after it."""

    sync_at_start = True

    def __init__(self, engine: RolloutEngine, bucket_bytes: int) -> None:
        self.server_urls: Optional[list[str]] = [server.url for server in engine.engines]
        self.bucket_bytes = bucket_bytes

    def send(self, group, version: int) -> tuple[float, int, list[dict[str, Any]]]:
        per_rank = group.run("push_weights", version, self.bucket_bytes)
        leaders = [stats["engine"] for stats in per_rank if stats["engine"] is not None]
        return max(stats["seconds"] for stats in leaders), leaders[0]["bytes"], per_rank


class DriverSendsBuckets:
    """Rank 0 sends the resharded policy in buckets through the driver to the engine it holds (the torch engine,
    which starts from model_path: nothing to sync at startup)."""

    sync_at_start = False
    server_urls: Optional[list[str]] = None

    def __init__(self, engine: RolloutEngine, bucket_bytes: int) -> None:
        self.engine, self.bucket_bytes = engine, bucket_bytes

    def send(self, group, version: int) -> tuple[float, int, list[dict[str, Any]]]:
        buckets_and_stats = group.run("weight_buckets", self.bucket_bytes)
        buckets, stats = buckets_and_stats[0]  # rank 0 sends
        self.engine.flush_cache()
        engine_stats = self.engine.sync_weights([fp8_from_bytes(bucket) for bucket in buckets], version=version)
        per_rank = [rank_stats for _, rank_stats in buckets_and_stats]
        return stats["reshard_seconds"] + engine_stats.seconds, stats["bytes"], per_rank


def sync_metrics(seconds: float, num_bytes: int, per_rank: list[dict[str, Any]]) -> dict[str, float]:
    """A sync's time, bandwidth and what the resharding moved between ranks, summed over them (cross_node: the part
    that left a node)."""
    moved = {f"weight_sync_bytes_{kind}": float(sum(stats["received_bytes"][kind] for stats in per_rank))
             for kind in RECEIVED_KINDS}
    return {"weight_sync_seconds": seconds, "weight_sync_gb_per_s": num_bytes / 1e9 / max(seconds, 1e-9),
            "weight_sync_bytes": float(num_bytes), **moved}


# --------------------------------------------------------------------------- layouts


class SeparateEngines:
    """The engine has devices of its own (or is the embedded torch engine): the actor stays where it is."""

    def __init__(self, engine: RolloutEngine, transport) -> None:
        self.engine, self.transport, self.group = engine, transport, None
        self.server_urls = transport.server_urls
        # A fresh run syncs before its first rollout only where the transport wants its path proven.
        self.sync_at_start = transport.sync_at_start

    def attach(self, group) -> None:
        self.group = group

    def enter_rollout_phase(self) -> dict[str, float]:
        return {}

    def before_training(self) -> dict[str, float]:
        return {}

    def after_sync(self) -> dict[str, float]:
        return {}

    def sync_weights(self, version: int) -> dict[str, float]:
        return sync_metrics(*self.transport.send(self.group, version))

    @contextlib.contextmanager
    def actor_on_device(self, resync: Callable[[], Any]) -> Iterator[None]:
        yield


class ColocatedEngines(SeparateEngines):
    """The engine and the actor share the ranks' accelerators and take turns; memory moves in a fixed order so
    actor, engine weights and KV cache never peak together (planning/memory.py counts the same order)."""

    def __init__(self, engine: RolloutEngine, transport) -> None:
        super().__init__(engine, transport)
        # The engine started before the actor loads its weights (SGLang sizes its KV cache once, from the memory
        # free at startup); it now frees that memory until the actor is loaded, and needs the weights back after.
        self.engine.release_memory()
        self.sync_at_start = True
        self.actor_offloaded = False

    def enter_rollout_phase(self) -> dict[str, float]:
        """After the sync (engine weights resumed and updated from the on-device actor), the actor leaves, and
        only then the engine's KV cache returns."""
        offloaded = self.group.run("offload")[0]
        self.actor_offloaded = True
        self.engine.resume_kv_cache()
        return {f"offload_bytes_{kind}": float(nbytes) for kind, nbytes in offloaded.items()}

    def before_training(self) -> dict[str, float]:
        """The engine frees its memory, then the actor takes it back."""
        self.engine.release_memory()
        onloaded = self.group.run("onload")[0]
        self.actor_offloaded = False
        return {f"onload_bytes_{kind}": float(nbytes) for kind, nbytes in onloaded.items()}

    def after_sync(self) -> dict[str, float]:
        return self.enter_rollout_phase()

    def sync_weights(self, version: int) -> dict[str, float]:
        # The engine's weight memory comes back (a no-op if it holds it) while the actor is still on the device;
        # the KV cache returns only after the actor left (enter_rollout_phase).
        self.engine.resume_weights()
        return super().sync_weights(version)

    @contextlib.contextmanager
    def actor_on_device(self, resync: Callable[[], Any]) -> Iterator[None]:
        """The actor back on its device for a while (it saves checkpoints from there); ``resync`` afterwards, since
        release_memory() dropped the engine's weights."""
        offloaded = self.actor_offloaded
        if offloaded:
            self.before_training()
        yield
        if offloaded:
            resync()
            self.enter_rollout_phase()


def engine_layout(config: TrainConfig, engine: RolloutEngine) -> SeparateEngines:
    """The layout and weight transport ``config`` asks for, around the ``engine`` just started."""
    bucket_bytes = config.run.weight_sync_bucket_mb * 2**20
    transport_kind = RanksPushToServers if config.rollout.engine == "sglang" else DriverSendsBuckets
    layout_kind = ColocatedEngines if config.cluster.colocate else SeparateEngines
    return layout_kind(engine, transport_kind(engine, bucket_bytes))
