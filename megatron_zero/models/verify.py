"""Prove a conversion by logits: the same tokens through HF transformers and through Megatron at TP x PP.

"It loaded" proves nothing (a swapped K/V or a wrong rotary scaling loads fine); equal logits do.
The HF model runs in the calling process; the Megatron model runs on TP x PP local processes
(gloo on CPU), loads the torch_dist checkpoint through dist_checkpointing at that layout and runs
megatron-core's pipeline schedule. Logits over the true vocabulary are compared in float32.

Tolerance: both sides compute in float32 on CPU. They differ only in summation order (fused QKV
GEMM vs three GEMMs, TP partial sums reduced over gloo), which moves logits by a few float32
ulps per layer: observed max |diff| is ~1e-6 on the tiny test models. The default bound 1e-4 is
two orders above that and far below what any mapping error gives (O(0.1)-O(1) on random models).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from megatron_zero.config.model import ModelConfig
from megatron_zero.config.parallel import ParallelConfig
from megatron_zero.parallel.local_launch import run_local_workers

logger = logging.getLogger(__name__)

DEFAULT_TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}


@dataclass(frozen=True)
class VerifyResult:
    max_abs_diff: float
    tolerance: float
    tensor_parallel_size: int
    pipeline_parallel_size: int

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def random_tokens(vocab_size: int, batch_size: int, seq_length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch_size, seq_length), generator=generator)


def megatron_logits(mcore_dir: str, tokens: torch.Tensor, params_dtype: str) -> Optional[torch.Tensor]:
    """Worker body: full-vocabulary logits [B, S, V] on (last PP stage, TP rank 0), None elsewhere."""
    from megatron.core import parallel_state

    from megatron_zero.models.mcore_checkpoint import load_mcore_weights, read_checkpoint_info
    from megatron_zero.parallel.pipeline import forward_backward, gather_vocab_parallel

    info = read_checkpoint_info(mcore_dir)
    model_config = ModelConfig(transformer_impl="auto", params_dtype=params_dtype,
                               vocab_pad_multiple=info.vocab_pad_multiple)
    model = info.bridge.build_model(info.arch, model_config)
    load_mcore_weights(model, mcore_dir)
    model.eval()
    batch, seq = tokens.shape
    position_ids = torch.arange(seq).unsqueeze(0).expand(batch, seq)

    def call_model(chunk, microbatch):
        return chunk(input_ids=microbatch["tokens"], position_ids=microbatch["position_ids"], attention_mask=None)

    def output_fn(logits, microbatch):
        full = gather_vocab_parallel(logits)[..., : info.arch.vocab_size]
        return logits.new_zeros(()), {"logits": full.float()}

    microbatches = [{"tokens": tokens[i : i + 1], "position_ids": position_ids[i : i + 1]} for i in range(batch)]
    with torch.no_grad():
        outputs = forward_backward(model, microbatches, seq_length=seq, micro_batch_size=1, call_model=call_model,
                                   output_fn=output_fn, forward_only=True)
    if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
        return torch.cat([out["logits"] for out in outputs], dim=0)
    return None


def hf_logits(hf_dir: str | Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


@dataclass(frozen=True)
class ConversionCase:
    """One checkpoint to verify: its HF original, its conversion, and the test sequence length."""

    hf_dir: str | Path
    mcore_dir: str | Path
    seq_length: int = 16


def megatron_logits_of_each(mcore_dirs: list[str], tokens: list[torch.Tensor],
                            params_dtype: str) -> list[Optional[torch.Tensor]]:
    """Worker body: ``megatron_logits`` of several checkpoints in one launch (one process start and one
    parallel init instead of one per checkpoint)."""
    return [megatron_logits(mcore_dir, case_tokens, params_dtype) for mcore_dir, case_tokens in zip(mcore_dirs, tokens)]


def verify_conversions(cases: list[ConversionCase], tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                       *, batch_size: int = 2, seed: int = 0, tolerance: Optional[float] = None,
                       params_dtype: str = "float32") -> list[VerifyResult]:
    """``verify_conversion`` of each case at one TP x PP layout, all in one launch of local workers."""
    from megatron_zero.models.mcore_checkpoint import read_checkpoint_info

    tokens, references = [], []
    for case in cases:
        info = read_checkpoint_info(case.mcore_dir)
        info.arch.check_parallel_sizes(tensor_parallel_size, pipeline_parallel_size, info.vocab_pad_multiple)
        tokens.append(random_tokens(info.arch.vocab_size, batch_size, case.seq_length, seed))
        references.append(hf_logits(case.hf_dir, tokens[-1]))
    parallel = ParallelConfig(tensor_parallel_size=tensor_parallel_size, pipeline_parallel_size=pipeline_parallel_size)
    per_rank = run_local_workers(megatron_logits_of_each, parallel,
                                 args=([str(case.mcore_dir) for case in cases], tokens, params_dtype))
    # Exactly one rank (last stage, TP rank 0) returns the logits.
    megatron = next(logits for logits in per_rank if logits[0] is not None)
    bound = DEFAULT_TOLERANCE[params_dtype] if tolerance is None else tolerance
    results = []
    for case, reference, logits in zip(cases, references, megatron):
        if logits.shape != reference.shape:
            raise ValueError(f"{case.mcore_dir}: logit shapes differ: Megatron {tuple(logits.shape)} vs HF "
                             f"{tuple(reference.shape)}")
        results.append(VerifyResult(max_abs_diff=(logits - reference).abs().max().item(), tolerance=bound,
                                    tensor_parallel_size=tensor_parallel_size,
                                    pipeline_parallel_size=pipeline_parallel_size))
    return results


def verify_conversion(hf_dir: str | Path, mcore_dir: str | Path, tensor_parallel_size: int = 1,
                      pipeline_parallel_size: int = 1, *, batch_size: int = 2, seq_length: int = 16, seed: int = 0,
                      tolerance: Optional[float] = None, params_dtype: str = "float32") -> VerifyResult:
    (result,) = verify_conversions([ConversionCase(hf_dir, mcore_dir, seq_length)], tensor_parallel_size,
                                   pipeline_parallel_size, batch_size=batch_size, seed=seed, tolerance=tolerance,
                                   params_dtype=params_dtype)
    return result
