"""Parallel layout of the Megatron actor: how many ways each dimension is split.

Validated on construction; whether the sizes fit the model (heads, layers) and the cluster
(world size) is checked where those are known (``ParallelConfig.check_world_size`` and the
model bridge).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_zero.config.problems import raise_problems


@dataclass(kw_only=True, frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    context_parallel_size: int = 1
    expert_parallel_size: int = 1
    # Collectives that do not finish in this time raise instead of hanging the job.
    timeout_s: float = 600.0
    seed: int = 1234

    def __post_init__(self) -> None:
        problems: list[str] = []  # every value problem of this config, raised together
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "context_parallel_size", "expert_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                problems.append(f"parallel.{name}={value!r} must be an integer >= 1")
        if isinstance(self.context_parallel_size, int) and self.context_parallel_size > 1:
            # megatron-core would build the CP groups, but every rank would then run whole sequences: wrong
            # attention, not a speed-up. Refused until the batch is split over CP ranks for real.
            problems.append(f"parallel.context_parallel_size={self.context_parallel_size} is not supported yet: "
                            "nothing splits sequences over context-parallel ranks; set it to 1")
        if self.timeout_s <= 0:
            problems.append(f"parallel.timeout_s={self.timeout_s} must be > 0 seconds")
        raise_problems(problems)

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size * self.context_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        self.check_world_size(world_size)
        return world_size // self.model_parallel_size

    def check_world_size(self, world_size: int) -> None:
        if world_size % self.model_parallel_size != 0:
            raise ValueError(
                f"world size {world_size} is not divisible by tensor_parallel_size x pipeline_parallel_size x "
                f"context_parallel_size = {self.tensor_parallel_size} x {self.pipeline_parallel_size} x "
                f"{self.context_parallel_size} = {self.model_parallel_size}; choose sizes whose product divides "
                f"the number of processes"
            )
