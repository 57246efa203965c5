"""Checkpoints of the Megatron actor: weights, distributed-optimizer state, LR schedule and step count.

Why: resuming an RL run must continue the optimizer exactly (Adam moments and step count, the LR schedule),
not only the weights, and it must be able to do so at another TP x PP (x DP) layout than the one that
saved, e.g. after moving to more or fewer GPUs. megatron-core's ``dist_checkpointing`` stores every tensor
by its global shard, so tensors that are declared per model parameter load at any layout.

How: every rank calls ``save_actor_checkpoint(actor, dir)`` / ``load_actor_checkpoint(actor, dir)``
(collective, like ``dist_checkpointing`` itself); ``MegatronActor.save_checkpoint`` delegates here.
``tests/test_actor_checkpoint.py`` saves at one layout, resumes at others and compares with uninterrupted runs.

Format: the distributed optimizer's state is stored as megatron-core's "fully_reshardable" format lays it
out: its flat, DP-sharded buffers are gathered over DP and cut into one tensor per model parameter (fp32
main param, exp_avg, exp_avg_sq) declared with that parameter's own sharding, so they reshard like the
weights. Of megatron-core 0.16.1's formats it is the only one that changes TP/PP: "dp_reshardable" stores
the buffers as they are (same TP/PP only) and "fully_sharded_model_space" (its default) declares
``flattened_range`` shards, which 0.16.1's ``ShardedTensor`` rejects outright. The price: while saving and
loading, each rank holds the main params and both Adam moments of its whole TP x PP shard in host memory
(12 bytes per parameter of the shard), not only its DP slice.

megatron-core (0.16.1 and 0.19.2, the newest release) gets four things wrong on this path; each is bridged
here under its switch in ``mcore_bugs`` (on where the installed version has the bug) and caught by the tests:

* Its save cuts each parameter out of the gathered buffers at the parameter's offset in the *padded* DDP
  buffer, but the gathered buffers leave out the padding at the end of each bucket, so every parameter
  after a padded bucket end is stored shifted (it warns "param range exceeds unpadded buffer ... data
  corruption"). With the distributed optimizer the shared embedding of a tied model at PP > 1 always gets a
  bucket of its own (and ``overlap_grad_reduce`` would split every buffer into buckets): a TP=2 x PP=2
  checkpoint held a shifted embedding, and loading it (the main params are the weights) moved the
  embedding by 78 times a training step. ``_param_state`` builds the same tensors at the right offsets;
  megatron-core's own loader reads them.
* With torch's Adam (no Apex / Transformer Engine, as on CPU) the per-parameter state holds ``step``, which
  megatron keeps in the param groups and leaves out of the per-parameter tensors, but its loader copies
  *every* key of the live per-parameter state from the loaded one: ``KeyError: 'step'``.
  ``_load_optimizer_state`` loads the param groups (and with them the step) first and sets ``step`` aside
  while the tensors are copied (``_adam_step_set_aside``).
* Loading the param groups puts one step tensor into every parameter's state, which torch's Adam would then
  advance once per parameter per step; ``_unshare_adam_steps`` gives each parameter its own copy.
* Its LR scheduler's ``load_state_dict`` adds the saved step count to its own, which is right only for a
  scheduler that never stepped: loading into an actor that had trained on ran ahead on the schedule.

The format and the saving layout are recorded as ``dist_checkpointing`` content metadata: a checkpoint in
another format (e.g. the "dp_reshardable" ones of earlier versions) is refused with both layouts named,
and so is one whose tensors do not fit this actor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

from megatron_zero.actor.mcore_bugs import (
    FULLY_RESHARDABLE_SAVE_SHIFTS_PARAMS,
    OPTIMIZER_LOAD_SHARES_ADAM_STEP,
    PARAM_STATE_LOAD_COPIES_ADAM_STEP,
    SCHEDULER_LOAD_ADDS_STEPS,
)
from megatron_zero.models.common.spec import load_checkpoint_allowing_extra_state, load_state_dict_allowing_extra_state

if TYPE_CHECKING:
    from megatron_zero.actor.actor import MegatronActor

logger = logging.getLogger(__name__)

# Megatron-core's name for the layout of the optimizer state (module docstring).
OPTIMIZER_SHARDING = "fully_reshardable"


def _current_layout() -> dict[str, int]:
    """This process's TP, PP and DP sizes (what a checkpoint records)."""
    from megatron.core import parallel_state

    return {"tensor_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
            "pipeline_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
            "data_parallel_size": parallel_state.get_data_parallel_world_size()}


def _describe(layout: dict[str, int] | None) -> str:
    if not layout:
        return "an unrecorded layout"
    return "TP={tensor_parallel_size} x PP={pipeline_parallel_size} x DP={data_parallel_size}".format(**layout)


