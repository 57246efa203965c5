"""The engine of a standalone command (``megatron-zero eval``, ``megatron-zero difficulty``), opened and closed.

Why: evaluation and pass-rate estimation sample with the engine the user has: the torch engine in this process on
CPU, SGLang on GPUs. Launched SGLang servers get GPUs of their own on the Ray cluster, placed and started as the
trainer places and starts its disaggregated engines (cluster/placement.py, rollout/factory.py); nothing trains, so
no weights are pushed.

How::

    with standalone_engine(EngineConfig(), "models/base", tokenizer, "outputs/eval/logs") as engine:
        generate = EngineGenerator(engine, tokenizer)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional, Sequence

from megatron_zero.config.evaluation import EngineConfig
from megatron_zero.rollout.engine import RolloutEngine
from megatron_zero.rollout.factory import build_engine


@contextlib.contextmanager
def standalone_engine(config: EngineConfig, model_path: str, tokenizer: Any, log_dir: str | Path, *,
                      server_command: Optional[Sequence[str]] = None) -> Iterator[RolloutEngine]:
    """The engine of ``config`` on ``model_path``; on exit it is shut down and its Ray placement removed.

    ``server_command``: started instead of ``python -m sglang.launch_server`` (a CPU stand-in in tests)."""
    with contextlib.ExitStack() as stack:
        placement = None
        if config.engine == "sglang" and config.sglang.launch:
            from megatron_zero.cluster.placement import connect_ray, create_rollout_placement, remove_placement

            connect_ray(config.cluster)
            placement = create_rollout_placement(config.cluster)
            stack.callback(remove_placement, placement)
        engine = build_engine(config.engine, model_path, config.torch, config.sglang, config.cluster, placement,
                              tokenizer, Path(log_dir), server_command)
        stack.callback(engine.shutdown)
        yield engine
