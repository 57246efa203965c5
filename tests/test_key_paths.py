"""Every config key an error or hint names is one the user can type (issue #21 item 4).

Collects every ``word.word=`` (and every dotted name that starts like a config key) in the string constants of
raise / log calls across megatron_zero/ (by AST, f-strings included) and resolves it against the config the message
is for: TrainConfig (what `train` reads); inside config/ (but not TrainConfig's own checks), a sub-config's own
prefix as ``load_config`` renames it (``policy_loss.`` -> ``loss.``); the `eval` and `difficulty` commands' own
configs, whose keys the CLI turns into its flags (tests/test_preflight.py triggers them).
"""

from __future__ import annotations

import ast
import dataclasses
import re
import typing
from pathlib import Path

import pytest

from megatron_zero.config.data import PassRateEstimateConfig
from megatron_zero.config.evaluation import EvalConfig
from megatron_zero.config.trainer import TrainConfig

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_zero"
# Any dotted name followed by "=" ("run.num_steps=0"), and any dotted name that starts like a config key
# ("set data.train.filter_overlong", "data.pass_rate_filter band") whether a value follows or not.
CONFIG_HEADS = ("data", "rollout", "actor", "loss", "policy_loss", "sglang", "sampler", "run", "eval", "cluster",
                "parallel", "model", "reward", "advantage", "health", "difficulty", "dynamic_sampling",
                "pass_rate_filter")
KEY = re.compile(r"(?<![\w./-])([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)+(?==)|(?:" + "|".join(CONFIG_HEADS)
                 + r")(?:\.[a-z_][a-z0-9_]*)+)")
RAISING = {"ValueError", "FileNotFoundError", "RuntimeError", "KeyError", "TypeError", "warning", "info", "error"}
# Sub-configs name their fields by their own prefix; load_config (_build) renames it to where they sit.
SUB_CONFIG_PREFIXES = {"policy_loss": "loss", "sglang": "rollout.sglang", "sampler": "data.sampler",
                       "dynamic_sampling": "data.dynamic_sampling", "pass_rate_filter": "data.pass_rate_filter"}
# Configs of the commands other than `train`: the CLI names their fields by its flags (test_cli_names_flags).
COMMAND_CONFIGS = {"difficulty": PassRateEstimateConfig, "eval": EvalConfig}
# Not config keys: internal values a message shows (tensor shapes, the engine's SamplingParams fields).
NOT_CONFIG = {"batch", "sampling", "target_ids", "tokens"}


def _fields(cls: type) -> dict[str, type | None]:
    hints = typing.get_type_hints(cls)
    out = {}
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        sub = hint if dataclasses.is_dataclass(hint) else next(
            (arg for arg in typing.get_args(hint) if dataclasses.is_dataclass(arg)), None)
        out[field.name] = sub
    return out


def resolves(key: str, root: type) -> bool:
    cls: type | None = root
    for part in key.split("."):
        if cls is None or part not in _fields(cls):
            return False
        cls = _fields(cls)[part]
    return True


def named_keys() -> list[tuple[str, str]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            name = getattr(node, "func", None)
            # A config's problems are collected before they are raised together (config/problems.py).
            collected = isinstance(name, ast.Attribute) and name.attr == "append" and \
                getattr(name.value, "id", None) == "problems"
            if not (isinstance(node, ast.Call) and (collected or getattr(name, "id", getattr(name, "attr", None))
                                                    in RAISING)):
                continue
            for sub in ast.walk(node):
                if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                    found += [(match.group(1), f"{path.relative_to(PACKAGE.parent)}:{sub.lineno}")
                              for match in KEY.finditer(sub.value)]
    return found


def _problem(key: str, where: str) -> str | None:
    head = key.split(".")[0]
    if head in NOT_CONFIG or resolves(key, TrainConfig):
        return None
    # TrainConfig's own checks (config/trainer.py) run at the top of load_config: nothing renames their keys.
    in_config = where.startswith("megatron_zero/config/") and not where.startswith("megatron_zero/config/trainer.py")
    if in_config and head in SUB_CONFIG_PREFIXES:
        if resolves(SUB_CONFIG_PREFIXES[head] + key[len(head):], TrainConfig):
            return None
    if head in COMMAND_CONFIGS and resolves(key[len(head) + 1:], COMMAND_CONFIGS[head]):
        return None
    return f"{where}: {key}"


def test_the_scan_finds_keys_and_flags_wrong_ones():
    keys = named_keys()
    assert len(keys) > 100  # the scan reaches the messages (f-strings included)
    assert {key for key, _ in keys} >= {"data.train.max_prompt_tokens", "rollout.max_new_tokens", "run.resume_from"}
    # The keys the issue found in errors: none of them is a field.
    for wrong in ("data.max_prompt_tokens", "data.filter_overlong", "data.answer_field"):
        assert _problem(wrong, "megatron_zero/data/problems.py:1") is not None


def test_every_key_in_errors_and_hints_is_a_real_field():
    problems = sorted({problem for key, where in named_keys() if (problem := _problem(key, where))})
    assert not problems, "messages name keys that are not config fields:\n" + "\n".join(problems)


def test_config_errors_name_the_typed_key_and_come_all_at_once():
    """Item 7: every sub-config's problem in one error, each under the key the user typed."""
    from megatron_zero.preflight.config import load_config

    with pytest.raises(ValueError) as error:
        load_config(None, ["model_path=/m", "loss.clip_low=1.5", "data.train.max_prompt_tokens=0",
                           "data.sampler.batch_size=0", "run.num_steps=0"])
    message = str(error.value)
    assert message.startswith("4 config problems:")
    for key in ("loss.clip_low=1.5", "data.train.max_prompt_tokens=0", "data.sampler.batch_size=0",
                "run.num_steps=0"):
        assert key in message
    assert "policy_loss." not in message
    # One problem reads as before: one line.
    with pytest.raises(ValueError, match=r"^run.num_steps=0 must be >= 1$"):
        load_config(None, ["model_path=/m", "run.num_steps=0"])


def test_several_problems_of_one_sub_config_come_at_once():
    """Item 7 within a sub-config: each config collects its value problems (config/problems.py) before raising, and
    each is renamed to the key the user typed (PolicyLossConfig calls its fields policy_loss.*)."""
    from megatron_zero.preflight.config import load_config

    with pytest.raises(ValueError) as error:
        load_config(None, ["model_path=/m", "loss.clip_low=1.5", "loss.kl_coef=-1", "rollout.top_p=2",
                           "rollout.temperature=-1", "rollout.top_k=0"])
    message = str(error.value)
    assert message.startswith("5 config problems:"), message
    for key in ("loss.clip_low=1.5", "loss.kl_coef=-1.0", "rollout.top_p=2.0", "rollout.temperature=-1.0",
                "rollout.top_k=0"):
        assert f"\n  {key}" in message, (key, message)
    assert "policy_loss." not in message


def test_every_mistyped_override_is_listed_at_once():
    from megatron_zero.preflight.config import load_config

    with pytest.raises(ValueError) as error:
        load_config(None, ["model_path=/m", "run.nsteps=3", "actor.lrr=1", "actor.lr=abc"])
    lines = str(error.value).splitlines()
    assert lines[0] == "3 config problems:"
    assert lines[1] == "  run.nsteps: Key 'nsteps' not in 'RunConfig'. Did you mean: 'num_steps'?"
    assert lines[2].startswith("  actor.lrr: Key 'lrr' not in 'ActorConfig'")
    assert lines[3].startswith("  actor.lr: Value 'abc'")
