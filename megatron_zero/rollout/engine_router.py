"""Several rollout engines behind one ``RolloutEngine`` (``EngineRouter``): the trainer and the eval commands talk
to one engine whatever the number of SGLang servers.

A batch is cut into contiguous pieces, one per engine, never splitting a run of identical consecutive prompts (the
n samples of one prompt share a radix-cache prefix on one server); results come back in prompt order. Memory, cache
and health calls go to every engine in parallel; weight buckets go to the engines one after the other (the
disaggregated path broadcasts over NCCL in the calling thread, and two threads in collectives could deadlock).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import queue
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence

import torch

from megatron_zero.rollout.engine import Generation, RolloutEngine, SamplingParams, WeightUpdateStats

if TYPE_CHECKING:
    from megatron_zero.rollout.sglang_servers import SGLangServers


def split_by_prompt_runs(prompts: Sequence[Sequence[int]], num_parts: int) -> list[range]:
    """``num_parts`` contiguous ranges covering ``prompts``, as equal in size as possible without cutting a run of
    identical consecutive prompts (some ranges are empty when there are fewer runs than parts)."""
    cuts = [0] + [i for i in range(1, len(prompts)) if list(prompts[i]) != list(prompts[i - 1])] + [len(prompts)]
    bounds = [0]
    for part in range(1, num_parts):
        ideal = len(prompts) * part / num_parts
        bounds.append(min((cut for cut in cuts if cut >= bounds[-1]), key=lambda cut: abs(cut - ideal)))
    bounds.append(len(prompts))
    return [range(start, stop) for start, stop in zip(bounds, bounds[1:])]


class EngineRouter(RolloutEngine):
    """Several engines behind one ``RolloutEngine``; see the module docstring. ``servers`` (the processes of
    launched SGLang servers): stopped on shutdown."""

    def __init__(self, engines: Sequence[RolloutEngine], servers: Optional[SGLangServers] = None) -> None:
        if not engines:
            raise ValueError("EngineRouter needs at least one engine")
        self.engines = list(engines)
        self.servers = servers
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(self.engines),
                                                           thread_name_prefix="engine-router")
        self._sync_start = 0.0

    def _on_engines(self, calls: Sequence[tuple[int, Callable[[], Any]]], what: str) -> list[Any]:
        """Run ``(engine index, call)`` pairs in parallel; all finish before the first failure is raised."""
        futures = [self._pool.submit(call) for _, call in calls]
        concurrent.futures.wait(futures)
        for (index, _), future in zip(calls, futures):
            if future.exception() is not None:
                error = future.exception()
                error.add_note(f"in {what} on rollout engine {index} of {len(self.engines)}")
                raise error
        return [future.result() for future in futures]

    def _on_all(self, method: str, *args: Any) -> list[Any]:
        return self._on_engines([(i, lambda e=engine: getattr(e, method)(*args))
                                 for i, engine in enumerate(self.engines)], method)

    def _split(self, prompts: Sequence[Sequence[int]]) -> list[tuple[int, range]]:
        parts = split_by_prompt_runs(prompts, len(self.engines))
        return [(index, part) for index, part in enumerate(parts) if len(part)]

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Generation]:
        parts = self._split(prompts)
        results = self._on_engines([(i, lambda i=i, p=part: self.engines[i].generate([prompts[k] for k in p], params))
                                    for i, part in parts], "generate")
        return [generation for result in results for generation in result]

    def generate_stream(self, prompts: Sequence[Sequence[int]],
                        params: SamplingParams) -> Iterator[tuple[int, Generation]]:
        """Every engine streams its part from a thread of its own; results come out as any engine finishes them."""
        parts = self._split(prompts)
        # Opened here, in the caller's thread: a bad request raises now, before the first item.
        streams = [(index, part, self.engines[index].generate_stream([prompts[k] for k in part], params))
                   for index, part in parts]
        return self._merge(streams)

    def _merge(self, streams: list[tuple[int, range, Iterator[tuple[int, Generation]]]]
               ) -> Iterator[tuple[int, Generation]]:
        results: queue.Queue = queue.Queue()
        finished = object()

        def drain(index: int, part: range, stream: Iterator[tuple[int, Generation]]) -> None:
            try:
                for local, generation in stream:
                    results.put((part[local], generation))
            except BaseException as error:  # handed to the consumer, which raises it
                error.add_note(f"in generate_stream on rollout engine {index} of {len(self.engines)}")
                results.put(error)
            finally:
                results.put(finished)

        for stream in streams:
            self._pool.submit(drain, *stream)
        remaining = len(streams)
        while remaining:
            item = results.get()
            if item is finished:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item

    def compute_logprobs(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                         temperature: float) -> list[list[float]]:
        if len(prompt_ids) != len(response_ids):
            raise ValueError(f"compute_logprobs got {len(prompt_ids)} prompts but {len(response_ids)} responses")
        parts = self._split(prompt_ids)
        results = self._on_engines([(i, lambda i=i, p=part: self.engines[i].compute_logprobs(
            [prompt_ids[k] for k in p], [response_ids[k] for k in p], temperature)) for i, part in parts],
            "compute_logprobs")
        return [values for result in results for values in result]

    def begin_weight_update(self, version: int) -> None:
        self._sync_start = time.perf_counter()
        for engine in self.engines:
            engine.begin_weight_update(version)

    def update_weights(self, bucket: Sequence[tuple[str, torch.Tensor]]) -> None:
        # One engine after the other: see the module docstring (NCCL broadcasts in the calling thread).
        for engine in self.engines:
            engine.update_weights(bucket)

    def finish_weight_update(self) -> WeightUpdateStats:
        """Every engine's stats are those of the same model; the seconds are the whole sync over all engines."""
        per_engine = self._on_all("finish_weight_update")
        assert all(stats.names == per_engine[0].names for stats in per_engine), "engines got different tensors"
        return dataclasses.replace(per_engine[0], seconds=time.perf_counter() - self._sync_start)

    @property
    def honours_seeds(self) -> bool:
        return all(engine.honours_seeds for engine in self.engines)

    def release_memory(self) -> None:
        self._on_all("release_memory")

    def resume_memory(self) -> None:
        self._on_all("resume_memory")

    def resume_weights(self) -> None:
        self._on_all("resume_weights")

    def resume_kv_cache(self) -> None:
        self._on_all("resume_kv_cache")

    def flush_cache(self) -> None:
        self._on_all("flush_cache")

    def health_check(self) -> None:
        self._on_all("health_check")

    def shutdown(self) -> None:
        self._on_all("shutdown")
        self._pool.shutdown()
        if self.servers is not None:
            self.servers.shutdown()
