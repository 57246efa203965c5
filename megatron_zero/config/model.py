"""How the Megatron model is built from an HF architecture: precision, kernels, memory switches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_zero.config.problems import raise_problems

TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")
PARAMS_DTYPES = ("float32", "bfloat16", "float16")
# megatron-core's TransformerConfig.fp8 values; each maps to a Transformer Engine Format (E4M3, HYBRID), which
# every recipe below accepts (transformer_engine/common/recipe/__init__.py, TE 2.4.0 and 2.20.2).
FP8_FORMATS = ("e4m3", "hybrid")
# FP8 recipe -> the multiple of tokens each microbatch is padded to. The names are megatron-core's
# TransformerConfig.fp8_recipe (enums.Fp8Recipe in 0.16.1 and 0.19.2, less "custom", which needs a quantizer
# factory); megatron-core's fp8_utils.get_fp8_recipe makes each the Transformer Engine 2.x recipe
# (transformer_engine/common/recipe/__init__.py) named here. The multiples, read in TE 2.20.2 (and 2.4.0):
# * delayed (DelayedScaling) and tensorwise (Float8CurrentScaling, TE >= 2.2): 16. FP8 GEMMs need every
#   operand's last dimension divisible by 16 (pytorch/utils.py assert_dim_for_fp8_exec), and the weight-gradient
#   GEMM contracts over the tokens; TE's autocast docstring (pytorch/quantization.py) asks for sequence lengths
#   padded to 16. megatron-core pads to the same (fp8_utils.get_fp8_align_size).
# * mxfp8 (MXFP8BlockScaling, Blackwell GPUs): 32, the block of values that share a scale
#   (pytorch/constants.py MXFP8_BLOCK_SCALING_SIZE; MXFP8Quantizer.is_quantizable needs both dims divisible).
# * blockwise (Float8BlockScaling, TE >= 2.3, Hopper GPUs): 128, its block (Float8BlockQuantizer.block_len, and
#   its is_quantizable needs both dims divisible). megatron-core's get_fp8_align_size says 16 here, which TE's
#   quantizer refuses for packed rows (what verl and ms-swift found and pad to 128 for).
FP8_RECIPE_TOKEN_MULTIPLES = {"delayed": 16, "tensorwise": 16, "mxfp8": 32, "blockwise": 128}
FP8_RECIPES = tuple(FP8_RECIPE_TOKEN_MULTIPLES)
RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")


@dataclass(kw_only=True, frozen=True)
class ModelConfig:
    # "auto": Transformer Engine layers when CUDA and TE are present, megatron-core's local layers otherwise.
    transformer_impl: str = "auto"
    params_dtype: str = "bfloat16"
    # FP8 through Transformer Engine ("e4m3" or "hybrid": E4M3 forward, E5M2 gradients); None trains in params_dtype.
    fp8: Optional[str] = None
    # How FP8 scales are chosen (FP8_RECIPE_TOKEN_MULTIPLES); used only with fp8.
    fp8_recipe: str = "delayed"
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None
    # Vocabulary rows are padded to a multiple of this so that any TP size dividing it can load the
    # same checkpoint; 128 covers TP up to 128.
    vocab_pad_multiple: int = 128

    def __post_init__(self) -> None:
        problems: list[str] = []  # every value problem of this config, raised together
        problems += _one_of("model.transformer_impl", self.transformer_impl, TRANSFORMER_IMPLS)
        problems += _one_of("model.params_dtype", self.params_dtype, PARAMS_DTYPES)
        problems += _one_of("model.fp8_recipe", self.fp8_recipe, FP8_RECIPES)
        if self.fp8 is not None:
            problems += _one_of("model.fp8", self.fp8, FP8_FORMATS)
            if self.transformer_impl == "local":
                problems.append("model.fp8 needs model.transformer_impl='transformer_engine' (or 'auto' on a GPU); "
                                "megatron-core's local layers have no FP8 kernels")
        elif self.fp8_recipe != "delayed":
            problems.append(f"model.fp8_recipe={self.fp8_recipe!r} has no effect without model.fp8; set model.fp8 "
                            f"to one of {list(FP8_FORMATS)} or drop model.fp8_recipe")
        if self.recompute_granularity is not None:
            problems += _one_of("model.recompute_granularity", self.recompute_granularity, RECOMPUTE_GRANULARITIES)
            if self.recompute_granularity == "full" and (self.recompute_method is None or self.recompute_num_layers is None):
                problems.append("model.recompute_granularity='full' needs model.recompute_method ('uniform' or 'block') "
                                "and model.recompute_num_layers")
        if self.recompute_method is not None:
            problems += _one_of("model.recompute_method", self.recompute_method, RECOMPUTE_METHODS)
        if self.vocab_pad_multiple < 1:
            problems.append(f"model.vocab_pad_multiple={self.vocab_pad_multiple} must be >= 1")
        raise_problems(problems)


def _one_of(field: str, value: str, allowed: tuple[str, ...]) -> list[str]:
    """The problem of ``value`` for ``field`` if it is not one of ``allowed`` (a list: none or one)."""
    return [] if value in allowed else [f"{field}={value!r} is not supported; use one of {list(allowed)}"]
