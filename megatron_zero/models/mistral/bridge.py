"""Mistral-7B-v0.1 (4096-token sliding window) and Mistral-Small-24B (head_dim != hidden/heads)."""

from __future__ import annotations

from typing import Any

from megatron_zero.models.common.architecture import DecoderArchitecture, parse_decoder_architecture
from megatron_zero.models.common.bridge import ModelBridge


class MistralBridge(ModelBridge):
    model_type = "mistral"

    def parse(self, hf_config: dict[str, Any]) -> DecoderArchitecture:
        window = hf_config.get("sliding_window")
        return parse_decoder_architecture(hf_config, qkv_bias=False, sliding_window=int(window) if window else None)
