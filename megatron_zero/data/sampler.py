"""Epoch-based shuffled prompt batches that resume exactly from a checkpoint.

Why: a resumed run must see the same prompt stream as an uninterrupted one, with no prompt replayed or skipped.
The order of epoch e is a permutation drawn from (seed, e) alone, so the state is three integers: epoch, position
in that epoch's order, seed. Batches run straight across epoch boundaries (the last batch of an epoch is topped up
from the next epoch's order), so every problem is used exactly once per epoch and every batch is full.

How::

    sampler = PromptSampler(problems, SamplerConfig(batch_size=256, seed=0))
    for batch in sampler: ...                       # list[Problem]
    checkpoint["sampler"] = sampler.state_dict()
    sampler.load_state_dict(checkpoint["sampler"])  # on a fresh sampler over the same problems
"""

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from megatron_zero.config.data import SamplerConfig
from megatron_zero.data.problems import Problem


class PromptSampler:
    def __init__(self, problems: Sequence[Problem], config: SamplerConfig) -> None:
        if config.batch_size > len(problems):
            raise ValueError(
                f"data.sampler.batch_size={config.batch_size} is larger than the {len(problems)} problems; "
                "lower it or use more data"
            )
        self.problems = problems
        self.config = config
        self.epoch = 0
        # Index into the epoch's order of the next problem to hand out.
        self.position = 0

    def _order(self, epoch: int) -> np.ndarray:
        if not self.config.shuffle:
            return np.arange(len(self.problems))
        return np.random.default_rng([self.config.seed, epoch]).permutation(len(self.problems))

    @property
    def exhausted(self) -> bool:
        return self.config.num_epochs is not None and self.epoch >= self.config.num_epochs

    def next_batch(self) -> list[Problem]:
        """The next `batch_size` problems; a batch at the end of the last epoch (num_epochs) may be short."""
        if self.exhausted:
            raise StopIteration
        batch: list[Problem] = []
        while len(batch) < self.config.batch_size and not self.exhausted:
            order = self._order(self.epoch)
            take = order[self.position : self.position + self.config.batch_size - len(batch)]
            batch.extend(self.problems[index] for index in take)
            self.position += len(take)
            if self.position == len(order):
                self.epoch += 1
                self.position = 0
        return batch

    def __iter__(self) -> Iterator[list[Problem]]:
        while not self.exhausted:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.config.seed,
            "num_problems": len(self.problems),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; the problems and seed must be those it was saved with."""
        if state["num_problems"] != len(self.problems) or state["seed"] != self.config.seed:
            raise ValueError(
                f"sampler state is for {state['num_problems']} problems with seed {state['seed']}, but this sampler "
                f"has {len(self.problems)} problems with seed {self.config.seed}; resume with the same data and seed"
            )
        if not 0 <= state["position"] < len(self.problems):
            raise ValueError(f"sampler state position={state['position']} is outside [0, {len(self.problems)})")
        self.epoch = state["epoch"]
        self.position = state["position"]
