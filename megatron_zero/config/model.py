"""How the Megatron model is built from an HF architecture: precision, kernels, memory switches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")
PARAMS_DTYPES = ("float32", "bfloat16", "float16")
FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")
RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")


@dataclass(kw_only=True, frozen=True)
class ModelConfig:
    # "auto": Transformer Engine layers when CUDA and TE are present, megatron-core's local layers otherwise.
    transformer_impl: str = "auto"
    params_dtype: str = "bfloat16"
    # FP8 through Transformer Engine; None trains in params_dtype.
    fp8: Optional[str] = None
    fp8_recipe: str = "delayed"
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None
    # Vocabulary rows are padded to a multiple of this so that any TP size dividing it can load the
    # same checkpoint; 128 covers TP up to 128.
    vocab_pad_multiple: int = 128

    def __post_init__(self) -> None:
        _one_of("model.transformer_impl", self.transformer_impl, TRANSFORMER_IMPLS)
        _one_of("model.params_dtype", self.params_dtype, PARAMS_DTYPES)
        _one_of("model.fp8_recipe", self.fp8_recipe, FP8_RECIPES)
        if self.fp8 is not None:
            _one_of("model.fp8", self.fp8, FP8_FORMATS)
            if self.transformer_impl == "local":
                raise ValueError("model.fp8 needs model.transformer_impl='transformer_engine' (or 'auto' on a GPU); "
                                 "megatron-core's local layers have no FP8 kernels")
        if self.recompute_granularity is not None:
            _one_of("model.recompute_granularity", self.recompute_granularity, RECOMPUTE_GRANULARITIES)
            if self.recompute_granularity == "full" and (self.recompute_method is None or self.recompute_num_layers is None):
                raise ValueError("model.recompute_granularity='full' needs model.recompute_method ('uniform' or 'block') "
                                 "and model.recompute_num_layers")
        if self.recompute_method is not None:
            _one_of("model.recompute_method", self.recompute_method, RECOMPUTE_METHODS)
        if self.vocab_pad_multiple < 1:
            raise ValueError(f"model.vocab_pad_multiple={self.vocab_pad_multiple} must be >= 1")


def _one_of(field: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is not supported; use one of {list(allowed)}")
