"""Divide a batch over data-parallel replicas by cost, and put the replicas' results back in row order.

Why: each data-parallel replica (one TP x PP x CP group of ranks) must do about 1/DP of a step's work, or adding
GPUs beyond TP x PP buys nothing. Zero-RL response lengths span 10x and more, so equal row counts are not equal
work: rows are balanced by their forward FLOPs (``DecoderArchitecture.forward_flops``: linear in the tokens plus
attention's quadratic term), which is also what the backward pass scales with.

How (on the driver)::

    plan = ShardPlan.balance(row_costs(batch.lengths, arch), num_replicas=dp)
    shards = plan.scatter(batch)                       # shards[d]: replica d's rows, trimmed to their longest
    logp_BS = plan.gather(per_replica_logp, like=batch.tokens)   # back in the batch's row order

The split is deterministic (a function of the costs alone: same batch, same shards), so a resumed run repeats the
uninterrupted one. The update stays the DP=1 update on the global batch because the actor's loss normaliser is
all-reduced over DP and DDP averages gradients (``actor/actor.py``).

A replica must take part in every training collective (the normaliser's and DDP's all-reduce), so when a batch has
fewer rows than replicas, each replica left without one gets a *filler*: row 0 with an empty loss mask, which runs
the model but adds nothing to the loss, the normaliser or the gradients; ``gather`` drops its results.
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import TYPE_CHECKING, Sequence

import torch

from megatron_zero.models.common.architecture import DecoderArchitecture

if TYPE_CHECKING:
    from megatron_zero.actor.batching import ActorBatch  # the batches it splits; the actor imports this package


def row_costs(lengths: Sequence[int] | torch.Tensor, arch: DecoderArchitecture) -> list[float]:
    """Forward FLOPs of each row (prompt + response tokens), the cost ``ShardPlan.balance`` evens out."""
    lengths = [int(n) for n in (lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths)]
    flops = {n: arch.forward_flops(n) for n in set(lengths)}  # one per distinct length
    return [flops[n] for n in lengths]


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """Which rows of a batch each data-parallel replica gets.

    rows[d]: the batch's row indices of replica d, ascending; empty when the batch has fewer rows than replicas
    (the replica then gets a filler row, see the module docstring). costs[d]: the sum of its rows' costs.
    """

    rows: tuple[tuple[int, ...], ...]
    costs: tuple[float, ...]
    num_rows: int

    @classmethod
    def balance(cls, costs: Sequence[float], num_replicas: int) -> "ShardPlan":
        """Longest-processing-time-first: rows by falling cost, each to the replica with the least cost so far.

        Ties go to the lower row index and the lower replica index, so the plan depends on the costs alone. Its
        largest share is at most 4/3 of the optimum (Graham's bound), and within one row's cost of the mean.
        """
        if num_replicas < 1:
            raise ValueError(f"num_replicas={num_replicas} must be >= 1")
        if any(cost < 0 for cost in costs):
            raise ValueError("row costs must be >= 0")
        loads = [(0.0, replica) for replica in range(num_replicas)]
        members: list[list[int]] = [[] for _ in range(num_replicas)]
        for row in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
            load, replica = heapq.heappop(loads)
            members[replica].append(row)
            heapq.heappush(loads, (load + costs[row], replica))
        return cls(rows=tuple(tuple(sorted(rows)) for rows in members),
                   costs=tuple(float(sum(costs[i] for i in rows)) for rows in members), num_rows=len(costs))

    @property
    def num_replicas(self) -> int:
        return len(self.rows)

    @property
    def imbalance(self) -> float:
        """Largest replica cost over the mean (1.0 = perfectly even)."""
        mean = sum(self.costs) / len(self.costs)
        return max(self.costs) / mean if mean > 0 else 1.0

    def scatter(self, batch: ActorBatch) -> list[ActorBatch]:
        """One batch per replica: its rows, trimmed to their longest row; a filler row where it has none."""
        if batch.num_rows != self.num_rows:
            raise ValueError(f"shard plan is for {self.num_rows} rows, the batch has {batch.num_rows}")
        shards = []
        for rows in self.rows:
            if rows:
                shards.append(batch.select_rows(torch.tensor(rows, dtype=torch.long)).trimmed())
            else:
                filler = batch.select_rows(torch.tensor([0])).trimmed()
                shards.append(dataclasses.replace(filler, response_mask=torch.zeros_like(filler.response_mask)))
        return shards

    def gather(self, per_replica: Sequence[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """Per-replica [rows_d, width_d] results as one [B, S] tensor shaped ``like``, in the batch's row order
        (zeros past each row's width); filler results are dropped."""
        if len(per_replica) != self.num_replicas:
            raise ValueError(f"{len(per_replica)} results for {self.num_replicas} replicas")
        out = torch.zeros(like.shape, dtype=per_replica[0].dtype)
        for rows, result in zip(self.rows, per_replica):
            if rows:
                out[torch.tensor(rows, dtype=torch.long), : result.shape[1]] = result
        return out
