"""One entry point that starts torch.distributed and megatron-core's parallel state anywhere.

Rank, world size and rendezvous address come from the environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) as torchrun sets them, or as our Ray workers set
them before calling in. NCCL is used when CUDA is present; otherwise gloo, with the CPU adapter
switched on so that unmodified megatron-core runs (see ``cpu_adapter``).

    from megatron_zero.config.parallel import ParallelConfig
    from megatron_zero.parallel import initialize_parallel
    initialize_parallel(ParallelConfig(tensor_parallel_size=2))
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_zero.config.parallel import ParallelConfig
from megatron_zero.parallel.cpu_adapter import enable_cpu_adapter

logger = logging.getLogger(__name__)

_REQUIRED_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistributedEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    @classmethod
    def from_environ(cls) -> "DistributedEnv":
        missing = [name for name in _REQUIRED_ENV if name not in os.environ]
        if missing:
            raise RuntimeError(
                f"distributed launch variables {missing} are not set; start the job with torchrun or "
                "through megatron-zero's Ray launcher, which set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT"
            )
        return cls(
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            master_addr=os.environ["MASTER_ADDR"],
            master_port=int(os.environ["MASTER_PORT"]),
        )


def initialize_parallel(config: ParallelConfig, env: DistributedEnv | None = None) -> DistributedEnv:
    """Start the process group and megatron-core's model-parallel groups and RNG streams."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    env = env or DistributedEnv.from_environ()
    config.check_world_size(env.world_size)
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(env.local_rank)
    else:
        enable_cpu_adapter()

    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(seconds=config.timeout_s),
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=config.tensor_parallel_size,
            pipeline_model_parallel_size=config.pipeline_parallel_size,
            context_parallel_size=config.context_parallel_size,
            expert_model_parallel_size=config.expert_parallel_size,
            distributed_timeout_minutes=max(1, int(config.timeout_s // 60)),
        )
    model_parallel_cuda_manual_seed(config.seed)
    logger.info(
        "rank %d/%d: tp=%d pp=%d cp=%d dp=%d backend=%s",
        env.rank, env.world_size, config.tensor_parallel_size, config.pipeline_parallel_size,
        config.context_parallel_size, config.data_parallel_size(env.world_size), dist.get_backend(),
    )
    return env


def compute_device() -> torch.device:
    """Where this rank's model and its inputs live: its GPU, or the CPU (gloo, CPU adapter)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def destroy_parallel() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
