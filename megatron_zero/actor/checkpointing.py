"""Checkpoints of the Megatron actor: weights, distributed-optimizer state, LR schedule and step count.

Why: resuming an RL run must continue the optimizer exactly (Adam moments and step count, the LR schedule),
not only the weights, and it must be able to do so at another TP x PP (x DP) layout than the one that
saved, e.g. after moving to more or fewer GPUs. megatron-core's ``dist_checkpointing`` stores every tensor
by its global shard, so tensors that are declared per model parameter load at any layout.

How: every rank calls ``save_actor_checkpoint(actor, dir)`` / ``load_actor_checkpoint(actor, dir)``
(collective, like ``dist_checkpointing`` itself); ``MegatronActor.save_checkpoint`` delegates here.
``tests/test_actor_checkpoint.py`` saves at one layout, resumes at another and compares with an
uninterrupted run.

Format: the distributed optimizer's state is saved in megatron-core's ``fully_reshardable`` format: its
flat, DP-sharded buffers are gathered over DP and cut into one tensor per model parameter (main param,
exp_avg, exp_avg_sq), declared with that parameter's own sharding, so they reshard like the weights. Of the
formats megatron-core 0.16.1 offers, it is the only one that changes TP/PP: "dp_reshardable" stores the
buffers as they are (same TP/PP only), and "fully_sharded_model_space" (its default) declares
``flattened_range`` shards, which 0.16.1's ``ShardedTensor`` rejects outright. The price: while saving and
loading, each rank holds the fp32 main params and both Adam moments of its whole TP x PP shard in host
memory (12 bytes per parameter of the shard), not only its DP slice.

One megatron-core gap is bridged here (``_load_optimizer_state``): with torch's Adam (no Apex / Transformer
Engine, as on CPU) the per-parameter state holds ``step``, which megatron keeps in the param groups and
leaves out of the per-parameter tensors, but its loader copies *every* key of the live per-parameter state
from the loaded one, so it fails with ``KeyError: 'step'``. The step count is therefore loaded through the
param groups first and set aside while the tensors are copied.

The format and the saving layout are recorded as ``dist_checkpointing`` content metadata: a checkpoint in
another format (e.g. the "dp_reshardable" ones of earlier versions) is refused with both layouts named,
and so is one whose tensors do not fit this actor.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

if TYPE_CHECKING:
    from megatron_zero.actor.actor import MegatronActor

logger = logging.getLogger(__name__)

# See the module docstring for why this format.
OPTIMIZER_SHARDING = "fully_reshardable"


def _optimizers(actor: "MegatronActor") -> list[Any]:
    return getattr(actor.optimizer, "chained_optimizers", [actor.optimizer])


def current_layout() -> dict[str, int]:
    """This process's TP, PP and DP sizes (what a checkpoint records, and is checked against)."""
    from megatron.core import parallel_state

    return {"tensor_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
            "pipeline_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
            "data_parallel_size": parallel_state.get_data_parallel_world_size()}


def _describe(layout: dict[str, int] | None) -> str:
    if not layout:
        return "an unrecorded layout"
    return "TP={tensor_parallel_size} x PP={pipeline_parallel_size} x DP={data_parallel_size}".format(**layout)


def _sharded_state_dict(actor: "MegatronActor", is_loading: bool) -> dict[str, Any]:
    model_state = actor.model.module.sharded_state_dict()
    return {
        "model": model_state,
        "optimizer": actor.optimizer.sharded_state_dict(
            model_state, is_loading=is_loading, metadata={"distrib_optim_sharding_type": OPTIMIZER_SHARDING}),
        "scheduler": actor.scheduler.state_dict(),
        "num_steps": actor.num_steps,
    }


def save_actor_checkpoint(actor: "MegatronActor", checkpoint_dir: Path) -> None:
    """Write the actor's weights, optimizer state, LR schedule and step as one torch_dist checkpoint."""
    from megatron.core import dist_checkpointing

    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(_sharded_state_dict(actor, is_loading=False), str(checkpoint_dir),
                            content_metadata={"distrib_optim_sharding_type": OPTIMIZER_SHARDING,
                                              "layout": current_layout()})


