"""The names a config field may take, checked against the registries where they live.

Why: config/ holds plain dataclasses and imports no other package of ours, so a name such as
``advantage.estimator`` is a string there. The registries register themselves in the modules that implement them
(actor/advantages.py, actor/losses.py, rewards/registry.py, data/templates.py); this module asks them, so a typo
fails in one line naming the key and the valid names, before any worker starts. ``preflight.config.load_config``
runs it on every loaded config, and ``check_train_inputs`` on a config built in Python.

How: ``problems = name_problems(config)`` (every problem, empty when all names are known), or
``raise_problems(advantage_problems(AdvantageConfig(estimator="gae")))`` (config/problems.py).
"""

from __future__ import annotations

from megatron_zero.config.algorithm import AdvantageConfig, PolicyLossConfig
from megatron_zero.config.data import DatasetConfig
from megatron_zero.config.reward import RewardConfig
from megatron_zero.config.trainer import TrainConfig


def advantage_problems(advantage: AdvantageConfig, key: str = "advantage") -> list[str]:
    from megatron_zero.actor.advantages import ADVANTAGE_ESTIMATORS

    if advantage.estimator in ADVANTAGE_ESTIMATORS:
        return []
    return [f"{key}.estimator={advantage.estimator!r} is unknown; use one of {sorted(ADVANTAGE_ESTIMATORS)} or "
            "register yours with register_advantage_estimator"]


def loss_problems(loss: PolicyLossConfig, key: str = "loss") -> list[str]:
    from megatron_zero.actor.losses import KL_ESTIMATORS, POLICY_LOSSES

    problems = []
    if loss.policy_loss not in POLICY_LOSSES:
        problems.append(f"{key}.policy_loss={loss.policy_loss!r} is unknown; use one of {sorted(POLICY_LOSSES)} or "
                        "register yours with register_policy_loss")
    if loss.kl_estimator not in KL_ESTIMATORS:
        problems.append(f"{key}.kl_estimator={loss.kl_estimator!r} is unknown; use one of {sorted(KL_ESTIMATORS)}")
    return problems


def reward_problems(reward: RewardConfig, key: str = "reward") -> list[str]:
    from megatron_zero.rewards.registry import REWARD_FUNCTIONS

    # An import path "package.module:function" is resolved by the grader workers, which name its problems.
    if ":" in reward.reward_fn or reward.reward_fn in REWARD_FUNCTIONS:
        return []
    return [f"{key}.reward_fn={reward.reward_fn!r} is unknown; use one of {sorted(REWARD_FUNCTIONS)}, an import "
            "path 'package.module:function', or register yours with register_reward"]


def template_problems(dataset: DatasetConfig, key: str = "data.train") -> list[str]:
    from megatron_zero.data.templates import check_template

    try:
        check_template(dataset.template)
    except ValueError as error:
        return [f"{key}.template: {error}"]
    return []


def name_problems(config: TrainConfig) -> list[str]:
    """Every unknown name of ``config``, and the estimator's need for several samples per prompt (a property of
    the registered estimator)."""
    from megatron_zero.actor.advantages import GROUP_BASELINE_ESTIMATORS

    problems = [*advantage_problems(config.advantage), *loss_problems(config.loss), *reward_problems(config.reward),
                *template_problems(config.data.train)]
    if config.advantage.estimator in GROUP_BASELINE_ESTIMATORS and config.rollout.num_samples_per_prompt < 2:
        problems.append(
            f"advantage.estimator={config.advantage.estimator!r} compares each response with the other samples of "
            "its prompt, but rollout.num_samples_per_prompt=1: every advantage would be 0 (a group of one has no "
            "spread) and nothing would train; sample n >= 2 per prompt (recipe: 8) or use "
            "advantage.estimator='reinforce_plus_plus'")
    return problems
