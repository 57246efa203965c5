"""Policy loss of the actor: PPO clipped surrogate, KL-to-reference and entropy terms, loss aggregation.

Why: the SimpleRL-Zoo recipe trains with GRPO advantages, a PPO clipped surrogate (clip 0.2), a low-variance
KL loss to the reference model and an entropy bonus, averaged over all valid tokens of the batch. Policy losses
and KL estimators register by name (``register_policy_loss``, ``register_kl_estimator``) as in verl's
``core_algos``.

How: ``compute_policy_loss(logp_NT, old_logp_NT, advantages_NT, mask_NT, config, ...)`` returns
``(loss, metrics)``. All per-token inputs are [N, T], one row per response, ``mask_NT`` marking the tokens that
count (the advantage step's loss mask).

Microbatching: every aggregation is ``sum over the microbatch / normaliser`` with a normaliser that is additive
over the global batch (a token count, a sequence count, or a sequence count times the constant max response
length). Compute ``aggregation_normaliser`` on each microbatch, sum it over all microbatches of the global batch
(and all-reduce it over data-parallel ranks), and pass the total as ``normaliser``: the sum of the microbatch
losses then equals the full-batch loss, value and gradient. (If the data-parallel gradient reduction averages
rather than sums, scale the loss by the data-parallel size.) Without ``normaliser`` the call is one full batch.

Aggregation modes (valid tokens only; a sequence counts if it has at least one valid token, so responses fully
masked as truncated are excluded from the sequence count):
- "token-mean": sum of token losses / number of tokens (recipe default).
- "seq-mean-token-sum": sum of token losses / number of sequences.
- "seq-mean-token-mean": per-sequence token mean, averaged over sequences.
- "seq-mean-token-sum-norm": sum of token losses / (number of sequences * max_response_length), Dr. GRPO's
  constant normaliser (pair it with the "dr_grpo" advantage). verl divides by max_response_length only; the
  extra 1 / num_sequences here is Dr. GRPO's 1/G and keeps the loss scale independent of the batch size.
"""

from typing import Callable, Optional, Union

import torch

from megatron_zero.config.algorithm import AGGREGATION_MODES, PolicyLossConfig

# verl clamps the log-ratio before exp so a stale token cannot overflow the ratio.
_LOG_RATIO_CLAMP = 20.0
# verl's low_var_kl clamps: the log-ratio to [-20, 20], the estimate to [-10, 10].
_K3_LOG_RATIO_CLAMP = 20.0
_K3_VALUE_CLAMP = 10.0


# --------------------------------------------------------------------------- masked reductions and aggregation


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Sum of ``values`` where ``mask``; masked entries count as 0 even when they are nan or inf."""
    masked = torch.where(mask.bool(), values, torch.zeros_like(values))
    return masked.sum() if dim is None else masked.sum(dim=dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Mean of ``values`` where ``mask``; 0 where nothing is valid (an empty microbatch, a fully masked row)."""
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim=dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def _check_aggregation(mode: str) -> None:
    if mode not in AGGREGATION_MODES:
        raise ValueError(f"unknown loss aggregation {mode!r}; valid: {list(AGGREGATION_MODES)}")


def aggregation_normaliser(
    mask_NT: torch.Tensor, mode: str, max_response_length: Optional[int] = None
) -> torch.Tensor:
    """This microbatch's share of the loss normaliser of ``mode``; additive over microbatches and ranks.

    ``max_response_length`` (the rollout's max new tokens) is required by "seq-mean-token-sum-norm" and must be
    the same constant for every microbatch.
    """
    _check_aggregation(mode)
    if mode == "token-mean":
        return mask_NT.bool().sum().to(torch.float64)
    num_sequences = mask_NT.bool().any(dim=-1).sum().to(torch.float64)
    if mode == "seq-mean-token-sum-norm":
        if max_response_length is None or max_response_length <= 0:
            raise ValueError(
                f"aggregation 'seq-mean-token-sum-norm' needs max_response_length > 0 (the rollout's max new "
                f"tokens), got {max_response_length}"
            )
        return num_sequences * max_response_length
    return num_sequences


def aggregate_loss(
    loss_NT: torch.Tensor, mask_NT: torch.Tensor, mode: str, normaliser: Union[float, torch.Tensor]
) -> torch.Tensor:
    """Scalar ``sum over this microbatch / normaliser`` for ``mode``; a zero normaliser (nothing valid) gives 0."""
    _check_aggregation(mode)
    if mode == "seq-mean-token-mean":
        numerator = masked_mean(loss_NT, mask_NT, dim=-1).sum()
    else:
        numerator = masked_sum(loss_NT, mask_NT)
    normaliser = torch.as_tensor(normaliser, dtype=numerator.dtype, device=numerator.device)
    return numerator / torch.where(normaliser > 0, normaliser, torch.ones_like(normaliser))


