"""The decoder-only architecture of an HF checkpoint, parsed and validated from ``config.json``.

``DecoderArchitecture`` is the single description both directions of the bridge and the model
builder use. Parsing reads the raw ``config.json`` dict (not a transformers config class), so it
works for configs written by transformers 4 (``rope_theta`` + ``rope_scaling``) and 5
(``rope_parameters``) alike. Anything we cannot reproduce exactly in megatron-core raises a
``ValueError`` naming the config field: a conversion that "runs" with the wrong rotary scaling or a
silently ignored bias is worse than none.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# megatron-core's llama3 rotary scaling hard-codes these (RotaryEmbedding._apply_scaling); a config
# with other values must be refused rather than converted into a different model.
_MCORE_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclass(frozen=True)
class Llama3RopeScaling:
    factor: float


@dataclass(frozen=True)
class DecoderArchitecture:
    model_type: str
    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    norm_epsilon: float
    rope_theta: float
    rope_scaling: Optional[Llama3RopeScaling]
    tie_word_embeddings: bool
    qkv_bias: bool
    max_position_embeddings: int
    sliding_window: Optional[int]
    dtype: torch.dtype

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    def padded_vocab_size(self, multiple: int) -> int:
        """Megatron pads the vocabulary so every TP rank holds an equal slice; HF has no padding."""
        return -(-self.vocab_size // multiple) * multiple

    def forward_flops(self, seq_length: int) -> float:
        """Floating-point operations of one forward pass over a causal sequence of ``seq_length`` tokens.

        Matrix multiplies only (2 FLOPs per multiply-add): per layer the QKV, output, and gated-MLP projections
        for every token, plus scores and weighted values (QK^T, AV) for every attended (query, key) pair, which
        grows with the square of the length (capped by a sliding window); and the output layer. Used to balance
        data-parallel shards by cost (``parallel/data_parallel.py``), where a row's tokens alone would
        undercount long responses.
        """
        q_width = self.num_attention_heads * self.head_dim
        kv_width = self.num_query_groups * self.head_dim
        per_token = 2 * self.hidden_size * (q_width + 2 * kv_width) + 2 * q_width * self.hidden_size \
            + 2 * 3 * self.hidden_size * self.ffn_hidden_size
        n = seq_length
        window = self.sliding_window
        if window is None or window >= n:
            attended_pairs = n * (n + 1) / 2
        else:  # the first `window` queries see all earlier keys, the rest exactly `window`
            attended_pairs = window * (window + 1) / 2 + (n - window) * window
        attention = 2 * 2 * q_width * attended_pairs
        return float(self.num_layers * (n * per_token + attention) + n * 2 * self.hidden_size * self.vocab_size)

    def check_parallel_sizes(self, tensor_parallel_size: int, pipeline_parallel_size: int, vocab_multiple: int) -> None:
        tp, pp = tensor_parallel_size, pipeline_parallel_size
        if self.num_attention_heads % tp:
            raise ValueError(f"tensor_parallel_size={tp} must divide num_attention_heads={self.num_attention_heads}; "
                             f"use one of {_divisors(self.num_attention_heads)}")
        if self.num_query_groups % tp:
            raise ValueError(f"tensor_parallel_size={tp} must divide num_key_value_heads={self.num_query_groups}; "
                             f"use one of {_divisors(self.num_query_groups)}")
        if self.padded_vocab_size(vocab_multiple) % tp:
            raise ValueError(f"tensor_parallel_size={tp} must divide the padded vocabulary "
                             f"{self.padded_vocab_size(vocab_multiple)} (vocab_size={self.vocab_size} padded to a "
                             f"multiple of {vocab_multiple})")
        if self.num_layers % pp:
            raise ValueError(f"pipeline_parallel_size={pp} must divide num_hidden_layers={self.num_layers}; "
                             f"use one of {_divisors(self.num_layers)}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {hf_dir}: expected a Hugging Face model directory")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _require(cfg: dict[str, Any], field: str) -> Any:
    if cfg.get(field) is None:
        raise ValueError(f"config.json field '{field}' is missing (model_type={cfg.get('model_type')!r})")
    return cfg[field]


def _rope(cfg: dict[str, Any]) -> tuple[float, Optional[Llama3RopeScaling]]:
    # transformers 5 writes rope_parameters (theta inside); transformers 4 writes rope_theta + rope_scaling.
    params = cfg.get("rope_parameters")
    if params is not None:
        field = "rope_parameters"
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    else:
        field = "rope_scaling"
        params = cfg.get("rope_scaling") or {}
        theta = cfg.get("rope_theta", 10000.0)
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type == "default":
        return float(theta), None
    if rope_type == "llama3":
        for key, expected in _MCORE_LLAMA3_ROPE.items():
            if float(params.get(key, expected)) != expected:
                raise ValueError(
                    f"config.json {field}.{key}={params.get(key)} is not supported: megatron-core's llama3 "
                    f"rotary scaling fixes {key}={expected}")
        return float(theta), Llama3RopeScaling(factor=float(params["factor"]))
    raise ValueError(f"config.json {field}.rope_type={rope_type!r} is not supported; supported: 'default', 'llama3'")


def parse_decoder_architecture(cfg: dict[str, Any], *, qkv_bias: bool, sliding_window: Optional[int]) -> DecoderArchitecture:
    """Common parse of Llama-shaped configs; families pass their deltas (QKV bias, sliding window)."""
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json hidden_act={cfg['hidden_act']!r} is not supported; expected 'silu' (SwiGLU)")
    if cfg.get("mlp_bias"):
        raise ValueError("config.json mlp_bias=true is not supported (no supported family uses MLP biases)")
    hidden = int(_require(cfg, "hidden_size"))
    heads = int(_require(cfg, "num_attention_heads"))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise ValueError(f"config.json num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    theta, scaling = _rope(cfg)
    dtype_name = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    if dtype_name not in _DTYPES:
        raise ValueError(f"config.json torch_dtype={dtype_name!r} is not supported; expected one of {sorted(_DTYPES)}")
    return DecoderArchitecture(
        model_type=cfg["model_type"],
        vocab_size=int(_require(cfg, "vocab_size")),
        hidden_size=hidden,
        ffn_hidden_size=int(_require(cfg, "intermediate_size")),
        num_layers=int(_require(cfg, "num_hidden_layers")),
        num_attention_heads=heads,
        num_query_groups=kv_heads,
        head_dim=head_dim,
        norm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        sliding_window=sliding_window,
        dtype=_DTYPES[dtype_name],
    )
