"""Policy loss, KL estimators, aggregation and microbatching vs a plain per-token Python reference.

The reference walks the tokens one by one on 0-d float64 tensors, so autograd gives its gradient too.
Run: python -m pytest tests/test_losses.py -q
"""

import dataclasses
import math

import pytest
import torch
from omegaconf import OmegaConf

from megatron_zero.actor.losses import (
    AGGREGATION_MODES,
    aggregation_normaliser,
    compute_policy_loss,
    get_kl_estimator,
    get_policy_loss,
    masked_mean,
    masked_sum,
)
from megatron_zero.config.algorithm import PolicyLossConfig

MAX_RESPONSE_LENGTH = 9  # the Dr. GRPO constant: larger than any padded width below


# --------------------------------------------------------------------------- plain reference


def ref_kl(estimator: str, logp: torch.Tensor, ref_logp: float) -> torch.Tensor:
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k2":
        return 0.5 * (logp - ref_logp) ** 2
    log_ratio = ref_logp - logp  # k3 / low_var_kl; test data stays inside the [-20, 20] log-ratio clamp
    value = torch.exp(log_ratio) - log_ratio - 1
    return torch.tensor(10.0, dtype=torch.float64) if value > 10 else value


def ref_pg(logp: torch.Tensor, old: float, adv: float, rollout: float, config: PolicyLossConfig) -> torch.Tensor:
    ratio = torch.exp(logp - old)
    low, high = 1 - config.clip_low, 1 + config.clip_high
    clipped_ratio = low if ratio < low else high if ratio > high else ratio
    unclipped, clipped = -adv * ratio, -adv * clipped_ratio
    loss = unclipped if unclipped >= clipped else clipped
    if config.dual_clip_c is not None and adv < 0 and loss > -adv * config.dual_clip_c:
        loss = torch.tensor(-adv * config.dual_clip_c, dtype=torch.float64)
    if config.tis_cap is not None:
        loss = loss * min(math.exp(old - rollout), config.tis_cap)
    return loss


def ref_aggregate(values: list[list[torch.Tensor]], mask: list[list[bool]], mode: str) -> torch.Tensor:
    seq_sums, seq_counts = [], []
    for row, row_mask in zip(values, mask):
        if any(row_mask):
            seq_sums.append(sum(v for v, m in zip(row, row_mask) if m))
            seq_counts.append(sum(row_mask))
    if mode == "token-mean":
        return sum(seq_sums) / sum(seq_counts)
    if mode == "seq-mean-token-sum":
        return sum(seq_sums) / len(seq_sums)
    if mode == "seq-mean-token-mean":
        return sum(s / n for s, n in zip(seq_sums, seq_counts)) / len(seq_sums)
    assert mode == "seq-mean-token-sum-norm"
    return sum(seq_sums) / (len(seq_sums) * MAX_RESPONSE_LENGTH)


def ref_loss(batch: dict[str, torch.Tensor], config: PolicyLossConfig) -> torch.Tensor:
    num_rows, num_cols = batch["mask"].shape
    mask = batch["mask"].tolist()
    pg = [[None] * num_cols for _ in range(num_rows)]
    kl = [[None] * num_cols for _ in range(num_rows)]
    entropy = [[batch["entropy"][i, t] for t in range(num_cols)] for i in range(num_rows)]
    for i in range(num_rows):
        for t in range(num_cols):
            logp = batch["logp"][i, t]
            old, adv = batch["old_logp"][i, t].item(), batch["advantages"][i, t].item()
            pg[i][t] = ref_pg(logp, old, adv, batch["rollout_logp"][i, t].item(), config)
            kl[i][t] = ref_kl(config.kl_estimator, logp, batch["ref_logp"][i, t].item())
    loss = ref_aggregate(pg, mask, config.aggregation)
    loss = loss + config.kl_coef * ref_aggregate(kl, mask, config.aggregation)
    return loss - config.entropy_coef * ref_aggregate(entropy, mask, config.aggregation)


# --------------------------------------------------------------------------- data


