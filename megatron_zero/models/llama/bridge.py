"""Llama-3 / 3.1 (llama3 rotary scaling) and Llama-shaped models such as DeepSeek-Math-7B."""

from __future__ import annotations

from typing import Any

from megatron_zero.models.common.architecture import DecoderArchitecture, parse_decoder_architecture
from megatron_zero.models.common.bridge import ModelBridge


class LlamaBridge(ModelBridge):
    model_type = "llama"

    def parse(self, hf_config: dict[str, Any]) -> DecoderArchitecture:
        if hf_config.get("attention_bias"):
            raise ValueError("config.json attention_bias=true is not supported for llama: it adds a bias to o_proj "
                             "too, which megatron-core only offers together with MLP biases")
        return parse_decoder_architecture(hf_config, qkv_bias=False, sliding_window=None)
