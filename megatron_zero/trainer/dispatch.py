"""How a call on the Megatron ranks splits its batch over data-parallel replicas and how results come back.

Why: every rank of one data-parallel replica (its TP x PP x CP group) must see the same rows, different replicas
different rows, and a result that all ranks of a replica hold needs to travel back once, not once per rank. The
per-rank object declares this next to each method (as verl's ``register(dispatch_mode=...)`` does), and the actor
group (``actor_group.RayActorGroup.run``) reads the declaration: the loop never builds per-rank argument lists.

How::

    class ActorWorker:
        @register(Dispatch.DP_SHARDED)
        def logprobs(self, shard: ActorBatch): ...       # returns its result on the replica's leader, else None

    per_replica = group.run("logprobs", plan.scatter(batch))   # one shard per replica in, one result per replica out

Modes:
* ``ALL_RANKS`` (the default): every rank gets the same arguments (one object-store copy); every rank's result,
  in rank order.
* ``DP_SHARDED``: the first argument is a list with one entry per data-parallel replica; each entry goes into
  Ray's object store once and only the ranks of that replica fetch it. The other arguments are shared. Results:
  the replica leaders' (``RankLayout.is_replica_leader``), in replica order; the other ranks must return None.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Callable, TypeVar

_MODE_ATTRIBUTE = "__megatron_zero_dispatch__"
F = TypeVar("F", bound=Callable[..., Any])


class Dispatch(enum.Enum):
    ALL_RANKS = "all_ranks"
    DP_SHARDED = "dp_sharded"


def register(mode: Dispatch) -> Callable[[F], F]:
    """Declare how the decorated per-rank method's batch is split and its results gathered."""

    def mark(method: F) -> F:
        setattr(method, _MODE_ATTRIBUTE, mode)
        return method

    return mark


def dispatch_modes(hosted: Any) -> dict[str, Dispatch]:
    """The declared modes of ``hosted``'s public methods (undeclared ones are ``ALL_RANKS``)."""
    modes = {}
    for name in dir(type(hosted)):
        mode = getattr(getattr(type(hosted), name), _MODE_ATTRIBUTE, None)
        if not name.startswith("_") and mode is not None:
            modes[name] = mode
    return modes


@dataclasses.dataclass(frozen=True)
class RankLayout:
    """Where one rank sits in megatron's parallel state."""

    rank: int
    dp_rank: int
    dp_size: int
    tp_rank: int
    pp_rank: int
    cp_rank: int

    @property
    def is_replica_leader(self) -> bool:
        """The rank that returns its replica's result: TP, PP and CP rank 0 (log-probs and metrics reach every
        pipeline stage, ``parallel/pipeline.broadcast_from_last_stage``)."""
        return self.tp_rank == 0 and self.pp_rank == 0 and self.cp_rank == 0

    @classmethod
    def current(cls) -> "RankLayout":
        """This process's layout (after ``initialize_parallel``)."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        return cls(rank=dist.get_rank(), dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(),
                   tp_rank=ps.get_tensor_model_parallel_rank(), pp_rank=ps.get_pipeline_model_parallel_rank(),
                   cp_rank=ps.get_context_parallel_rank())
