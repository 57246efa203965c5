"""Reward functions and score schemes by name; user rewards plug in by name or by import path.

Why: the trainer names its reward in `RewardConfig.reward_fn`; a typo must fail at config time with the valid
names listed. A reward function is ``fn(response: str, ground_truth: str, config: RewardConfig)`` returning a
`GradeResult` or a plain float. It runs in grader worker processes, so it must be a module-level function of an
importable module (not ``__main__``, not a lambda).

How::

    @register_reward("my_reward")
    def my_reward(response, ground_truth, config): ...

    RewardConfig(reward_fn="my_reward")                   # after the module above is imported
    RewardConfig(reward_fn="my_package.rewards:my_reward")  # no registration needed
"""

import importlib
from collections.abc import Callable
from typing import Union

from megatron_zero.config.reward import RewardConfig
from megatron_zero.rewards.math_reward import grade_math
from megatron_zero.rewards.types import GradeResult, GradeStatus

RewardFn = Callable[[str, str, RewardConfig], Union[GradeResult, float]]

REWARD_FUNCTIONS: dict[str, RewardFn] = {"math": grade_math}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator registering a reward function under `name` (a name, not an import path)."""

    def register(fn: RewardFn) -> RewardFn:
        if ":" in name:
            raise ValueError(f"reward name {name!r} must not contain ':' (that marks an import path)")
        if name in REWARD_FUNCTIONS:
            raise ValueError(f"reward {name!r} is already registered ({REWARD_FUNCTIONS[name]!r}); pick another name")
        REWARD_FUNCTIONS[name] = fn
        return fn

    return register


def get_reward_fn(name_or_path: str) -> RewardFn:
    """The reward function registered as `name_or_path`, or imported from "package.module:function"."""
    if ":" not in name_or_path:
        if name_or_path not in REWARD_FUNCTIONS:
            raise ValueError(
                f"reward function {name_or_path!r} is unknown; use one of {sorted(REWARD_FUNCTIONS)} or an "
                "import path 'package.module:function'"
            )
        return REWARD_FUNCTIONS[name_or_path]
    module_name, _, attribute_path = name_or_path.partition(":")
    try:
        target = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"reward function {name_or_path!r}: cannot import module {module_name!r} ({error})") from error
    for attribute in attribute_path.split("."):
        if not hasattr(target, attribute):
            raise ValueError(f"reward function {name_or_path!r}: module {module_name!r} has no {attribute_path!r}")
        target = getattr(target, attribute)
    if not callable(target):
        raise ValueError(f"reward function {name_or_path!r} is a {type(target).__name__}, not a function")
    return target


def call_reward(fn: RewardFn, response: str, ground_truth: str, config: RewardConfig) -> GradeResult:
    """Run `fn` on one response; a plain float result becomes an ok `GradeResult`."""
    result = fn(response, ground_truth, config)
    if isinstance(result, GradeResult):
        return result
    return GradeResult(score=float(result), status=GradeStatus.OK)
