"""The memory plan as a readable report (``megatron-zero plan``, ``train --dry-run``)."""

from __future__ import annotations

from typing import Optional

from megatron_zero.planning.actor_memory import GIB, NO_RECOMPUTE
from megatron_zero.planning.memory import MemoryPlan


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / GIB:8.2f}"


def format_plan(plan: MemoryPlan, recommendations: Optional[list[MemoryPlan]] = None) -> str:
    """A readable report: the layout, one table per phase (GiB by term), the peak, problems and layouts that fit."""
    inputs = plan.inputs
    lines = [f"{inputs.arch.model_type}, {plan.num_parameters / 1e9:.2f}B parameters; actor "
             f"TP={inputs.tensor_parallel_size} PP={inputs.pipeline_parallel_size} DP={inputs.data_parallel_size}, "
             f"{inputs.params_dtype}, "
             f"{inputs.max_tokens_per_microbatch} tokens per microbatch, recompute={inputs.recompute.granularity}, "
             f"reference={inputs.reference}, {inputs.deployment}"
             + (f", SGLang TP={inputs.engine.tp_size} mem_fraction_static={inputs.engine.mem_fraction_static}"
                if inputs.engine else "")
             + f"; {inputs.kernels} layers; GPU {inputs.device_bytes / GIB:.1f} GiB"]
    for phase in plan.phases:
        lines.append(f"\n{phase.name} ({phase.gpu} GPU, pipeline stage {phase.stage})      GiB")
        lines += [f"  {term:<16}{_gib(value)}" for term, value in phase.terms.items()]
        lines.append(f"  {'total':<16}{_gib(phase.total)}")
    lines.append(f"\ntrain activations per GPU: {plan.activations_no_recompute / GIB:.2f} GiB without recompute, "
                 f"{plan.activations_full_recompute / GIB:.2f} GiB with full recompute")
    if plan.engine is not None:
        lines.append(f"SGLang rank: weights {plan.engine.weights / GIB:.2f} GiB, KV cache "
                     f"{max(plan.engine.kv_cache, 0) / GIB:.2f} GiB = {plan.engine.kv_tokens} tokens "
                     f"({plan.engine.kv_tokens // max(inputs.max_sequence_tokens, 1)} full-length sequences)")
    lines.append(f"peak: {plan.peak.name} phase, {plan.peak.total / GIB:.2f} GiB of {inputs.device_bytes / GIB:.1f}: "
                 + ("fits" if plan.fits else "DOES NOT FIT: " + "; ".join(plan.problems)))
    if recommendations is not None:
        lines.append("\nlayouts that fit (least model parallelism first):" if recommendations
                     else "\nno layout of this many GPUs fits; add nodes or shorten the microbatch")
        for rec in recommendations:
            r = rec.inputs
            lines.append(f"  parallel.tensor_parallel_size={r.tensor_parallel_size} "
                         f"parallel.pipeline_parallel_size={r.pipeline_parallel_size}"
                         + f" actor.max_tokens_per_microbatch={r.max_tokens_per_microbatch}"
                         + (" model.recompute_granularity=full model.recompute_method=uniform "
                            "model.recompute_num_layers=1" if r.recompute != NO_RECOMPUTE else "")
                         + (f" rollout.sglang.tp_size={r.engine.tp_size}" if r.engine else "")
                         + f"   (peak {rec.peak.name} {rec.peak.total / GIB:.1f} GiB)")
    return "\n".join(lines)
