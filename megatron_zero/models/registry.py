"""Bridges by exact HF ``model_type`` (no substring matching on model names)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron_zero.models.common.architecture import DecoderArchitecture, read_hf_config
from megatron_zero.models.common.bridge import ModelBridge
from megatron_zero.models.llama.bridge import LlamaBridge
from megatron_zero.models.mistral.bridge import MistralBridge
from megatron_zero.models.qwen2.bridge import Qwen2Bridge

BRIDGES: dict[str, ModelBridge] = {bridge.model_type: bridge for bridge in (Qwen2Bridge(), LlamaBridge(), MistralBridge())}


def get_bridge(hf_config: dict[str, Any]) -> ModelBridge:
    model_type = hf_config.get("model_type")
    if model_type not in BRIDGES:
        architectures = hf_config.get("architectures")
        raise ValueError(f"config.json model_type={model_type!r} (architectures={architectures}) is not supported; "
                         f"supported model types: {sorted(BRIDGES)}")
    return BRIDGES[model_type]


def read_architecture(hf_dir: str | Path) -> DecoderArchitecture:
    """The validated architecture of the HF checkpoint in ``hf_dir`` (its config.json)."""
    hf_config = read_hf_config(hf_dir)
    return get_bridge(hf_config).parse(hf_config)
