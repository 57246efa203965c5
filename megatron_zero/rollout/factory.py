"""Build the rollout engine a config names: the embedded torch engine, a hand-started SGLang server, or SGLang
servers launched on a Ray placement.

Why: the trainer and the standalone commands (``megatron-zero eval`` / ``difficulty``,
megatron_zero/evaluation/engines.py) need the same three engines; the choice is made here, once, and both hold a
``RolloutEngine`` afterwards.

How: ``engine = build_engine("torch", model_path, torch_config, None, cluster, None, tokenizer, log_dir)``; for
launched SGLang servers pass the placement their GPUs are on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from megatron_zero.config.cluster import ClusterConfig
from megatron_zero.config.rollout import TorchEngineConfig
from megatron_zero.config.sglang import SGLangConfig
from megatron_zero.rollout.engine import RolloutEngine


def build_engine(engine: str, model_path: str, torch_config: TorchEngineConfig, sglang: Optional[SGLangConfig],
                 cluster: ClusterConfig, placement: Any, tokenizer: Any, log_dir: Path,
                 server_command: Optional[Sequence[str]] = None, *,
                 quantization: Optional[str] = None) -> RolloutEngine:
    """``server_command``: an argv template started instead of ``python -m sglang.launch_server`` ({host} and
    {port} filled in; rollout/sglang_servers.py), e.g. a CPU stand-in in tests. ``quantization``
    (rollout.quantization) reaches the torch engine; SGLang servers take it from their checkpoint
    (``sglang.model_path``, the trainer's FP8 copy: trainer/setup.py ``rollout_sglang_config``)."""
    if engine == "torch":
        from megatron_zero.rollout.torch_engine import TorchEngine

        return TorchEngine.from_pretrained(model_path, torch_config, tokenizer=tokenizer, quantization=quantization)
    from megatron_zero.rollout.engine_router import EngineRouter
    from megatron_zero.rollout.sglang_servers import launch_sglang_router

    if not sglang.launch:
        from megatron_zero.rollout.sglang_engine import SGLangEngine

        server = SGLangEngine(sglang)  # started by hand at sglang.host:port
        server.wait_until_ready()
        return EngineRouter([server])
    # One server per sglang.tp_size GPUs of the placement, in Ray actors: on the ranks' GPUs (colocated) or on
    # GPUs of their own.
    return launch_sglang_router(cluster, placement, sglang, log_dir, server_command=server_command)
