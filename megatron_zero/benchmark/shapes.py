"""Model shapes to benchmark: published HF config.json sizes (and the tests'
tiny one), written out as random checkpoints (no downloads).

Why: throughput depends on the shape (hidden size, heads, layers, vocabulary), not on the weights, so a random
model of a real config measures what the real one would cost without fetching it. A shape is either a named
entry of ``MODEL_SHAPES`` (the config.json fields of the released checkpoints that matter for the shape) or any
HF ``config.json`` given by path. ``fit_num_layers`` cuts the layer count when the actor, its optimizer state
and the colocated engine would not fit the device: the output states it, and every per-GPU figure is then of
that smaller model.

    config = load_shape("qwen2.5-0.5b")            # or load_shape("path/to/config.json")
    write_random_model(config, "out/hf", num_layers=4, dtype="bfloat16")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from megatron_zero.models.common.architecture import DecoderArchitecture
from megatron_zero.models.tiny import TINY_CONFIGS

# The shape fields of the released config.json files (huggingface.co/<org>/<model>/blob/main/config.json).
_QWEN2_5 = dict(model_type="qwen2", hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1_000_000.0,
                use_sliding_window=False, torch_dtype="bfloat16")
MODEL_SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(_QWEN2_5, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                         max_position_embeddings=32768, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(_QWEN2_5, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                         max_position_embeddings=131072, tie_word_embeddings=True),
    "qwen2.5-7b": dict(_QWEN2_5, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       max_position_embeddings=131072, tie_word_embeddings=False),
    "llama-3.1-8b": dict(model_type="llama", hidden_act="silu", rms_norm_eps=1e-5, rope_theta=500_000.0,
                         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=8192),
                         hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                         tie_word_embeddings=False, torch_dtype="bfloat16"),
    # The test suite's tiny Qwen2 (models/tiny.py): seconds on a CPU, for CI and trying the tool out.
    "tiny-qwen2": dict(TINY_CONFIGS["qwen2"]),
}

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Actor bytes per parameter with megatron-core's distributed optimizer at DP=1 (actor.py): the weights, the
# fp32 gradient buffer (grad_reduce_in_fp32), Adam's two fp32 moments, and fp32 main weights when the model
# trains in 16 bits.
_ACTOR_BYTES_PER_PARAM = {"float32": 4 + 4 + 8, "bfloat16": 2 + 4 + 8 + 4, "float16": 2 + 4 + 8 + 4}


def load_shape(name_or_path: str) -> dict[str, Any]:
    """The config.json dict of a named shape (``MODEL_SHAPES``) or of a config.json file / HF model directory."""
    if name_or_path in MODEL_SHAPES:
        return dict(MODEL_SHAPES[name_or_path])
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"shape {name_or_path!r} is neither a known shape ({sorted(MODEL_SHAPES)}) nor a config.json "
                         "file or a directory holding one")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def parameter_counts(arch: DecoderArchitecture) -> tuple[int, int]:
    """(parameters of one decoder layer, parameters outside the layers: embedding, final norm, output layer)."""
    q_width = arch.num_attention_heads * arch.head_dim
    kv_width = arch.num_query_groups * arch.head_dim
    attention = arch.hidden_size * (q_width + 2 * kv_width) + q_width * arch.hidden_size
    bias = (q_width + 2 * kv_width) if arch.qkv_bias else 0
    per_layer = attention + bias + 3 * arch.hidden_size * arch.ffn_hidden_size + 2 * arch.hidden_size
    embeddings = arch.vocab_size * arch.hidden_size * (1 if arch.tie_word_embeddings else 2)
    return per_layer, embeddings + arch.hidden_size


def resident_bytes(arch: DecoderArchitecture, num_layers: int, dtype: str) -> int:
    """Device bytes of what the benchmark keeps resident: the actor with its optimizer state, and the colocated
    torch engine's copy of the weights (activations and the KV cache come on top)."""
    per_layer, outside = parameter_counts(arch)
    num_params = per_layer * num_layers + outside
    return num_params * (_ACTOR_BYTES_PER_PARAM[dtype] + _BYTES[dtype])


def fit_num_layers(arch: DecoderArchitecture, dtype: str, memory_bytes: int, fraction: float = 0.7) -> int:
    """The most layers (up to the config's) whose resident bytes stay within ``fraction`` of ``memory_bytes``;
    the rest is left for activations, the KV cache and the allocator. Raises when not even one layer fits."""
    budget = fraction * memory_bytes
    for num_layers in range(arch.num_layers, 0, -1):
        if resident_bytes(arch, num_layers, dtype) <= budget:
            return num_layers
    raise ValueError(f"even one layer of this shape needs {resident_bytes(arch, 1, dtype) / 2**30:.1f} GiB resident "
                     f"({dtype}), more than {fraction:.0%} of the device's {memory_bytes / 2**30:.1f} GiB; use a "
                     "smaller shape or a larger device")


def write_random_model(hf_config: dict[str, Any], out_dir: str | Path, *, num_layers: int, dtype: str,
                       seed: int = 0) -> Path:
    """A randomly initialised HF checkpoint of ``hf_config``'s shape with ``num_layers`` layers, in ``dtype``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {name: value for name, value in hf_config.items() if name not in ("architectures", "model_type")}
    fields.update(num_hidden_layers=num_layers, torch_dtype=dtype)
    config = AutoConfig.for_model(hf_config["model_type"], **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(str(out_dir))
    return Path(out_dir)
