"""One SGLang engine rank's bytes on its GPU: weights at the engine's TP (FP8 linears with block scales under
``rollout.quantization=fp8``), the KV cache pool SGLang sizes once at startup, and the CUDA-graph reserve. Part of
the memory planner (planning/memory.py).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

from megatron_zero.planning.actor_memory import stage_parameters

if TYPE_CHECKING:
    from megatron_zero.models.common.architecture import DecoderArchitecture

# sglang.dtype values (config/sglang.py SGLANG_DTYPES); "auto" loads the released checkpoints in bf16.
SGLANG_DTYPE_BYTES = {"auto": 2, "half": 2, "float16": 2, "bfloat16": 2, "float": 4, "float32": 4}

@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineInputs:
    tp_size: int
    mem_fraction_static: float
    dtype: str = "bfloat16"
    # rollout.quantization="fp8": linear weights at 1 byte plus a float32 scale per 128x128 block.
    fp8_weights: bool = False


def layer_linear_parameters(arch: DecoderArchitecture, tp_size: int) -> int:
    """Weight elements of one decoder layer's linears (q/k/v/o, gate/up/down) on one TP rank, the weights FP8
    quantizes; k/v are replicated when the TP exceeds the KV heads (an SGLang engine, as in its KV cache; the
    actor's TP always divides them)."""
    q_rows = arch.num_attention_heads * arch.head_dim // tp_size
    kv_rows = max(1, arch.num_query_groups // tp_size) * arch.head_dim
    attention = arch.hidden_size * (2 * q_rows + 2 * kv_rows)  # q and o; k and v
    return attention + 3 * arch.hidden_size * arch.ffn_hidden_size // tp_size


def engine_linear_parameters(arch: DecoderArchitecture, tp_size: int) -> int:
    """Parameters of one engine rank's quantizable linears, at its TP."""
    return arch.num_layers * layer_linear_parameters(arch, tp_size)


@dataclasses.dataclass(frozen=True)
class EngineMemory:
    """One SGLang engine rank's GPU: weights at its TP, the KV cache pool, the CUDA-graph reserve."""

    tp_size: int
    weights: int
    kv_cache: int
    cuda_graph_reserve: int
    kv_bytes_per_token: int

    @property
    def kv_tokens(self) -> int:
        return max(self.kv_cache, 0) // self.kv_bytes_per_token

    @property
    def total(self) -> int:
        return self.weights + max(self.kv_cache, 0) + self.cuda_graph_reserve


def engine_memory(arch: DecoderArchitecture, engine: EngineInputs, *, device_bytes: int, overhead_bytes: int,
                  cuda_graph_reserve_bytes: int, vocab_pad_multiple: int) -> EngineMemory:
    """SGLang sizes its KV pool once, at startup, so that its static memory (weights + KV cache) is
    ``mem_fraction_static`` of the GPU: KV = free memory after loading the weights - (1 - fraction) x total
    (sglang/srt/model_executor/model_runner.py, profile_max_num_token). The engine starts before the actor
    (trainer/engine_layout.py), so the free memory then is the GPU less the engine's own context. KV heads are replicated
    when the engine's TP exceeds them."""
    e = SGLANG_DTYPE_BYTES[engine.dtype]
    weights = stage_parameters(arch, engine.tp_size, 1, vocab_pad_multiple)[0].num_parameters * e
    if engine.fp8_weights:
        linear = engine_linear_parameters(arch, engine.tp_size)
        weights -= linear * e - linear - 4 * math.ceil(linear / (128 * 128))  # 1 byte each + block scales
    kv_cache = int(device_bytes * engine.mem_fraction_static) - weights - overhead_bytes
    kv_heads = max(1, arch.num_query_groups // engine.tp_size)
    per_token = 2 * arch.num_layers * kv_heads * arch.head_dim * e
    return EngineMemory(tp_size=engine.tp_size, weights=weights, kv_cache=kv_cache,
                        cuda_graph_reserve=cuda_graph_reserve_bytes, kv_bytes_per_token=per_token)