# --------------------------------------------------------------------------- KL estimators

# (logp_NT, ref_logp_NT) -> per-token estimate of KL(policy || reference) from samples of the policy.
KLEstimator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

KL_ESTIMATORS: dict[str, KLEstimator] = {}


def register_kl_estimator(name: str) -> Callable[[KLEstimator], KLEstimator]:
    def decorator(fn: KLEstimator) -> KLEstimator:
        if KL_ESTIMATORS.get(name, fn) is not fn:
            raise ValueError(f"KL estimator {name!r} is already registered to {KL_ESTIMATORS[name]}")
        KL_ESTIMATORS[name] = fn
        return fn

    return decorator


def get_kl_estimator(name: str) -> KLEstimator:
    if name not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {name!r}; valid: {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[name]


@register_kl_estimator("k1")
def kl_k1(logp_NT: torch.Tensor, ref_logp_NT: torch.Tensor) -> torch.Tensor:
    return logp_NT - ref_logp_NT


@register_kl_estimator("k2")
def kl_k2(logp_NT: torch.Tensor, ref_logp_NT: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logp_NT - ref_logp_NT).square()


@register_kl_estimator("k3")
@register_kl_estimator("low_var_kl")
def kl_k3(logp_NT: torch.Tensor, ref_logp_NT: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 = exp(ref - logp) - (ref - logp) - 1, with verl's low_var_kl clamps."""
    log_ratio = (ref_logp_NT - logp_NT).clamp(-_K3_LOG_RATIO_CLAMP, _K3_LOG_RATIO_CLAMP)
    return (log_ratio.exp() - log_ratio - 1).clamp(-_K3_VALUE_CLAMP, _K3_VALUE_CLAMP)


# --------------------------------------------------------------------------- policy losses

# (logp_NT, old_logp_NT, advantages_NT, config) -> (per-token loss [N, T], per-token statistics {name: [N, T]}).
# The statistics are averaged over the valid tokens into the metrics.
PolicyLoss = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, PolicyLossConfig], tuple[torch.Tensor, dict[str, torch.Tensor]]
]

POLICY_LOSSES: dict[str, PolicyLoss] = {}


def register_policy_loss(name: str) -> Callable[[PolicyLoss], PolicyLoss]:
    def decorator(fn: PolicyLoss) -> PolicyLoss:
        if POLICY_LOSSES.get(name, fn) is not fn:
            raise ValueError(f"policy loss {name!r} is already registered to {POLICY_LOSSES[name]}")
        POLICY_LOSSES[name] = fn
        return fn

    return decorator


def get_policy_loss(name: str) -> PolicyLoss:
    if name not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {name!r}; valid: {sorted(POLICY_LOSSES)}")
    return POLICY_LOSSES[name]


