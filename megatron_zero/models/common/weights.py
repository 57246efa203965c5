"""HF <-> Megatron weight layouts shared by every Llama-shaped family.

The Megatron side is always the *canonical* layout: full (TP-gathered) tensors under the names a
local-spec GPTModel uses at TP=1, PP=1, with global layer numbers, e.g.
``decoder.layers.3.self_attention.linear_qkv.weight``. Checkpoint I/O, verification and the
weight resharding for rollout engines all meet here, so each transform exists once:

* fused QKV: Megatron stores, per query group, that group's query heads, then its key head, then
  its value head (``[g0: q..q k v][g1: q..q k v]...``), so a TP rank owns whole groups;
* ``linear_fc1`` holds ``[gate; up]`` (SwiGLU), each half split across TP ranks separately;
* the vocabulary is padded with zero rows to a multiple that every TP size divides; HF never sees
  the padding.

Every mapping is exactly invertible; tests check the round trip bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from megatron_zero.models.common.architecture import DecoderArchitecture


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: DecoderArchitecture) -> torch.Tensor:
    """HF q/k/v projections (weights [out, in] or biases [out]) -> Megatron's grouped linear_qkv."""
    groups, per_group, head_dim = arch.num_query_groups, arch.heads_per_group, arch.head_dim
    rest = q.shape[1:]
    q = q.reshape(groups, per_group * head_dim, *rest)
    k = k.reshape(groups, head_dim, *rest)
    v = v.reshape(groups, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(groups * (per_group + 2) * head_dim, *rest)


def split_qkv(qkv: torch.Tensor, arch: DecoderArchitecture) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of ``fuse_qkv``."""
    groups, per_group, head_dim = arch.num_query_groups, arch.heads_per_group, arch.head_dim
    rest = qkv.shape[1:]
    grouped = qkv.reshape(groups, (per_group + 2) * head_dim, *rest)
    q, k, v = torch.split(grouped, [per_group * head_dim, head_dim, head_dim], dim=1)
    return (q.reshape(groups * per_group * head_dim, *rest).contiguous(),
            k.reshape(groups * head_dim, *rest).contiguous(),
            v.reshape(groups * head_dim, *rest).contiguous())


def pad_vocab(weight: torch.Tensor, padded_size: int) -> torch.Tensor:
    if weight.shape[0] > padded_size:
        raise ValueError(f"vocabulary tensor has {weight.shape[0]} rows, more than the padded size {padded_size}")
    if weight.shape[0] == padded_size:
        return weight
    padding = weight.new_zeros(padded_size - weight.shape[0], *weight.shape[1:])
    return torch.cat([weight, padding], dim=0)


@dataclass(frozen=True)
class WeightMapping:
    """One Megatron tensor and the HF tensor(s) it is made of; ``{layer}`` in names is the layer index."""

    mcore: str
    hf: tuple[str, ...]
    to_mcore: Callable[[Sequence[torch.Tensor], DecoderArchitecture, int], torch.Tensor]
    to_hf: Callable[[torch.Tensor, DecoderArchitecture], tuple[torch.Tensor, ...]]

    def for_layer(self, layer: int) -> "WeightMapping":
        return WeightMapping(self.mcore.format(layer=layer), tuple(n.format(layer=layer) for n in self.hf),
                             self.to_mcore, self.to_hf)


def _identity(hf: Sequence[torch.Tensor], arch: DecoderArchitecture, padded_vocab: int) -> torch.Tensor:
    return hf[0]


def _identity_back(t: torch.Tensor, arch: DecoderArchitecture) -> tuple[torch.Tensor, ...]:
    return (t,)


def _vocab(hf: Sequence[torch.Tensor], arch: DecoderArchitecture, padded_vocab: int) -> torch.Tensor:
    if hf[0].shape[0] != arch.vocab_size:
        raise ValueError(f"vocabulary tensor has {hf[0].shape[0]} rows but config.json vocab_size={arch.vocab_size}")
    return pad_vocab(hf[0], padded_vocab)


def _vocab_back(t: torch.Tensor, arch: DecoderArchitecture) -> tuple[torch.Tensor, ...]:
    return (t[: arch.vocab_size].contiguous(),)


def _qkv(hf: Sequence[torch.Tensor], arch: DecoderArchitecture, padded_vocab: int) -> torch.Tensor:
    return fuse_qkv(hf[0], hf[1], hf[2], arch)


def _qkv_back(t: torch.Tensor, arch: DecoderArchitecture) -> tuple[torch.Tensor, ...]:
    return split_qkv(t, arch)


def _gate_up(hf: Sequence[torch.Tensor], arch: DecoderArchitecture, padded_vocab: int) -> torch.Tensor:
    return torch.cat([hf[0], hf[1]], dim=0)


def _gate_up_back(t: torch.Tensor, arch: DecoderArchitecture) -> tuple[torch.Tensor, ...]:
    gate, up = torch.chunk(t, 2, dim=0)
    return gate.contiguous(), up.contiguous()


_LAYER = "decoder.layers.{layer}."
_HF_LAYER = "model.layers.{layer}."


def llama_layer_mappings(arch: DecoderArchitecture) -> list[WeightMapping]:
    """Per-layer mappings (templated on ``{layer}``) of the Llama/Qwen2/Mistral decoder layer."""
    attn = _HF_LAYER + "self_attn."
    mlp = _HF_LAYER + "mlp."
    mappings = [
        WeightMapping(_LAYER + "input_layernorm.weight", (_HF_LAYER + "input_layernorm.weight",), _identity, _identity_back),
        WeightMapping(_LAYER + "self_attention.linear_qkv.weight",
                      (attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"), _qkv, _qkv_back),
        WeightMapping(_LAYER + "self_attention.linear_proj.weight", (attn + "o_proj.weight",), _identity, _identity_back),
        WeightMapping(_LAYER + "pre_mlp_layernorm.weight", (_HF_LAYER + "post_attention_layernorm.weight",),
                      _identity, _identity_back),
        WeightMapping(_LAYER + "mlp.linear_fc1.weight", (mlp + "gate_proj.weight", mlp + "up_proj.weight"),
                      _gate_up, _gate_up_back),
        WeightMapping(_LAYER + "mlp.linear_fc2.weight", (mlp + "down_proj.weight",), _identity, _identity_back),
    ]
    if arch.qkv_bias:
        mappings.append(WeightMapping(_LAYER + "self_attention.linear_qkv.bias",
                                      (attn + "q_proj.bias", attn + "k_proj.bias", attn + "v_proj.bias"), _qkv, _qkv_back))
    return mappings


def llama_global_mappings(arch: DecoderArchitecture) -> list[WeightMapping]:
    """Embedding, final norm and (untied) output layer."""
    mappings = [
        WeightMapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), _vocab, _vocab_back),
        WeightMapping("decoder.final_layernorm.weight", ("model.norm.weight",), _identity, _identity_back),
    ]
    if not arch.tie_word_embeddings:
        mappings.append(WeightMapping("output_layer.weight", ("lm_head.weight",), _vocab, _vocab_back))
    return mappings
