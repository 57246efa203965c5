"""Qwen2 / Qwen2.5 / Qwen2.5-Math: Llama-shaped with biases on q, k and v (not on o_proj).

Qwen2.5-0.5B and 1.5B tie the output layer to the embedding (``tie_word_embeddings``).
"""

from __future__ import annotations

from typing import Any

from megatron_zero.models.common.architecture import DecoderArchitecture, parse_decoder_architecture
from megatron_zero.models.common.bridge import ModelBridge


class Qwen2Bridge(ModelBridge):
    model_type = "qwen2"

    def parse(self, hf_config: dict[str, Any]) -> DecoderArchitecture:
        if hf_config.get("use_sliding_window"):
            raise ValueError("config.json use_sliding_window=true is not supported for qwen2 (per-layer windows "
                             "from max_window_layers); released Qwen2.5 checkpoints set it to false")
        return parse_decoder_architecture(hf_config, qkv_bias=True, sliding_window=None)
