"""Layouts of the same job that fit the GPUs (``recommend_layouts``): the memory planner (planning/memory.py) tried
over actor TP x PP, recompute, token budgets and engine TP, least model parallelism first."""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import TYPE_CHECKING

from megatron_zero.planning.actor_memory import FULL_RECOMPUTE, NO_RECOMPUTE
from megatron_zero.planning.memory import MemoryPlan, PlanInputs, plan_memory

if TYPE_CHECKING:
    from megatron_zero.models.common.architecture import DecoderArchitecture


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _layout_is_valid(arch: DecoderArchitecture, tp: int, pp: int, vocab_pad_multiple: int) -> bool:
    try:
        arch.check_parallel_sizes(tp, pp, vocab_pad_multiple)
    except ValueError:
        return False
    return True


def recommend_layouts(inputs: PlanInputs, *, world_size: int, gpus_per_node: int, rollout_num_gpus: int = 0,
                      limit: int = 5) -> list[MemoryPlan]:
    """Layouts of the same job that fit, least model parallelism first: actor TP (within a node) x PP over the
    world size, with and without full recompute, two token budgets (``budgets``), and every engine TP that divides
    the node (and, disaggregated, the rollout GPUs) and the attention heads. Rows per call scale with each
    layout's DP size."""
    arch = inputs.arch
    candidates = []
    # The configured token budget, and the smallest the actor accepts (one longest sequence, rounded up to 1024).
    budgets = sorted({inputs.max_tokens_per_microbatch, -(-inputs.max_sequence_tokens // 1024) * 1024}, reverse=True)
    engine_tps = [None] if inputs.engine is None else [
        tp for tp in _divisors(gpus_per_node) if arch.num_attention_heads % tp == 0
        and (not rollout_num_gpus or rollout_num_gpus % tp == 0)]
    for tp in _divisors(gpus_per_node):
        for pp in _divisors(arch.num_layers):
            if world_size % (tp * pp) or not _layout_is_valid(arch, tp, pp, inputs.vocab_pad_multiple):
                continue
            dp = world_size // (tp * pp)
            scale = inputs.data_parallel_size / dp
            for recompute, num_tokens, engine_tp in itertools.product((NO_RECOMPUTE, FULL_RECOMPUTE), budgets,
                                                                      engine_tps):
                engine = None if engine_tp is None else dataclasses.replace(inputs.engine, tp_size=engine_tp)
                plan = plan_memory(dataclasses.replace(
                    inputs, tensor_parallel_size=tp, pipeline_parallel_size=pp, data_parallel_size=dp,
                    recompute=recompute, engine=engine, max_tokens_per_microbatch=num_tokens,
                    rows_per_logprob_call=math.ceil(inputs.rows_per_logprob_call * scale),
                    rows_per_train_call=math.ceil(inputs.rows_per_train_call * scale)))
                if plan.fits:
                    candidates.append(plan)
    # Cheapest first: less model parallelism, no recompute, the larger microbatch, a smaller engine (more engines).
    candidates.sort(key=lambda p: (p.inputs.tensor_parallel_size * p.inputs.pipeline_parallel_size,
                                   p.inputs.pipeline_parallel_size, p.inputs.recompute != NO_RECOMPUTE,
                                   -p.inputs.max_tokens_per_microbatch,
                                   p.inputs.engine.tp_size if p.inputs.engine else 0))
    return candidates[:limit]
