"""The bridge between an HF checkpoint family and megatron-core's GPTModel.

A family (``models/<family>/bridge.py``) declares only what differs from the Llama-shaped common
case: how its ``config.json`` maps onto ``DecoderArchitecture`` (QKV bias, sliding window, ...).
Everything else - the TransformerConfig, the GPTModel arguments, the name map and the tensor
transforms - lives here once, so HF -> Megatron (conversion, loading) and Megatron -> HF
(export, rollout weight sync) are the same mapping read in two directions.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from megatron_zero.config.model import ModelConfig
from megatron_zero.models.common.architecture import DecoderArchitecture
from megatron_zero.models.common.spec import gpt_layer_spec, resolve_transformer_impl
from megatron_zero.models.common.weights import WeightMapping, llama_global_mappings, llama_layer_mappings

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelBridge:
    """Base bridge for Llama-shaped decoders; subclasses implement ``parse``."""

    model_type: str = ""

    def parse(self, hf_config: dict[str, Any]) -> DecoderArchitecture:
        raise NotImplementedError

    # ---- names and tensors -------------------------------------------------------------------

    def weight_mappings(self, arch: DecoderArchitecture) -> list[WeightMapping]:
        """Every tensor of the model, layers expanded, in checkpoint order (embedding first)."""
        global_mappings = llama_global_mappings(arch)
        layer_mappings = llama_layer_mappings(arch)
        expanded = global_mappings[:1]
        for layer in range(arch.num_layers):
            expanded.extend(m.for_layer(layer) for m in layer_mappings)
        expanded.extend(global_mappings[1:])
        return expanded

    def mapping_by_mcore_name(self, arch: DecoderArchitecture) -> dict[str, WeightMapping]:
        return {m.mcore: m for m in self.weight_mappings(arch)}

    def hf_to_mcore(self, arch: DecoderArchitecture, read_hf: Callable[[str], torch.Tensor],
                    padded_vocab_size: int) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield canonical Megatron tensors one at a time, reading HF tensors on demand (streaming)."""
        for mapping in self.weight_mappings(arch):
            yield mapping.mcore, mapping.to_mcore([read_hf(name) for name in mapping.hf], arch, padded_vocab_size)

    def mcore_to_hf(self, arch: DecoderArchitecture, mcore_name: str, tensor: torch.Tensor,
                    mappings: Optional[dict[str, WeightMapping]] = None) -> list[tuple[str, torch.Tensor]]:
        """HF tensors made from one canonical Megatron tensor; unknown names raise."""
        mappings = mappings or self.mapping_by_mcore_name(arch)
        if mcore_name not in mappings:
            raise KeyError(f"Megatron tensor {mcore_name!r} has no HF mapping for model_type={arch.model_type!r}")
        mapping = mappings[mcore_name]
        return list(zip(mapping.hf, mapping.to_hf(tensor, arch)))

    # ---- building the Megatron model ---------------------------------------------------------

    def transformer_config(self, arch: DecoderArchitecture, model_config: ModelConfig, **overrides: Any):
        from megatron.core import parallel_state
        from megatron.core.transformer.transformer_config import TransformerConfig

        impl = resolve_transformer_impl(model_config)
        on_gpu = impl == "transformer_engine"
        if model_config.fp8 is not None and not on_gpu:
            raise ValueError(f"model.fp8={model_config.fp8!r} needs Transformer Engine layers on a GPU, but "
                             f"model.transformer_impl={model_config.transformer_impl!r} resolves to {impl!r} here "
                             "(no CUDA or no transformer-engine); unset model.fp8 on this machine")
        params_dtype = _TORCH_DTYPES[model_config.params_dtype]
        kwargs: dict[str, Any] = dict(
            num_layers=arch.num_layers,
            hidden_size=arch.hidden_size,
            ffn_hidden_size=arch.ffn_hidden_size,
            num_attention_heads=arch.num_attention_heads,
            num_query_groups=arch.num_query_groups,
            kv_channels=arch.head_dim,
            layernorm_epsilon=arch.norm_epsilon,
            normalization="RMSNorm",
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            add_qkv_bias=arch.qkv_bias,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            params_dtype=params_dtype,
            bf16=params_dtype == torch.bfloat16,
            fp16=params_dtype == torch.float16,
            pipeline_dtype=params_dtype,
            tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
            pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
            # Fused CUDA kernels only where they exist; the results are the same math.
            bias_dropout_fusion=on_gpu,
            apply_rope_fusion=on_gpu,
            masked_softmax_fusion=on_gpu,
            persist_layer_norm=on_gpu,
            gradient_accumulation_fusion=False,
            use_cpu_initialization=not torch.cuda.is_available(),
            attention_softmax_in_fp32=True,
            recompute_granularity=model_config.recompute_granularity,
            recompute_method=model_config.recompute_method,
            recompute_num_layers=model_config.recompute_num_layers,
        )
        if arch.sliding_window is not None:
            # HF lets a token see itself and the sliding_window - 1 tokens before it.
            kwargs["window_size"] = (arch.sliding_window - 1, 0)
        if model_config.fp8 is not None:
            kwargs.update(fp8=model_config.fp8, fp8_recipe=model_config.fp8_recipe)
        kwargs.update(overrides)
        return TransformerConfig(**kwargs)

    def build_model(self, arch: DecoderArchitecture, model_config: ModelConfig, *, pre_process: Optional[bool] = None,
                    post_process: Optional[bool] = None, vp_stage: Optional[int] = None, **config_overrides: Any):
        """A GPTModel for this rank's pipeline stage, under the current megatron parallel state."""
        from megatron.core import parallel_state
        from megatron.core.models.gpt import GPTModel

        tp = parallel_state.get_tensor_model_parallel_world_size()
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        arch.check_parallel_sizes(tp, pp, model_config.vocab_pad_multiple)
        config = self.transformer_config(arch, model_config, **config_overrides)
        return GPTModel(
            config=config,
            transformer_layer_spec=gpt_layer_spec(model_config),
            vocab_size=arch.padded_vocab_size(model_config.vocab_pad_multiple),
            max_sequence_length=arch.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage() if pre_process is None else pre_process,
            post_process=parallel_state.is_pipeline_last_stage() if post_process is None else post_process,
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(arch.rope_theta),
            rope_scaling=arch.rope_scaling is not None,
            rope_scaling_factor=arch.rope_scaling.factor if arch.rope_scaling else 8.0,
            vp_stage=vp_stage,
        )