def make_batch(seed: int, num_rows: int = 6, num_cols: int = 7) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)

    def randn(scale: float) -> torch.Tensor:
        return scale * torch.randn(num_rows, num_cols, dtype=torch.float64, generator=generator)

    old_logp = -torch.rand(num_rows, num_cols, dtype=torch.float64, generator=generator) * 3
    lengths = torch.randint(1, num_cols + 1, (num_rows,), generator=generator)
    lengths[2] = 0  # a fully masked response (e.g. truncated and masked out)
    mask = torch.arange(num_cols).unsqueeze(0) < lengths.unsqueeze(-1)
    return {
        # log-ratios up to ~+-1 put tokens on both sides of both clip bounds
        "logp": (old_logp + randn(0.4)).requires_grad_(True),
        "old_logp": old_logp,
        "advantages": randn(1.0),
        "ref_logp": old_logp + randn(0.5),
        "entropy": torch.rand(num_rows, num_cols, dtype=torch.float64, generator=generator).requires_grad_(True),
        "rollout_logp": old_logp + randn(0.8),
        "mask": mask,
    }


def our_loss(batch: dict[str, torch.Tensor], config: PolicyLossConfig, rows=slice(None), cols=slice(None), **kw):
    def part(name: str) -> torch.Tensor:
        return batch[name][rows, cols]

    return compute_policy_loss(
        part("logp"),
        part("old_logp"),
        part("advantages"),
        part("mask"),
        config,
        ref_logp_NT=part("ref_logp"),
        entropy_NT=part("entropy"),
        rollout_logp_NT=part("rollout_logp"),
        **kw,
    )


def grads(loss: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.autograd.grad(loss, (batch["logp"], batch["entropy"]))


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3", "low_var_kl"])
@pytest.mark.parametrize("aggregation", AGGREGATION_MODES)
@pytest.mark.parametrize("extras", [{}, {"clip_high": 0.28, "dual_clip_c": 2.0, "tis_cap": 1.5}])
def test_loss_and_gradient_match_reference(kl_estimator, aggregation, extras):
    # Large coefficients so the KL and entropy terms are visible in the comparison.
    config = PolicyLossConfig(
        kl_estimator=kl_estimator, aggregation=aggregation, kl_coef=0.3, entropy_coef=0.2, **extras
    )
    batch = make_batch(seed=1)
    loss, metrics = our_loss(batch, config, max_response_length=MAX_RESPONSE_LENGTH)
    expected = ref_loss(batch, config)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    for ours, reference in zip(grads(loss, batch), grads(expected, batch)):
        torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    assert metrics["num_tokens"] == batch["mask"].sum()


def test_clip_and_dual_clip_on_hand_made_tokens():
    # (advantage, ratio) -> which regime, with clip [0.8, 1.28] and dual clip 3:
    cases = [
        (1.0, 1.5),  # A > 0 above 1 + clip_high: clipped to -1.28, no gradient
        (1.0, 0.5),  # A > 0 below 1 - clip_low: not clipped (pessimistic branch is the unclipped one)
        (-1.0, 0.5),  # A < 0 below 1 - clip_low: clipped to 0.8, no gradient
        (-1.0, 1.5),  # A < 0 above 1 + clip_high: unclipped 1.5 < dual bound 3
        (-1.0, 5.0),  # A < 0, huge ratio: dual clip caps the loss at 3, no gradient
        (1.0, 1.25),  # inside the clip-higher range (clipped if clip_high were 0.2)
    ]
    expected_losses = [-1.28, -0.5, 0.8, 1.5, 3.0, -1.25]
    expected_grads = [0.0, -0.5, 0.0, 1.5, 0.0, -1.25]  # d(-A r)/d logp = -A r where unclipped
    config = PolicyLossConfig(clip_low=0.2, clip_high=0.28, dual_clip_c=3.0, kl_coef=0, entropy_coef=0)
    advantages = torch.tensor([[a for a, _ in cases]], dtype=torch.float64)
    old_logp = torch.full_like(advantages, -1.0)
    logp = (old_logp + torch.tensor([[math.log(r) for _, r in cases]], dtype=torch.float64)).requires_grad_(True)
    mask = torch.ones_like(advantages, dtype=torch.bool)

    loss, metrics = compute_policy_loss(logp, old_logp, advantages, mask, config)
    loss.backward()
    num_tokens = len(cases)
    torch.testing.assert_close(loss.item(), sum(expected_losses) / num_tokens)
    torch.testing.assert_close(logp.grad[0].tolist(), [g / num_tokens for g in expected_grads])
    assert metrics["clip_fraction"].item() == pytest.approx(2 / 6)
    assert metrics["dual_clip_fraction"].item() == pytest.approx(1 / 6)
    ratios = [r for _, r in cases]
    assert metrics["approx_kl"].item() == pytest.approx(sum(r - 1 - math.log(r) for r in ratios) / num_tokens)

    symmetric = dataclasses.replace(config, clip_high=0.2)
    _, metrics = compute_policy_loss(logp, old_logp, advantages, mask, symmetric)
    assert metrics["clip_fraction"].item() == pytest.approx(3 / 6)


def test_dual_clip_off_leaves_large_negative_advantage_loss_unbounded():
    config = PolicyLossConfig(kl_coef=0, entropy_coef=0)
    old_logp = torch.zeros(1, 1, dtype=torch.float64)
    loss, metrics = compute_policy_loss(
        old_logp + math.log(5.0), old_logp, -torch.ones(1, 1, dtype=torch.float64), torch.ones(1, 1), config
    )
    assert loss.item() == pytest.approx(5.0)
    assert "dual_clip_fraction" not in metrics


@pytest.mark.parametrize(
    "estimator, logp, ref_logp, expected",
    [
        ("k1", -1.0, -1.5, 0.5),
        ("k2", -1.0, -1.5, 0.125),
        ("k3", -1.0, -1.5, math.exp(-0.5) + 0.5 - 1),
        ("low_var_kl", -2.0, -0.5, math.exp(1.5) - 1.5 - 1),
        ("k3", -20.0, -5.0, 10.0),  # exp(15) - 16 is clamped to 10 as verl does
    ],
)
def test_kl_estimators_match_formulas(estimator, logp, ref_logp, expected):
    value = get_kl_estimator(estimator)(torch.tensor([logp], dtype=torch.float64), torch.tensor([ref_logp]))
    assert value.item() == pytest.approx(expected, rel=1e-12)


def test_tis_weight_is_capped_detached_and_reported():
    config = PolicyLossConfig(kl_coef=0, entropy_coef=0, tis_cap=2.0)
    old_logp = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)
    # Weights 0.5 and 3 -> capped to 2. requires_grad only to show the weight is detached.
    rollout_logp = old_logp - torch.tensor([[math.log(0.5), math.log(3.0)]], dtype=torch.float64)
    rollout_logp.requires_grad_(True)
    logp = old_logp.clone().requires_grad_(True)  # ratio 1: pg loss per token is -A
    advantages = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    loss, metrics = compute_policy_loss(
        logp, old_logp, advantages, torch.ones(1, 2), config, rollout_logp_NT=rollout_logp
    )
    loss.backward()
    assert loss.item() == pytest.approx((-1.0 * 0.5 - 2.0 * 2.0) / 2)
    assert metrics["tis_weight_mean"].item() == pytest.approx((0.5 + 2.0) / 2)
    assert metrics["tis_capped_fraction"].item() == pytest.approx(1 / 2)  # the weight 3 hit the cap, 0.5 did not
    # Gradient of -A r w at r = 1 is -A w: the weight scales it but is not differentiated itself.
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.5 / 2, -4.0 / 2]], dtype=torch.float64))
    assert rollout_logp.grad is None


