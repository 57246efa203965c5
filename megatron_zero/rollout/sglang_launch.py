"""The command line and environment of one ``sglang.launch_server`` process (flags of sglang 0.5.23,
sglang/srt/arg_groups/fields/), for a GPU or, ``on_cpu``, a machine without one (rollout/sglang_cpu.py).

Pure: no network, no process started; rollout/sglang_servers.py starts servers with them and ``megatron-zero train
--dry-run`` prints them.
"""

from __future__ import annotations

import sys
from typing import Mapping

from megatron_zero.config.sglang import SGLangConfig
from megatron_zero.rollout.sglang_cpu import CPU_SERVER_ARGS, cpu_server_env


def launch_server_command(config: SGLangConfig, *, on_cpu: bool = False) -> list[str]:
    """The ``python -m sglang.launch_server`` command line for one engine (flags of sglang 0.5.23,
    sglang/srt/arg_groups/fields/). ``on_cpu``: a server on a machine without a GPU (``rollout/sglang_cpu.py``)."""
    command = [
        sys.executable, "-m", "sglang.launch_server",
        "--model-path", config.model_path,
        "--host", config.host,
        "--port", str(config.port),
        "--tp-size", str(config.tp_size),
        "--base-gpu-id", str(config.base_gpu_id),
        "--mem-fraction-static", str(config.mem_fraction_static),
        "--dtype", config.served_dtype(on_gpus=not on_cpu),
    ]
    max_total_tokens = config.served_max_total_tokens(on_gpus=not on_cpu)
    if max_total_tokens is not None:
        command += ["--max-total-tokens", str(max_total_tokens)]
    if on_cpu:
        command += CPU_SERVER_ARGS
    elif config.colocated:
        # /release_memory_occupation and /resume_memory_occupation need torch_memory_saver's allocator (CUDA only:
        # on CPU they flush the cache and keep the weights). No --enable-weights-cpu-backup: released weights are
        # discarded, and every resume is followed by a sync.
        command.append("--enable-memory-saver")
    if config.disable_radix_cache:
        command.append("--disable-radix-cache")
    if config.enable_deterministic_inference:
        command.append("--enable-deterministic-inference")
    if config.random_seed is not None:
        command += ["--random-seed", str(config.random_seed)]
    if config.context_length is not None:
        command += ["--context-length", str(config.context_length)]
    if config.trust_remote_code:
        command.append("--trust-remote-code")
    return command + list(config.extra_server_args)


def launch_server_env(base: Mapping[str, str], *, on_cpu: bool = False) -> dict[str, str]:
    """The environment for the server: ``base`` without SGLANG_RETURN_ORIGINAL_LOGPROB, which would make the
    returned log-probs ignore the temperature and break the contract; on CPU with what ``rollout/sglang_cpu.py``
    adds."""
    env = {key: value for key, value in base.items() if key != "SGLANG_RETURN_ORIGINAL_LOGPROB"}
    return cpu_server_env(env) if on_cpu else env
