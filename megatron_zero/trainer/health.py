"""Per-step checks of what silently breaks RL trainers: the engine/actor log-prob gap (stale or broken weight
sync, or a precision mismatch) and the step-0 policy/reference KL. Each stops the run with a clear error."""

from __future__ import annotations

import math
from typing import Optional

import torch

from megatron_zero.config.trainer import TrainConfig


class HealthCheckFailed(RuntimeError):
    """A per-step invariant of the run broke; the message says which and what to check."""


def logprob_gap(engine_logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Engine vs actor log-probs over the response tokens (same weights and temperature: ~0): mean, 99th
    percentile and max of |diff|, so a drift shows in the p99 before it trips a bound."""
    gap = (engine_logp - old_logp).abs()[mask]
    # kthvalue, not quantile: torch.quantile refuses inputs above 16M elements (a 32B step has more tokens).
    p99 = gap.kthvalue(max(1, math.ceil(0.99 * gap.numel()))).values
    return {"logprob_gap_mean": float(gap.mean()), "logprob_gap_p99": float(p99), "logprob_gap_max": float(gap.max())}


def check_health(config: TrainConfig, step: int, response_mask: torch.Tensor, old_logp: torch.Tensor,
                 ref_logp: Optional[torch.Tensor], engine_logp: torch.Tensor, probe: slice) -> dict[str, float]:
    """``engine_logp``: the engine's log-probs of the batch's rows ``probe`` under the policy the actor holds
    (``old_logp``); ``ref_logp``: the reference's, when the loss has a KL term."""
    health = logprob_gap(engine_logp, old_logp[probe], response_mask[probe])
    max_mean, max_max = config.logprob_gap_bounds
    if health["logprob_gap_mean"] > max_mean or health["logprob_gap_max"] > max_max:
        raise HealthCheckFailed(
            f"step {step}: engine and actor log-probs of the same responses differ (mean |diff| "
            f"{health['logprob_gap_mean']:.3g} > {max_mean:g} or max {health['logprob_gap_max']:.3g} > {max_max:g}, "
            f"the {config.logprob_precision} bounds unless health.max_logprob_gap_* are set); the rollout "
            "engine is not running the actor's weights (stale or broken weight sync, or different "
            "temperature/precision)")
    if ref_logp is not None:
        health["kl_policy_ref"] = float((old_logp - ref_logp)[response_mask].mean())
        max_initial_kl = config.health.max_initial_kl
        if step == 0 and abs(health["kl_policy_ref"]) > max_initial_kl:
            raise HealthCheckFailed(f"step 0: policy and reference differ (mean log-ratio {health['kl_policy_ref']:.3g} "
                                    f"> {max_initial_kl:g}); they must start from the same checkpoint")
    return health
