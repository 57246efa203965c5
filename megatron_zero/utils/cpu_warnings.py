"""Silence the warnings megatron-core and torch print on every CPU run, where they say nothing new.

Without CUDA, megatron-core warns on import that Transformer Engine and Apex are missing (they are
GPU-only extras) and torch's checkpoint code warns about its own deprecations that megatron-core
still calls. On a GPU machine nothing is filtered: a missing Transformer Engine there matters.
"""

import warnings

import torch

_CPU_EXPECTED = (
    "Transformer Engine and Apex are not installed",
    "Apex is not installed",
    "Please use DTensor instead and we are deprecating ShardedTensor",
    "`load_state_dict` is deprecated and will be removed",
    "`save_state_dict` is deprecated and will be removed",
    "recommended to set the environment variable CUDA_DEVICE_MAX_CONNECTIONS",
    "full scope is deprecated. Use empty cuda_graph_",  # _scope (0.16), _modules (0.19)
    "MimoModelConfig is experimental",
    "The argument order of load has been changed",
    # torch deprecations of collectives megatron-core 0.16.1 still calls.
    "`torch.distributed.reduce_scatter_tensor` is deprecated",
    "`torch.distributed.all_gather_into_tensor` is deprecated",
    # megatron-core's DDP reads .grad of its parameter views; the CPU adapter's function mode makes torch
    # see that access (on GPU the same code runs without the mode and without the warning).
    "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed",
    # Our layer-by-layer checkpoint reader loads in one process on purpose.
    "torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to load in a single",
)


def silence_cpu_fallback_warnings() -> None:
    if torch.cuda.is_available():
        return
    for message in _CPU_EXPECTED:
        warnings.filterwarnings("ignore", message=f".*{message}.*")
