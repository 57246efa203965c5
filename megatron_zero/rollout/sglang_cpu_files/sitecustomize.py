"""Loaded by every Python process of an SGLang server that megatron-zero launches on a machine without a GPU
(megatron_zero/rollout/sglang_cpu.py puts this folder first on the server's PYTHONPATH); inert anywhere else.

Why: SGLang 0.5.23's /release_memory_occupation and /resume_memory_occupation call
``torch.get_device_module().synchronize()`` / ``.empty_cache()``. On torch's CUDA build (SGLang's pin, 2.14.1),
``torch.get_device_module()`` with no argument answers ``torch.cuda`` even when no GPU is present, and its
``synchronize`` raises "Found no NVIDIA driver", which kills the scheduler and the server with it. Without a GPU,
the device module SGLang means is ``torch.cpu``, which lacks ``empty_cache`` (CPU memory has no cache to empty).
"""

import os

if os.environ.get("SGLANG_USE_CPU_ENGINE") == "1":
    import torch

    if not torch.cuda.is_available():
        _get_device_module = torch.get_device_module

        def _cpu_device_module(device=None):
            return torch.cpu if device is None else _get_device_module(device)

        torch.get_device_module = _cpu_device_module
        if not hasattr(torch.cpu, "empty_cache"):
            torch.cpu.empty_cache = lambda: None
