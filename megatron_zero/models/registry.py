"""Bridges by exact HF ``model_type`` (no substring matching on model names)."""

from __future__ import annotations

from typing import Any

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