def _check_format(checkpoint_dir: Path) -> dict[str, int]:
    """The layout that saved ``checkpoint_dir``; raises if its optimizer state is not in our format."""
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(checkpoint_dir))
    content = dist_checkpointing.load_content_metadata(preloaded_state_dict=common) or {}
    found = content.get("distrib_optim_sharding_type")
    if found is None and isinstance(common.get("optimizer"), dict):
        # Written without content metadata: the optimizer's own record of its format, if any.
        found = common["optimizer"].get("param_state_sharding_type")
    if found != OPTIMIZER_SHARDING:
        raise ValueError(
            f"actor checkpoint {checkpoint_dir} holds optimizer state in format {found!r}, written at "
            f"{_describe(content.get('layout'))}; this actor ({_describe(current_layout())}) loads only "
            f"{OPTIMIZER_SHARDING!r} checkpoints (any layout). Resume it with the megatron-zero version and the "
            "layout that wrote it, or start from its weights (tools/convert_checkpoint.py)")
    return content["layout"]


def load_actor_checkpoint(actor: "MegatronActor", checkpoint_dir: Path) -> None:
    """Load what ``save_actor_checkpoint`` wrote, at any TP x PP x DP layout, into an actor of the same model."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException

    saved_layout = _check_format(checkpoint_dir)
    # Resuming before any step: the optimizer has no Adam state yet for the checkpoint to load into.
    # megatron-core creates it with a zero-gradient dummy step (weights and state are then loaded).
    for optimizer in _optimizers(actor):
        if not optimizer.optimizer.state:
            optimizer._init_optimizer_states_with_dummy_values()
    try:
        state = dist_checkpointing.load(_sharded_state_dict(actor, is_loading=True), str(checkpoint_dir))
    except CheckpointingException as error:
        raise ValueError(f"actor checkpoint {checkpoint_dir} (saved at {_describe(saved_layout)}) does not fit this "
                         f"actor at {_describe(current_layout())}: {error}") from error
    actor.model.module.load_state_dict(state["model"], strict=True)
    _load_optimizer_state(actor, state["optimizer"])
    actor.scheduler.load_state_dict(state["scheduler"])
    actor.num_steps = int(state["num_steps"])
    logger.info("loaded actor checkpoint %s (saved at %s) at %s, step %d", checkpoint_dir,
                _describe(saved_layout), _describe(current_layout()), actor.num_steps)


def _load_optimizer_state(actor: "MegatronActor", optimizer_state: dict[str, Any]) -> None:
    """megatron-core's optimizer ``load_state_dict``, in two phases around its ``KeyError: 'step'``.

    The loaded state is one optimizer's dict, or ``{index: dict}`` for several chained optimizers.
    Phase 1 loads everything but the per-parameter tensors (param groups, whose ``step`` megatron writes into
    torch Adam's per-parameter state); phase 2 copies the tensors with that ``step`` set aside.
    """
    optimizers = _optimizers(actor)
    states = [optimizer_state] if "param_state" in optimizer_state else [
        optimizer_state[index] for index in sorted(optimizer_state)]
    assert len(states) == len(optimizers), (len(states), len(optimizers))
    param_states = [state.pop("param_state") for state in states]
    # Without mixed precision the optimizer's "main" params are the model's own leaf tensors.
    with torch.no_grad():
        actor.optimizer.load_state_dict(optimizer_state)
        for optimizer, param_state in zip(optimizers, param_states):
            with _adam_step_set_aside(optimizer.optimizer):
                optimizer.load_parameter_state_from_fully_reshardable(param_state)


@contextlib.contextmanager
def _adam_step_set_aside(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Remove torch Adam's per-parameter ``step`` for the duration, then give each parameter its own copy.

    Own copies: megatron's ``load_state_dict`` puts one shared step tensor into every parameter's state, and
    torch's Adam increments each parameter's step in place, so a shared one would advance once per parameter.
    """
    steps = {param: state.pop("step") for param, state in optimizer.state.items() if "step" in state}
    try:
        yield
    finally:
        for param, step in steps.items():
            optimizer.state[param]["step"] = step.detach().clone()