def _param_state(optimizer: Any, model_state: dict[str, Any], is_loading: bool) -> dict[int, dict[str, Any]]:
    """megatron-core's fully_reshardable per-parameter state of one DistributedOptimizer, at the right offsets.

    Same keys (``optimizer.state.<param|exp_avg|exp_avg_sq>.<model key>``), shapes, replica ids and order as
    ``DistributedOptimizer.sharded_param_state_fully_reshardable``, so that
    ``load_parameter_state_from_fully_reshardable`` reads it; only the offsets differ (module docstring).
    When loading, the tensors are empty buffers for ``dist_checkpointing`` to fill.
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
    from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories

    model_tensors, _ = extract_sharded_tensors_and_factories(model_state)
    sharded_by_param = {sharded.data: sharded for sharded in nested_values(model_tensors)}
    world = optimizer.get_parameter_state_dp_zero(use_gloo_comm=False, empty_data=is_loading,
                                                  return_on_all_ranks=True)
    state: dict[int, dict[str, Any]] = {}
    for buffer_index, buffer in enumerate(optimizer.buffers):
        (world_tensors,) = world[buffer_index].values()  # one dtype per buffer, as megatron asserts
        # The gathered tensors hold each bucket's unpadded part, back to back.
        bucket_starts = list(itertools.accumulate((bucket.numel_unpadded for bucket in buffer.buckets), initial=0))
        for param, (start, end, bucket_id) in buffer.param_index_map.items():
            sharded = sharded_by_param[param]
            offset = bucket_starts[bucket_id] + start - buffer.buckets[bucket_id].offset
            tensors = {}
            for name in ("param", "exp_avg", "exp_avg_sq"):
                data = world_tensors[name][offset : offset + end - start].view(sharded.data.shape)
                fields = {"key": f"optimizer.state.{name}.{sharded.key}", "data": data,
                          "replica_id": sharded.replica_id}
                if not isinstance(sharded, ShardedTensorFactory):  # a factory has no dtype of its own
                    fields["dtype"] = data.dtype
                tensors[name] = dataclasses.replace(sharded, **fields)
                tensors[name].validate_metadata_integrity()
            state[len(state)] = tensors
    return state


def _fully_reshardable_param_state(optimizer: Any, model_state: dict[str, Any], is_loading: bool) -> dict[int, Any]:
    if FULLY_RESHARDABLE_SAVE_SHIFTS_PARAMS:
        return _param_state(optimizer, model_state, is_loading)
    return optimizer.sharded_param_state_fully_reshardable(model_state, is_loading=is_loading, metadata={})


def _sharded_state_dict(actor: "MegatronActor", is_loading: bool) -> dict[str, Any]:
    model_state = actor.model.module.sharded_state_dict()
    # What DistributedOptimizer.sharded_state_dict returns for OPTIMIZER_SHARDING (with our param state where
    # megatron's is shifted); several chained optimizers (e.g. for expert parameters) give {index: state}, as in
    # megatron-core.
    optimizer_states = [{**optimizer.state_dict(),
                         "param_state": _fully_reshardable_param_state(optimizer, model_state, is_loading),
                         "param_state_sharding_type": OPTIMIZER_SHARDING} for optimizer in actor.distributed_optimizers]
    return {
        "model": model_state,
        "optimizer": optimizer_states[0] if len(optimizer_states) == 1 else dict(enumerate(optimizer_states)),
        "scheduler": actor.scheduler.state_dict(),
        "num_steps": actor.num_steps,
    }


def save_actor_checkpoint(actor: "MegatronActor", checkpoint_dir: Path) -> None:
    """Write the actor's weights, optimizer state, LR schedule and step as one torch_dist checkpoint."""
    from megatron.core import dist_checkpointing

    if not all(optimizer.optimizer.state for optimizer in actor.distributed_optimizers):
        raise RuntimeError(f"save_checkpoint({checkpoint_dir}) before the first train_step: the optimizer has no "
                           "state yet, and the weights are those of the model checkpoint the actor was built from")
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(_sharded_state_dict(actor, is_loading=False), str(checkpoint_dir),
                            content_metadata={"distrib_optim_sharding_type": OPTIMIZER_SHARDING,
                                              "layout": _current_layout()})


