"""Advantage estimators vs plain-Python float references written from the formulas.

Run: python -m pytest tests/test_advantages.py -q
"""

import math

import pytest
import torch

from megatron_zero.actor.advantages import (
    ADVANTAGE_ESTIMATORS,
    compute_advantages,
    get_advantage_estimator,
    register_advantage_estimator,
)
from megatron_zero.config.algorithm import AdvantageConfig
from megatron_zero.config.problems import raise_problems
from megatron_zero.preflight.names import advantage_problems

# Non-contiguous groups 3, 7, 1 with sizes 3, 3, 2 plus a singleton group 9.
GROUP_IDS = [3, 7, 3, 7, 3, 1, 7, 1, 9]
REWARDS = [1.0, 0.0, 0.0, 1.0, 0.5, 1.0, 0.25, -0.5, 0.75]
LENGTHS = [4, 6, 1, 3, 6, 2, 5, 6, 3]
MAX_LEN = 6


def response_mask(lengths: list[int], max_len: int = MAX_LEN) -> torch.Tensor:
    return torch.tensor([[t < length for t in range(max_len)] for length in lengths])


def groups_of(group_ids: list[int]) -> dict[int, list[int]]:
    members: dict[int, list[int]] = {}
    for i, group in enumerate(group_ids):
        members.setdefault(group, []).append(i)
    return members


def ref_mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return mean, std


def ref_grpo(rewards: list[float], group_ids: list[int], eps: float) -> list[float]:
    members = groups_of(group_ids)
    out = []
    for i, r in enumerate(rewards):
        group = [rewards[j] for j in members[group_ids[i]]]
        if len(group) == 1:
            out.append(r / (1.0 + eps))  # verl: mean 0, std 1
        else:
            mean, std = ref_mean_std(group)
            out.append(0.0 if max(group) == min(group) else (r - mean) / (std + eps))
    return out


def ref_dr_grpo(rewards: list[float], group_ids: list[int]) -> list[float]:
    members = groups_of(group_ids)
    out = []
    for i, r in enumerate(rewards):
        group = [rewards[j] for j in members[group_ids[i]]]
        out.append(r if len(group) == 1 else r - sum(group) / len(group))
    return out


def ref_rloo(rewards: list[float], group_ids: list[int]) -> list[float]:
    members = groups_of(group_ids)
    out = []
    for i, r in enumerate(rewards):
        others = [rewards[j] for j in members[group_ids[i]] if j != i]
        out.append(r - sum(others) / len(others))
    return out


def ref_whiten_tokens(values: list[float], lengths: list[int]) -> list[float]:
    tokens = [v for v, length in zip(values, lengths) for _ in range(length)]
    mean = sum(tokens) / len(tokens)
    var = sum((x - mean) ** 2 for x in tokens) / (len(tokens) - 1)
    return [(v - mean) / math.sqrt(var + 1e-8) for v in values]


def broadcast(per_sample: list[float], lengths: list[int], max_len: int = MAX_LEN) -> torch.Tensor:
    return torch.tensor(
        [[a if t < length else 0.0 for t in range(max_len)] for a, length in zip(per_sample, lengths)],
        dtype=torch.float64,
    )


def run(estimator: str, rewards=REWARDS, group_ids=GROUP_IDS, lengths=LENGTHS, **kwargs):
    config = AdvantageConfig(estimator=estimator, **kwargs.pop("config", {}))
    return compute_advantages(
        torch.tensor(rewards, dtype=torch.float64),
        torch.tensor(group_ids),
        response_mask(lengths),
        config,
        **kwargs,
    )


