"""Run microbatches through a (possibly pipeline-parallel) GPTModel with megatron-core's schedule.

``forward_backward`` wraps ``get_forward_backward_func`` so callers (verification, the actor's
log-prob and training passes) supply only: the microbatches, what the model is called with, and
what to compute from its output on the last stage. Results computed on the last stage come back
on that stage; ``broadcast_from_last_stage`` shares them with every pipeline rank.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

# (model, microbatch) -> model output;   (output, microbatch) -> (loss, dict of results)
ModelCall = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]
OutputFn = Callable[[torch.Tensor, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, Any]]]


def forward_backward(model: torch.nn.Module, microbatches: Sequence[dict[str, torch.Tensor]], *, seq_length: int,
                     micro_batch_size: int, call_model: ModelCall, output_fn: OutputFn,
                     forward_only: bool) -> list[dict[str, Any]]:
    """One pass over ``microbatches``; returns ``output_fn``'s dicts (on the last pipeline stage, else [])."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batches = iter(microbatches)

    def forward_step(data_iterator, model_chunk):
        microbatch = next(data_iterator)
        output = call_model(model_chunk, microbatch)
        return output, lambda out: output_fn(out, microbatch)

    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=batches,
        model=model,
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )


def broadcast_from_last_stage(obj: Optional[Any]) -> Any:
    """Send a picklable object from the last pipeline stage to all stages of this pipeline."""
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return obj
    group = parallel_state.get_pipeline_model_parallel_group()
    last_rank = parallel_state.get_pipeline_model_parallel_last_rank()
    holder = [obj]
    dist.broadcast_object_list(holder, src=last_rank, group=group)
    return holder[0]


def gather_vocab_parallel(logits_local: torch.Tensor) -> torch.Tensor:
    """Concatenate vocab-parallel logits over the TP group (for verification, not for training)."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return logits_local
    parts = [torch.empty_like(logits_local) for _ in range(tp)]
    dist.all_gather(parts, logits_local.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)
