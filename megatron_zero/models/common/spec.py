"""Layer specs: Transformer Engine layers on GPU (FP8-capable), megatron-core's local layers on CPU.

Transformer Engine is a GPU-only dependency, so it is probed lazily here and nowhere else.
"""

from __future__ import annotations

import functools

import torch

from megatron_zero.config.model import ModelConfig


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