@pytest.mark.parametrize("aggregation", AGGREGATION_MODES)
def test_microbatch_split_sums_to_full_batch_loss_and_gradient(aggregation):
    config = PolicyLossConfig(aggregation=aggregation, dual_clip_c=3.0, tis_cap=2.0, kl_coef=0.1, entropy_coef=0.01)
    batch = make_batch(seed=7)
    full_loss, full_metrics = our_loss(batch, config, max_response_length=MAX_RESPONSE_LENGTH)
    full_grads = grads(full_loss, batch)

    # Each microbatch is padded only to its own longest response, as a packing data loader would do.
    microbatches = []
    for rows in (slice(0, 2), slice(2, 3), slice(3, 6)):
        width = max(int(batch["mask"][rows].sum(dim=-1).max()), 1)
        microbatches.append((rows, slice(0, width)))
    normaliser = sum(
        aggregation_normaliser(batch["mask"][rows, cols], aggregation, MAX_RESPONSE_LENGTH)
        for rows, cols in microbatches
    )
    losses, metrics = zip(*(our_loss(batch, config, rows, cols, normaliser=normaliser) for rows, cols in microbatches))
    split_loss = sum(losses)
    torch.testing.assert_close(split_loss, full_loss, rtol=1e-12, atol=1e-12)
    for ours, reference in zip(grads(split_loss, batch), full_grads):
        torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    for name in ("pg_loss", "kl_ref", "entropy"):
        torch.testing.assert_close(sum(m[name] for m in metrics), full_metrics[name], rtol=1e-12, atol=1e-12)
    weighted_clip = sum(m["clip_fraction"] * m["num_tokens"] for m in metrics) / full_metrics["num_tokens"]
    torch.testing.assert_close(weighted_clip, full_metrics["clip_fraction"])


