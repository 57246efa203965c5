"""Load an experiment config and check it whole: values (config/trainer.py ``parse_config``), then the names its
fields take against the registries (preflight/names.py). Every command that reads a TrainConfig loads it here.

How: ``config = load_config("examples/configs/qwen2.5-7b-zero.yaml", ["run.num_steps=10"])``.
"""

from __future__ import annotations

from typing import Any, Optional

from megatron_zero.config.problems import raise_problems
from megatron_zero.config.trainer import TrainConfig, parse_config
from megatron_zero.preflight.names import name_problems


def load_config(path: Optional[str], overrides: list[str], base: Optional[dict[str, Any]] = None) -> TrainConfig:
    """YAML file (optional) + ``a.b=value`` overrides -> a ``TrainConfig`` whose values and names are valid; errors
    name the key, all of a kind in one block."""
    config = parse_config(path, overrides, base)
    raise_problems(name_problems(config))
    return config
