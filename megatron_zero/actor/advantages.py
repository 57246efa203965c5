"""Outcome-reward advantage estimators (GRPO, Dr. GRPO, RLOO, REINFORCE++), registered by name.

Why: zero-RL has one scalar reward per response; the estimator turns the rewards of a prompt's group of
responses into a per-token advantage. Estimators register by name (``register_advantage_estimator``), as in
verl's ``core_algos``, so users can add theirs without touching the trainer.

How: ``compute_advantages(rewards_N, group_ids_N, response_mask_NT, config, is_truncated_N=None)`` returns the
advantages [N, T] (zero outside the loss mask) and the loss mask. A group is every sample with the same id;
groups may have any size and need not be contiguous. Conventions (following verl's ``compute_*_outcome_advantage``
in ``verl/trainer/ppo/core_algos.py``):

- "grpo": (r - group mean) / (group std + eps), std unbiased (``torch.std``, n - 1). A group of size 1 uses
  mean 0 and std 1, i.e. advantage r / (1 + eps), as verl does.
- "dr_grpo": r - group mean (size-1 group: mean 0). Dr. GRPO's other half, no length normalisation, is the
  loss aggregation "seq-mean-token-sum-norm" in ``losses.py``; use the two together.
- "rloo": r_i - mean_{j != i} r_j. A group of size 1 has no leave-one-out baseline and raises ValueError
  (verl would pass the raw reward through).
- "reinforce_plus_plus": r whitened over all valid tokens of the batch: (r - mean) / sqrt(var + 1e-8), mean
  and unbiased variance over tokens (verl's ``masked_whiten``; with an outcome reward and gamma = 1 verl's
  per-token return equals r on every token).
- "reinforce_plus_plus_baseline": r - group mean (size-1 group: mean 0), then whitened as above.

Groups of size >= 2 whose rewards are all equal get exactly zero advantage in grpo, dr_grpo and rloo (set
explicitly, since float mean(r, r, r) - r need not be 0). ``mask_truncated`` zeroes the advantages and the loss
mask of truncated responses after the group statistics, which still include them (the truncated response is a
real sample of the prompt's difficulty; only its gradient is dropped). Run the tests with
``python -m pytest tests/test_advantages.py``.
"""

import dataclasses
from typing import Callable, Optional

import torch

from megatron_zero.config.algorithm import AdvantageConfig

# verl's masked_whiten constant: added to the variance, not the std.
_WHITEN_VAR_EPS = 1e-8

# (rewards_N, group_ids_N, response_mask_NT, config) -> advantages [N] (per sample) or [N, T] (per token).
AdvantageEstimator = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AdvantageConfig], torch.Tensor]

ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {}
# Estimators whose baseline is the other samples of the same prompt: with one sample per prompt every advantage is 0
# (or undefined), which the trainer's config refuses before any work.
GROUP_BASELINE_ESTIMATORS: set[str] = set()


def register_advantage_estimator(name: str, *, group_baseline: bool = False
                                 ) -> Callable[[AdvantageEstimator], AdvantageEstimator]:
    """Decorator registering an estimator under ``name``; a second, different function for a name raises.
    ``group_baseline``: it compares a sample with the other samples of its prompt."""

    def decorator(fn: AdvantageEstimator) -> AdvantageEstimator:
        if ADVANTAGE_ESTIMATORS.get(name, fn) is not fn:
            raise ValueError(f"advantage estimator {name!r} is already registered to {ADVANTAGE_ESTIMATORS[name]}")
        ADVANTAGE_ESTIMATORS[name] = fn
        if group_baseline:
            GROUP_BASELINE_ESTIMATORS.add(name)
        return fn

    return decorator


def get_advantage_estimator(name: str) -> AdvantageEstimator:
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; valid: {sorted(ADVANTAGE_ESTIMATORS)}")
    return ADVANTAGE_ESTIMATORS[name]


@dataclasses.dataclass(frozen=True)
class GroupStats:
    """Per-sample statistics of the sample's group, float64, each [N]."""

    mean: torch.Tensor
    std: torch.Tensor  # unbiased (n - 1); 0 for a group of size 1
    size: torch.Tensor
    all_equal: torch.Tensor  # bool: every reward of the group is the same