@register_policy_loss("ppo")
def ppo_clip_loss(
    logp_NT: torch.Tensor, old_logp_NT: torch.Tensor, advantages_NT: torch.Tensor, config: PolicyLossConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)), optionally dual-clipped.

    Dual clip (verl): for A < 0 the loss is further capped at -A * dual_clip_c, so a very large ratio on a bad
    token cannot produce an unbounded loss. Statistics: clip_fraction (the clipped term is the larger one, so
    the token has no gradient), dual_clip_fraction, approx_kl = k3 estimate of KL(old || new), (r - 1) - log r.
    """
    log_ratio = (logp_NT - old_logp_NT).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    ratio = log_ratio.exp()
    loss_unclipped = -advantages_NT * ratio
    loss_clipped = -advantages_NT * ratio.clamp(1 - config.clip_low, 1 + config.clip_high)
    loss_NT = torch.maximum(loss_unclipped, loss_clipped)
    stats = {
        "clip_fraction": (loss_clipped > loss_unclipped).float(),
        "approx_kl": (ratio - 1 - log_ratio).detach(),
    }
    if config.dual_clip_c is not None:
        loss_dual = -advantages_NT * config.dual_clip_c
        dual_active = (advantages_NT < 0) & (loss_NT > loss_dual)
        loss_NT = torch.where(dual_active, loss_dual, loss_NT)
        stats["dual_clip_fraction"] = dual_active.float()
    return loss_NT, stats


def compute_policy_loss(
    logp_NT: torch.Tensor,
    old_logp_NT: torch.Tensor,
    advantages_NT: torch.Tensor,
    mask_NT: torch.Tensor,
    config: PolicyLossConfig,
    *,
    ref_logp_NT: Optional[torch.Tensor] = None,
    entropy_NT: Optional[torch.Tensor] = None,
    rollout_logp_NT: Optional[torch.Tensor] = None,
    normaliser: Optional[Union[float, torch.Tensor]] = None,
    max_response_length: Optional[int] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """loss = policy loss (x TIS weight) + kl_coef * KL(policy || ref) - entropy_coef * entropy, aggregated.

    Args:
        logp_NT: current policy log-probs (with grad), [N, T].
        old_logp_NT: log-probs of the policy that generated the batch, as recomputed by the trainer.
        advantages_NT: per-token advantages.
        mask_NT: tokens that count (bool or 0/1).
        config: the policy-loss config.
        ref_logp_NT: reference-model log-probs; required when ``config.kl_coef > 0``.
        entropy_NT: per-token entropy (with grad); required when ``config.entropy_coef > 0``.
        rollout_logp_NT: the rollout engine's log-probs; required when ``config.tis_cap`` is set.
        normaliser: the global normaliser for microbatching (module docstring); None = this call is the batch.
        max_response_length: the constant of "seq-mean-token-sum-norm" when ``normaliser`` is None.

    Returns:
        (scalar loss, metrics). Metrics are detached tensors: "pg_loss", "kl_ref", "entropy" are aggregated
        like the loss (so they too sum over microbatches to the global value); "clip_fraction", "approx_kl",
        "dual_clip_fraction", "tis_weight_mean", "tis_capped_fraction" are means over this call's valid tokens, to
        be averaged over microbatches weighted by "num_tokens".
    """
    if mask_NT.ndim != 2:
        raise ValueError(f"mask_NT must be [N, T] (one row per response), got shape {tuple(mask_NT.shape)}")
    per_token_inputs = {
        "logp_NT": logp_NT,
        "old_logp_NT": old_logp_NT,
        "advantages_NT": advantages_NT,
        "ref_logp_NT": ref_logp_NT,
        "entropy_NT": entropy_NT,
        "rollout_logp_NT": rollout_logp_NT,
    }
    for name, tensor in per_token_inputs.items():
        if tensor is not None and tensor.shape != mask_NT.shape:
            raise ValueError(f"{name}.shape={tuple(tensor.shape)} must equal mask_NT.shape={tuple(mask_NT.shape)}")
    if config.kl_coef > 0 and ref_logp_NT is None:
        raise ValueError(f"loss.kl_coef={config.kl_coef} > 0 needs ref_logp_NT; pass it or set kl_coef=0")
    if config.entropy_coef > 0 and entropy_NT is None:
        raise ValueError(
            f"loss.entropy_coef={config.entropy_coef} > 0 needs entropy_NT; pass it or set entropy_coef=0"
        )
    if config.tis_cap is not None and rollout_logp_NT is None:
        raise ValueError(f"loss.tis_cap={config.tis_cap} needs rollout_logp_NT; pass it or set tis_cap=None")
    if normaliser is None:
        normaliser = aggregation_normaliser(mask_NT, config.aggregation, max_response_length)
    elif not isinstance(normaliser, torch.Tensor) and normaliser < 0:
        raise ValueError(f"normaliser={normaliser} must be >= 0 (a token or sequence count)")

    def aggregate(values_NT: torch.Tensor) -> torch.Tensor:
        return aggregate_loss(values_NT, mask_NT, config.aggregation, normaliser)

    pg_loss_NT, token_stats = get_policy_loss(config.policy_loss)(logp_NT, old_logp_NT, advantages_NT, config)
    if config.tis_cap is not None:
        ratio_NT = (old_logp_NT - rollout_logp_NT).exp().detach()
        tis_weight_NT = ratio_NT.clamp(max=config.tis_cap)
        pg_loss_NT = pg_loss_NT * tis_weight_NT
        token_stats["tis_weight_mean"] = tis_weight_NT
        # How often the engine-vs-actor mismatch was too large to correct: the token's weight hit the cap.
        token_stats["tis_capped_fraction"] = (ratio_NT > config.tis_cap).to(tis_weight_NT.dtype)
    pg_loss = aggregate(pg_loss_NT)
    loss = pg_loss
    metrics = {"pg_loss": pg_loss.detach()}

    # With a zero coefficient the term is still logged; it just does not enter the loss.
    if ref_logp_NT is not None:
        kl_ref = aggregate(get_kl_estimator(config.kl_estimator)(logp_NT, ref_logp_NT))
        if config.kl_coef > 0:
            loss = loss + config.kl_coef * kl_ref
        metrics["kl_ref"] = kl_ref.detach()
    if entropy_NT is not None:
        entropy = aggregate(entropy_NT)
        if config.entropy_coef > 0:
            loss = loss - config.entropy_coef * entropy
        metrics["entropy"] = entropy.detach()

    for name, values_NT in token_stats.items():
        metrics[name] = masked_mean(values_NT.detach(), mask_NT)
    metrics["num_tokens"] = mask_NT.bool().sum()
    return loss, metrics
