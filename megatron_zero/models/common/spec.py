"""Layer specs: Transformer Engine layers on GPU (FP8-capable), megatron-core's local layers on CPU.

Transformer Engine is a GPU-only dependency, so it is probed lazily here and nowhere else.

The two specs' weights have the same checkpoint keys, but not the same non-tensor state: every TE module
carries an ``_extra_state`` entry (its FP8 scaling state, ``TransformerEngineBaseModule.get_extra_state`` in
TE 2.x's ``transformer_engine/pytorch/module/base.py``), and the attention of the local spec has none, so a
checkpoint converted through the local spec lacks e.g. ``self_attention.core_attention._extra_state``. TE's
``set_extra_state`` keeps a module's fresh state when it gets none, which is what a converted checkpoint means.
So checkpoints load with ``load_checkpoint_allowing_extra_state`` and ``load_state_dict_allowing_extra_state``:
``._extra_state`` entries may be missing or unexpected, every other key is strict.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import torch

from megatron_zero.config.model import ModelConfig

logger = logging.getLogger(__name__)

EXTRA_STATE_SUFFIX = "._extra_state"


@functools.cache
def have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_transformer_impl(model_config: ModelConfig) -> str:
    impl = model_config.transformer_impl
    if impl == "auto":
        return "transformer_engine" if torch.cuda.is_available() and have_transformer_engine() else "local"
    if impl == "transformer_engine" and not (torch.cuda.is_available() and have_transformer_engine()):
        raise RuntimeError("model.transformer_impl='transformer_engine' needs CUDA and the transformer-engine package "
                           "(pip install 'megatron-zero[gpu]'); use 'local' or 'auto' on this machine")
    return impl


def gpt_layer_spec(model_config: ModelConfig):
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if resolve_transformer_impl(model_config) == "transformer_engine":
        return get_gpt_layer_with_transformer_engine_spec()
    return get_gpt_layer_local_spec(normalization="RMSNorm")


def _check_only_extra_state_differs(missing: set[str], unexpected: set[str], what: str) -> None:
    strict_missing = sorted(key for key in missing if not key.endswith(EXTRA_STATE_SUFFIX))
    strict_unexpected = sorted(key for key in unexpected if not key.endswith(EXTRA_STATE_SUFFIX))
    if strict_missing or strict_unexpected:
        raise KeyError(f"{what}: keys the model has and the checkpoint lacks: {strict_missing}; keys the checkpoint "
                       f"has and the model lacks: {strict_unexpected} (only {EXTRA_STATE_SUFFIX} entries may differ)")
    if missing or unexpected:
        logger.debug("%s: %d %s entries only in the model, %d only in the checkpoint", what, len(missing),
                     EXTRA_STATE_SUFFIX, len(unexpected))


def load_checkpoint_allowing_extra_state(sharded_state_dict: dict[str, Any], checkpoint_dir: str | Path) -> Any:
    """``dist_checkpointing.load`` that skips the ``._extra_state`` objects the checkpoint lacks (module docstring).

    Every other sharded key must be in both the request and the checkpoint (megatron's "unexpected" and
    "missing" keys, checked over all ranks); a mismatch raises megatron's ``CheckpointingException``.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from megatron.core.dist_checkpointing.validation import StrictHandling

    # RETURN_ALL drops the requested keys the checkpoint lacks and reports both kinds of mismatch.
    state, in_checkpoint_only, in_request_only = dist_checkpointing.load(
        sharded_state_dict, str(checkpoint_dir), strict=StrictHandling.RETURN_ALL)
    try:
        _check_only_extra_state_differs(in_request_only, in_checkpoint_only, f"checkpoint {checkpoint_dir}")
    except KeyError as error:
        raise CheckpointingException(error.args[0]) from None
    return state


def load_state_dict_allowing_extra_state(module: torch.nn.Module, state_dict: dict[str, Any]) -> None:
    """``module.load_state_dict(state_dict, strict=True)``, except that ``._extra_state`` entries may be missing or
    unexpected (module docstring); a missing one leaves that module's extra state as it is."""
    expected = set(module.state_dict(keep_vars=True))
    given = set(state_dict)
    _check_only_extra_state_differs(expected - given, given - expected, f"loading {type(module).__name__}")
    # strict=False only for the _extra_state entries: every other key was checked above, and shapes still are.
    module.load_state_dict({key: value for key, value in state_dict.items() if key in expected}, strict=False)