def group_stats(rewards_N: torch.Tensor, group_ids_N: torch.Tensor) -> GroupStats:
    """Group mean, unbiased std, size and all-equal flag, broadcast back to each sample."""
    _, group_N = torch.unique(group_ids_N, return_inverse=True)
    num_groups = int(group_N.max()) + 1
    rewards = rewards_N.to(torch.float64)
    zeros_G = torch.zeros(num_groups, dtype=torch.float64, device=rewards.device)
    size_G = zeros_G.index_add(0, group_N, torch.ones_like(rewards))
    mean_G = zeros_G.index_add(0, group_N, rewards) / size_G
    sq_dev_G = zeros_G.index_add(0, group_N, (rewards - mean_G[group_N]) ** 2)
    std_G = (sq_dev_G / (size_G - 1).clamp(min=1)).sqrt()
    max_G = zeros_G.scatter_reduce(0, group_N, rewards, reduce="amax", include_self=False)
    min_G = zeros_G.scatter_reduce(0, group_N, rewards, reduce="amin", include_self=False)
    return GroupStats(
        mean=mean_G[group_N], std=std_G[group_N], size=size_G[group_N], all_equal=(max_G == min_G)[group_N]
    )


def _zero_equal_groups(advantages_N: torch.Tensor, stats: GroupStats) -> torch.Tensor:
    return torch.where(stats.all_equal & (stats.size > 1), torch.zeros_like(advantages_N), advantages_N)


def _baseline_mean(stats: GroupStats) -> torch.Tensor:
    # verl: a lone sample has no group to compare with, so its baseline is 0.
    return torch.where(stats.size > 1, stats.mean, torch.zeros_like(stats.mean))


def _whiten_over_tokens(values_N: torch.Tensor, response_mask_NT: torch.Tensor) -> torch.Tensor:
    """verl's masked_whiten of a per-sample value broadcast over its valid tokens, computed per sample."""
    num_tokens_N = response_mask_NT.sum(dim=-1).to(torch.float64)
    total_tokens = num_tokens_N.sum()
    if total_tokens < 2:
        raise ValueError(
            f"whitening over tokens needs >= 2 valid response tokens in the batch, got {int(total_tokens)}"
        )
    mean = (values_N * num_tokens_N).sum() / total_tokens
    var = ((values_N - mean) ** 2 * num_tokens_N).sum() / (total_tokens - 1)
    return (values_N - mean) * torch.rsqrt(var + _WHITEN_VAR_EPS)


@register_advantage_estimator("grpo", group_baseline=True)
def grpo_advantage(
    rewards_N: torch.Tensor, group_ids_N: torch.Tensor, response_mask_NT: torch.Tensor, config: AdvantageConfig
) -> torch.Tensor:
    stats = group_stats(rewards_N, group_ids_N)
    std = torch.where(stats.size > 1, stats.std, torch.ones_like(stats.std))
    advantages_N = (rewards_N.to(torch.float64) - _baseline_mean(stats)) / (std + config.eps)
    return _zero_equal_groups(advantages_N, stats)


@register_advantage_estimator("dr_grpo", group_baseline=True)
def dr_grpo_advantage(
    rewards_N: torch.Tensor, group_ids_N: torch.Tensor, response_mask_NT: torch.Tensor, config: AdvantageConfig
) -> torch.Tensor:
    stats = group_stats(rewards_N, group_ids_N)
    return _zero_equal_groups(rewards_N.to(torch.float64) - _baseline_mean(stats), stats)


@register_advantage_estimator("rloo", group_baseline=True)
def rloo_advantage(
    rewards_N: torch.Tensor, group_ids_N: torch.Tensor, response_mask_NT: torch.Tensor, config: AdvantageConfig
) -> torch.Tensor:
    stats = group_stats(rewards_N, group_ids_N)
    lone = stats.size < 2
    if lone.any():
        raise ValueError(
            f"rloo needs >= 2 samples per group; groups {group_ids_N[lone].unique().tolist()[:8]} have 1. "
            "Sample n >= 2 responses per prompt or use advantage.estimator='grpo'"
        )
    rewards = rewards_N.to(torch.float64)
    # Leave-one-out mean: (group sum - r_i) / (n - 1).
    leave_one_out_mean = (stats.mean * stats.size - rewards) / (stats.size - 1)
    return _zero_equal_groups(rewards - leave_one_out_mean, stats)