@pytest.mark.parametrize("eps", [1e-6, 0.1])
def test_grpo_matches_reference(eps):
    out = run("grpo", config={"eps": eps})
    expected = broadcast(ref_grpo(REWARDS, GROUP_IDS, eps), LENGTHS)
    torch.testing.assert_close(out.advantages_NT, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(out.loss_mask_NT, response_mask(LENGTHS))


def test_dr_grpo_matches_reference():
    out = run("dr_grpo")
    torch.testing.assert_close(out.advantages_NT, broadcast(ref_dr_grpo(REWARDS, GROUP_IDS), LENGTHS))


def test_rloo_matches_reference():
    group_ids = GROUP_IDS[:-1]  # drop the singleton
    out = run("rloo", rewards=REWARDS[:-1], group_ids=group_ids, lengths=LENGTHS[:-1])
    expected = broadcast(ref_rloo(REWARDS[:-1], group_ids), LENGTHS[:-1])
    torch.testing.assert_close(out.advantages_NT, expected, rtol=1e-12, atol=1e-12)


def test_rloo_singleton_group_raises_naming_it():
    with pytest.raises(ValueError, match=r"rloo needs >= 2 samples per group; groups \[9\]"):
        run("rloo")


def test_reinforce_plus_plus_whitens_over_valid_tokens():
    out = run("reinforce_plus_plus")
    expected = broadcast(ref_whiten_tokens(REWARDS, LENGTHS), LENGTHS)
    torch.testing.assert_close(out.advantages_NT, expected, rtol=1e-12, atol=1e-12)


def test_reinforce_plus_plus_baseline_subtracts_group_mean_then_whitens():
    out = run("reinforce_plus_plus_baseline")
    # dr_grpo's reference is exactly "r - group mean, lone sample keeps r".
    expected = broadcast(ref_whiten_tokens(ref_dr_grpo(REWARDS, GROUP_IDS), LENGTHS), LENGTHS)
    torch.testing.assert_close(out.advantages_NT, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_all_equal_group_gets_exactly_zero(estimator):
    # 0.1 * 3 / 3 != 0.1 in floating point, so a plain (r - mean) would leave ~1e-17 (and /std blow it up).
    rewards = [0.1, 0.1, 0.1, 0.7, 0.7, 1.0, 0.0]
    group_ids = [5, 5, 5, 2, 2, 8, 8]
    lengths = [2, 3, 4, 5, 6, 1, 2]
    out = run(estimator, rewards=rewards, group_ids=group_ids, lengths=lengths)
    assert (out.advantages_NT[:5] == 0).all()
    assert (out.advantages_NT[5:][response_mask(lengths[5:])] != 0).all()


def test_float32_rewards_give_float32_advantages():
    out = compute_advantages(
        torch.tensor(REWARDS, dtype=torch.float32), torch.tensor(GROUP_IDS), response_mask(LENGTHS), AdvantageConfig()
    )
    assert out.advantages_NT.dtype == torch.float32
    expected = broadcast(ref_grpo(REWARDS, GROUP_IDS, 1e-6), LENGTHS).float()
    torch.testing.assert_close(out.advantages_NT, expected)


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "reinforce_plus_plus"])
def test_mask_truncated_zeroes_truncated_rows_but_keeps_them_in_group_stats(estimator):
    truncated = [False, True, False, False, False, False, True, False, False]
    out = run(estimator, config={"mask_truncated": True}, is_truncated_N=torch.tensor(truncated))
    unmasked = run(estimator)
    keep = torch.tensor([not t for t in truncated]).unsqueeze(-1)
    assert torch.equal(out.loss_mask_NT, response_mask(LENGTHS) & keep)
    torch.testing.assert_close(out.advantages_NT, unmasked.advantages_NT * keep)
    assert (out.advantages_NT[1] == 0).all() and (out.advantages_NT[6] == 0).all()


def test_truncation_flags_ignored_unless_mask_truncated():
    out = run("grpo", is_truncated_N=torch.ones(len(REWARDS), dtype=torch.bool))
    assert torch.equal(out.loss_mask_NT, response_mask(LENGTHS))


def test_mask_truncated_without_flags_raises():
    with pytest.raises(ValueError, match="mask_truncated=True needs is_truncated_N"):
        run("grpo", config={"mask_truncated": True})


@pytest.mark.parametrize(
    "rewards, group_ids, mask, message",
    [
        (torch.tensor([[1.0]]), torch.tensor([0]), torch.ones(1, 2), "rewards_N must be a 1-D float"),
        (torch.tensor([1, 0]), torch.tensor([0, 0]), torch.ones(2, 2), "rewards_N must be a 1-D float"),
        (torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]), torch.ones(2, 2), "group_ids_N must be an integer"),
        (torch.tensor([1.0, 0.0]), torch.tensor([0]), torch.ones(2, 2), "group_ids_N must be an integer"),
        (torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), torch.ones(3, 2), "response_mask_NT must have shape"),
        (torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]), torch.ones(2, 2), r"non-finite .* \[1\]"),
        (torch.tensor([]), torch.tensor([], dtype=torch.long), torch.ones(0, 2), "rewards_N is empty"),
    ],
)
def test_bad_inputs_raise(rewards, group_ids, mask, message):
    with pytest.raises(ValueError, match=message):
        compute_advantages(rewards, group_ids, mask, AdvantageConfig())


def test_unknown_estimator_lists_valid_names():
    with pytest.raises(ValueError, match="advantage.estimator='gae' is unknown.*'dr_grpo'.*'grpo'.*'rloo'"):
        raise_problems(advantage_problems(AdvantageConfig(estimator="gae")))
    with pytest.raises(ValueError, match="unknown advantage estimator 'gae'; valid: .*reinforce_plus_plus"):
        get_advantage_estimator("gae")


def test_negative_eps_rejected():
    with pytest.raises(ValueError, match=r"advantage.eps=-1e-06 must be >= 0"):
        AdvantageConfig(eps=-1e-6)


def test_user_registered_estimator_is_usable_by_name():
    name = "test_reward_as_advantage"

    @register_advantage_estimator(name)
    def reward_as_advantage(rewards_N, group_ids_N, response_mask_NT, config):
        return rewards_N

    try:
        out = run(name)
        torch.testing.assert_close(out.advantages_NT, broadcast(REWARDS, LENGTHS))
        with pytest.raises(ValueError, match="already registered"):
            register_advantage_estimator(name)(lambda *args: None)
    finally:
        del ADVANTAGE_ESTIMATORS[name]
