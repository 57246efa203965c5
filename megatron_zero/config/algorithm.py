"""Configs of the RL algorithm: the advantage estimator and the policy loss.

Why: the estimator and loss are chosen by name from registries in ``megatron_zero/actor/advantages.py`` and
``megatron_zero/actor/losses.py``; these dataclasses hold the names and coefficients, validated at construction
so a typo fails before any rollout. Defaults are the SimpleRL-Zoo recipe (shared/reference/RECIPE.md): GRPO
with eps 1e-6, PPO clip 0.2, token-mean loss, low-variance (k3) KL loss with coef 1e-4 (use 1e-3 above 14B),
entropy coef 1e-3.

How: ``OmegaConf.structured(PolicyLossConfig)`` or ``PolicyLossConfig(clip_high=0.28)``. The names are plain
strings here (config/ imports no other package of ours); the preflight checks them against the registries where
they live (preflight/names.py, run by ``load_config`` and before any worker starts), so a user's own
estimator/loss must be registered (its module imported) before the config is loaded.
"""

import dataclasses
from typing import Optional

from megatron_zero.config.problems import raise_problems

# How the per-token loss becomes one number (actor/losses.py aggregate_loss); a fixed set, not a registry.
AGGREGATION_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@dataclasses.dataclass(kw_only=True, frozen=True)
class AdvantageConfig:
    # A name registered in megatron_zero.actor.advantages: grpo, dr_grpo, rloo, reinforce_plus_plus,
    # reinforce_plus_plus_baseline.
    estimator: str = "grpo"
    # Added to the group std in grpo: (r - mean) / (std + eps).
    eps: float = 1e-6
    # Drop responses cut at the length limit from the loss (the recipe's optional "remove clip").
    mask_truncated: bool = False

    def __post_init__(self) -> None:
        if not self.eps >= 0:
            raise ValueError(f"advantage.eps={self.eps} must be >= 0 (recipe: 1e-6)")


@dataclasses.dataclass(kw_only=True, frozen=True)
class PolicyLossConfig:
    # A name registered in megatron_zero.actor.losses ("ppo": clipped surrogate).
    policy_loss: str = "ppo"
    # The ratio is clipped to [1 - clip_low, 1 + clip_high]; clip_high > clip_low is DAPO's "clip-higher".
    clip_low: float = 0.2
    clip_high: float = 0.2
    # Dual-clip PPO: for negative advantages the loss is capped at -A * dual_clip_c. None disables it.
    dual_clip_c: Optional[float] = None
    # KL to the reference model as a loss term (not a reward penalty); 0 disables it and the reference model.
    kl_coef: float = 1e-4
    # A name registered in megatron_zero.actor.losses: k1, k2, k3, low_var_kl (k3 with verl's clamps).
    kl_estimator: str = "low_var_kl"
    # loss -= entropy_coef * entropy.
    entropy_coef: float = 1e-3
    # token-mean, seq-mean-token-sum, seq-mean-token-mean, seq-mean-token-sum-norm (Dr. GRPO).
    aggregation: str = "token-mean"
    # Truncated importance sampling: per-token weight min(exp(old_logp - rollout_logp), tis_cap) on the policy
    # loss, correcting for rollout-engine vs trainer log-prob mismatch. None disables it.
    tis_cap: Optional[float] = None

    def __post_init__(self) -> None:
        problems: list[str] = []  # every value problem of this config, raised together
        if not 0 < self.clip_low < 1:
            problems.append(
                f"policy_loss.clip_low={self.clip_low} must be in (0, 1): the ratio's lower bound 1 - clip_low "
                "must stay positive (recipe: 0.2)"
            )
        if not self.clip_high > 0:
            problems.append(f"policy_loss.clip_high={self.clip_high} must be > 0 (recipe: 0.2)")
        if self.dual_clip_c is not None and not self.dual_clip_c > 1:
            problems.append(
                f"policy_loss.dual_clip_c={self.dual_clip_c} must be > 1 (e.g. 3.0), or None to disable dual clip"
            )
        if not self.kl_coef >= 0:
            problems.append(f"policy_loss.kl_coef={self.kl_coef} must be >= 0 (recipe: 1e-4, 1e-3 above 14B)")
        if not self.entropy_coef >= 0:
            problems.append(f"policy_loss.entropy_coef={self.entropy_coef} must be >= 0 (recipe: 1e-3)")
        if self.aggregation not in AGGREGATION_MODES:
            problems.append(
                f"policy_loss.aggregation={self.aggregation!r} is unknown; use one of {list(AGGREGATION_MODES)}"
            )
        if self.tis_cap is not None and not self.tis_cap > 0:
            problems.append(f"policy_loss.tis_cap={self.tis_cap} must be > 0 (e.g. 2.0), or None to disable TIS")
        raise_problems(problems)