@register_advantage_estimator("reinforce_plus_plus")
def reinforce_plus_plus_advantage(
    rewards_N: torch.Tensor, group_ids_N: torch.Tensor, response_mask_NT: torch.Tensor, config: AdvantageConfig
) -> torch.Tensor:
    return _whiten_over_tokens(rewards_N.to(torch.float64), response_mask_NT)


@register_advantage_estimator("reinforce_plus_plus_baseline", group_baseline=True)
def reinforce_plus_plus_baseline_advantage(
    rewards_N: torch.Tensor, group_ids_N: torch.Tensor, response_mask_NT: torch.Tensor, config: AdvantageConfig
) -> torch.Tensor:
    stats = group_stats(rewards_N, group_ids_N)
    return _whiten_over_tokens(rewards_N.to(torch.float64) - _baseline_mean(stats), response_mask_NT)


@dataclasses.dataclass(frozen=True)
class AdvantageOutput:
    advantages_NT: torch.Tensor  # rewards' dtype, zero outside loss_mask_NT
    loss_mask_NT: torch.Tensor  # bool: response mask minus truncated responses when config.mask_truncated


def compute_advantages(
    rewards_N: torch.Tensor,
    group_ids_N: torch.Tensor,
    response_mask_NT: torch.Tensor,
    config: AdvantageConfig,
    is_truncated_N: Optional[torch.Tensor] = None,
) -> AdvantageOutput:
    """Per-token advantages of the estimator ``config.estimator``.

    Args:
        rewards_N: [N] float, one scalar reward per response.
        group_ids_N: [N] integer, the prompt each response belongs to (any order, any group size).
        response_mask_NT: [N, T] bool or 0/1, the response tokens.
        config: the advantage config.
        is_truncated_N: [N] bool, responses cut at the length limit; required when ``config.mask_truncated``.
    """
    if rewards_N.ndim != 1 or not rewards_N.is_floating_point():
        raise ValueError(
            f"rewards_N must be a 1-D float tensor, got shape {tuple(rewards_N.shape)} {rewards_N.dtype}"
        )
    num_samples = rewards_N.shape[0]
    if num_samples == 0:
        raise ValueError("rewards_N is empty: no samples to compute advantages for")
    if group_ids_N.shape != (num_samples,) or group_ids_N.is_floating_point():
        raise ValueError(
            f"group_ids_N must be an integer tensor of shape ({num_samples},), got "
            f"{tuple(group_ids_N.shape)} {group_ids_N.dtype}"
        )
    if response_mask_NT.ndim != 2 or response_mask_NT.shape[0] != num_samples:
        raise ValueError(f"response_mask_NT must have shape ({num_samples}, T), got {tuple(response_mask_NT.shape)}")
    non_finite = ~torch.isfinite(rewards_N)
    if non_finite.any():
        raise ValueError(f"rewards_N has non-finite values at indices {torch.nonzero(non_finite).flatten().tolist()}")
    loss_mask_NT = response_mask_NT.bool()
    if config.mask_truncated:
        if is_truncated_N is None:
            raise ValueError("advantage.mask_truncated=True needs is_truncated_N; pass the rollout's truncation flags")
        if is_truncated_N.shape != (num_samples,):
            raise ValueError(f"is_truncated_N must have shape ({num_samples},), got {tuple(is_truncated_N.shape)}")
        loss_mask_NT = loss_mask_NT & ~is_truncated_N.bool().unsqueeze(-1)

    advantages = get_advantage_estimator(config.estimator)(rewards_N, group_ids_N, response_mask_NT, config)
    if advantages.ndim == 1:
        advantages = advantages.unsqueeze(-1)
    advantages_NT = torch.where(loss_mask_NT, advantages, torch.zeros_like(advantages)).to(rewards_N.dtype)
    return AdvantageOutput(advantages_NT=advantages_NT, loss_mask_NT=loss_mask_NT)