def _check_format(checkpoint_dir: Path) -> dict[str, int]:
    """The layout that saved ``checkpoint_dir``; raises unless ``save_actor_checkpoint`` wrote it.

    Our content metadata is required, not only the optimizer's own record of its format: megatron-core's own
    "fully_reshardable" save may hold shifted tensors (module docstring).
    """
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(checkpoint_dir))
    content = dist_checkpointing.load_content_metadata(preloaded_state_dict=common) or {}
    if content.get("distrib_optim_sharding_type") == OPTIMIZER_SHARDING and "layout" in content:
        return content["layout"]
    optimizer = common.get("optimizer")
    found = content.get("distrib_optim_sharding_type") or (
        optimizer.get("param_state_sharding_type") if isinstance(optimizer, dict) else None)
    raise ValueError(
        f"actor checkpoint {checkpoint_dir} holds optimizer state in format {found!r}, written at "
        f"{_describe(content.get('layout'))}; this actor ({_describe(_current_layout())}) loads only the "
        f"{OPTIMIZER_SHARDING!r} checkpoints of megatron-zero's save_actor_checkpoint (any layout). Resume it with "
        "the megatron-zero version and the layout that wrote it, or start from its weights")


def load_actor_checkpoint(actor: "MegatronActor", checkpoint_dir: Path) -> None:
    """Load what ``save_actor_checkpoint`` wrote, at any TP x PP x DP layout, into an actor of the same model.

    Transformer Engine layers' ``_extra_state`` (FP8 scaling state) comes back where the checkpoint has it, e.g.
    not from one saved by local layers on CPU (``models/common/spec.py``); every other key must match.
    """
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException

    saved_layout = _check_format(checkpoint_dir)
    # Resuming before any step: the optimizer has no Adam state yet for the checkpoint to load into.
    # megatron-core creates it with a zero-gradient dummy step (weights and state are then loaded).
    for optimizer in actor.distributed_optimizers:
        if not optimizer.optimizer.state:
            optimizer._init_optimizer_states_with_dummy_values()
    try:
        state = load_checkpoint_allowing_extra_state(_sharded_state_dict(actor, is_loading=True), checkpoint_dir)
    # megatron's own validation, or torch's wrapping of it (e.g. a tensor of another shape).
    except (CheckpointingException, CheckpointException) as error:
        raise ValueError(f"actor checkpoint {checkpoint_dir} (saved at {_describe(saved_layout)}) does not fit this "
                         f"actor at {_describe(_current_layout())}: {error}") from error
    load_state_dict_allowing_extra_state(actor.model.module, state["model"])
    _load_optimizer_state(actor, state["optimizer"])
    if SCHEDULER_LOAD_ADDS_STEPS:
        # megatron's scheduler load advances its step count by the saved one (it assumes a new scheduler), so an
        # actor that has trained since it was built would run ahead on the LR schedule.
        actor.scheduler.num_steps = 0
    actor.scheduler.load_state_dict(state["scheduler"])
    actor.num_steps = int(state["num_steps"])
    logger.info("loaded actor checkpoint %s (saved at %s) at %s, step %d", checkpoint_dir,
                _describe(saved_layout), _describe(_current_layout()), actor.num_steps)


def _load_optimizer_state(actor: "MegatronActor", optimizer_state: dict[str, Any]) -> None:
    """megatron-core's optimizer ``load_state_dict``, in two phases around its ``KeyError: 'step'``.

    Phase 1 loads everything but the per-parameter tensors: the param groups, whose ``step`` megatron writes
    into torch Adam's per-parameter state. Phase 2 copies the tensors with that ``step`` set aside.
    """
    optimizers = actor.distributed_optimizers
    states = [optimizer_state] if len(optimizers) == 1 else [optimizer_state[i] for i in sorted(optimizer_state)]
    param_states = [state.pop("param_state") for state in states]
    # Without mixed precision the optimizer's "main" params are the model's own leaf tensors.
    with torch.no_grad():
        actor.optimizer.load_state_dict(optimizer_state)
        for optimizer, param_state in zip(optimizers, param_states):
            if OPTIMIZER_LOAD_SHARES_ADAM_STEP:
                _unshare_adam_steps(optimizer.optimizer)
            with _adam_step_set_aside(optimizer.optimizer) if PARAM_STATE_LOAD_COPIES_ADAM_STEP else \
                    contextlib.nullcontext():
                optimizer.load_parameter_state_from_fully_reshardable(param_state)


def _unshare_adam_steps(optimizer: torch.optim.Optimizer) -> None:
    """Give each parameter its own copy of torch Adam's ``step``: Adam increments it in place, per parameter."""
    for state in optimizer.state.values():
        if "step" in state:
            state["step"] = state["step"].detach().clone()


@contextlib.contextmanager
def _adam_step_set_aside(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Remove torch Adam's per-parameter ``step`` for the duration (megatron's copy has none to give it)."""
    steps = {param: state.pop("step") for param, state in optimizer.state.items() if "step" in state}
    try:
        yield
    finally:
        for param, step in steps.items():
            optimizer.state[param]["step"] = step
