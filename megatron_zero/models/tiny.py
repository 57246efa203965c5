"""Tiny random HF models of every supported family, built from a config (no downloads).

They carry each family's awkward shapes so that tests and the conversion demo exercise them:
an odd vocabulary size (padding), grouped-query attention, Qwen2's QKV bias and tied
embeddings, Llama-3.1's llama3 rotary scaling, Mistral's head_dim != hidden/heads and a
sliding window shorter than the test sequences.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

_COMMON = dict(vocab_size=251, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, torch_dtype="float32")

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen2": dict(_COMMON, model_type="qwen2", tie_word_embeddings=True, rope_theta=1_000_000.0),
    "qwen2-untied": dict(_COMMON, model_type="qwen2", tie_word_embeddings=False, rope_theta=1_000_000.0),
    "llama": dict(_COMMON, model_type="llama", tie_word_embeddings=False, head_dim=32, hidden_size=128,
                  rope_theta=10_000.0, max_position_embeddings=16384,
                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                    original_max_position_embeddings=8192)),
    "mistral": dict(_COMMON, model_type="mistral", tie_word_embeddings=False, head_dim=24, sliding_window=6,
                    rope_theta=1_000_000.0),
}


ATTENTION_SHARPNESS = 8.0


def tiny_config(name: str, **overrides: Any):
    from transformers import AutoConfig

    if name not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {sorted(TINY_CONFIGS)}")
    fields = dict(TINY_CONFIGS[name], **overrides)
    model_type = fields.pop("model_type")
    return AutoConfig.for_model(model_type, **fields)


def save_tiny_model(name: str, out_dir: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Write a randomly initialised tiny HF model (safetensors + config) to ``out_dir``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(name, **overrides), dtype=torch.float32)
    # HF initialises biases and norms to constants; randomise them so a mapping error cannot hide.
    # Random tiny models attend almost uniformly, which hides position-dependent errors (rotary
    # scaling, sliding window): sharper q/k make those visible in the logits.
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith("bias") or "norm" in param_name:
                param.add_(torch.randn_like(param) * 0.1)
            if ".q_proj." in param_name or ".k_proj." in param_name:
                param.mul_(ATTENTION_SHARPNESS)
    model.save_pretrained(str(out_dir))
    return Path(out_dir)