def test_masked_reductions_ignore_garbage_and_handle_empty_masks():
    values = torch.tensor([[1.0, float("nan"), 3.0], [float("inf"), 0.0, 0.0]])
    mask = torch.tensor([[True, False, True], [False, False, False]])
    assert masked_sum(values, mask).item() == 4.0
    assert masked_mean(values, mask).item() == 2.0
    assert masked_mean(values, mask, dim=-1).tolist() == [2.0, 0.0]
    assert masked_mean(values, torch.zeros_like(mask)).item() == 0.0


def test_all_masked_batch_gives_zero_loss_not_nan():
    batch = make_batch(seed=2)
    batch["mask"] = torch.zeros_like(batch["mask"])
    loss, _ = our_loss(batch, PolicyLossConfig())
    assert loss.item() == 0.0


@pytest.mark.parametrize(
    "missing, config_kwargs, message",
    [
        ("ref_logp_NT", {}, "kl_coef=0.0001 > 0 needs ref_logp_NT"),
        ("entropy_NT", {}, "entropy_coef=0.001 > 0 needs entropy_NT"),
        ("rollout_logp_NT", {"tis_cap": 2.0}, "tis_cap=2.0 needs rollout_logp_NT"),
    ],
)
def test_missing_inputs_raise(missing, config_kwargs, message):
    batch = make_batch(seed=0)
    kwargs = {"ref_logp_NT": batch["ref_logp"], "entropy_NT": batch["entropy"], "rollout_logp_NT": None}
    kwargs[missing] = None
    with pytest.raises(ValueError, match=message):
        compute_policy_loss(
            batch["logp"], batch["old_logp"], batch["advantages"], batch["mask"], PolicyLossConfig(**config_kwargs),
            **kwargs,
        )


def test_shape_mismatch_and_missing_max_length_raise():
    batch = make_batch(seed=0)
    with pytest.raises(ValueError, match=r"entropy_NT.shape=\(6, 6\) must equal mask_NT.shape=\(6, 7\)"):
        our_loss({**batch, "entropy": batch["entropy"][:, :6]}, PolicyLossConfig())
    with pytest.raises(ValueError, match="seq-mean-token-sum-norm' needs max_response_length"):
        our_loss(batch, PolicyLossConfig(aggregation="seq-mean-token-sum-norm"))
    with pytest.raises(ValueError, match="normaliser=-1 must be >= 0"):
        our_loss(batch, PolicyLossConfig(), normaliser=-1)


def test_unknown_registry_names_list_valid_ones():
    with pytest.raises(ValueError, match=r"unknown policy loss 'grpo'; valid: \['ppo'"):
        get_policy_loss("grpo")
    with pytest.raises(ValueError, match=r"unknown KL estimator 'k4'; valid: \['k1', 'k2', 'k3', 'low_var_kl'\]"):
        get_kl_estimator("k4")


def test_recipe_defaults_and_omegaconf_round_trip():
    config = PolicyLossConfig()
    assert (config.clip_low, config.clip_high, config.kl_coef, config.entropy_coef) == (0.2, 0.2, 1e-4, 1e-3)
    assert (config.kl_estimator, config.aggregation, config.dual_clip_c, config.tis_cap) == (
        "low_var_kl", "token-mean", None, None,
    )
    merged = OmegaConf.merge(OmegaConf.structured(PolicyLossConfig), {"clip_high": 0.28, "dual_clip_c": 3.0})
    assert OmegaConf.to_object(merged) == PolicyLossConfig(clip_high=0.28, dual_clip_c=3.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.clip_low = 0.3


@pytest.mark.parametrize(
    "field, value",
    [
        ("policy_loss", "grpo"),
        ("clip_low", 0.0),
        ("clip_low", 1.0),
        ("clip_high", 0.0),
        ("dual_clip_c", 1.0),
        ("kl_coef", -1e-4),
        ("kl_estimator", "k4"),
        ("entropy_coef", -1e-3),
        ("aggregation", "mean"),
        ("tis_cap", 0.0),
    ],
)
def test_config_validation_names_field_and_value(field, value):
    from megatron_zero.config.problems import raise_problems
    from megatron_zero.preflight.names import loss_problems

    with pytest.raises(ValueError, match=rf"policy_loss\.{field}={value!r}".replace("'", "'?")):
        # Values are checked by the dataclass, registered names by the preflight.
        raise_problems(loss_problems(PolicyLossConfig(**{field: value}), key="policy_loss"))
