"""Sequence packing: several prompt+response sequences in one row, each attending only to itself.

Why: zero-RL responses range from a few tokens to the length limit, so padded rows spend much of a
microbatch's compute on padding. Packing concatenates sequences into one row of up to
``actor.max_tokens_per_microbatch`` tokens and tells attention where each sequence starts, in one of two
ways, chosen by the layer implementation (``packing_format``):

* ``"thd"`` (Transformer Engine, GPU): megatron-core's ``PackedSeqParams`` with cumulative sequence lengths.
  TE's kernels attend within each sequence and megatron applies RoPE per sequence from position 0.
* ``"dense_mask"`` (megatron-core's local layers, CPU): the local attention rejects ``PackedSeqParams``, so
  the row gets an explicit block-diagonal causal mask. RoPE then uses positions within the row, which is
  exact because RoPE attention scores depend only on the distance between query and key, and the mask keeps
  both in the same sequence. The mask costs O(row length^2) memory and compute, which is why this path is for
  correctness on CPU, not speed. It cannot express a sliding window (megatron's local softmax replaces any
  given mask by its own window mask), so models with one fall back to padded rows.

How: ``fmt = packing_format(model_config, arch, enabled=actor.pack_sequences)``; ``ActorBatch.microbatch``
builds the packed row and ``packed_attention_inputs(cu_seqlens, fmt)`` what the GPTModel call needs.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from megatron_zero.config.model import ModelConfig
from megatron_zero.models.common.spec import resolve_transformer_impl

logger = logging.getLogger(__name__)

PACKING_FORMATS = ("thd", "dense_mask")


def packing_format(model_config: ModelConfig, arch: Any, *, enabled: bool) -> Optional[str]:
    """How this model attends within packed sequences, or None for padded rows (module docstring)."""
    if not enabled:
        return None
    if resolve_transformer_impl(model_config) == "transformer_engine":
        return "thd"
    if arch.sliding_window is not None:
        logger.warning("actor.pack_sequences: megatron-core's local attention cannot combine a packing mask with "
                       "the model's sliding window (%d); using padded rows", arch.sliding_window)
        return None
    return "dense_mask"


def block_causal_mask(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[1, 1, T, T] bool, True where query i must NOT see key j: j > i or j in another sequence (megatron's
    convention: True = masked)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths)
    total = int(segment.numel())
    positions = torch.arange(total, device=cu_seqlens.device)
    visible = (segment.unsqueeze(1) == segment.unsqueeze(0)) & (positions.unsqueeze(1) >= positions.unsqueeze(0))
    return (~visible).view(1, 1, total, total)


def packed_attention_inputs(cu_seqlens: torch.Tensor, fmt: str) -> dict[str, Any]:
    """Keyword arguments of the GPTModel call for one packed row with sequence boundaries ``cu_seqlens`` (with FP8,
    the last sequence is the row's padding, ``batching.py``: attending only to itself, it changes no real token)."""
    if fmt == "dense_mask":
        return {"attention_mask": block_causal_mask(cu_seqlens)}
    if fmt == "thd":
        from megatron.core.packed_seq_params import PackedSeqParams

        cu_seqlens = cu_seqlens.to(torch.int32)
        max_length = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        return {"attention_mask": None,
                "packed_seq_params": PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens,
                                                     cu_seqlens_kv=cu_seqlens, max_seqlen_q=max_length,
                                                     max_seqlen_kv=max_length)}
    raise ValueError(f"unknown packing format {fmt!r}; valid: {list(PACKING_FORMATS)}")
