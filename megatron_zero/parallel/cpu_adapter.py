"""Run real megatron-core code on machines without CUDA (the CPU demo, CI, laptops).

megatron-core assumes a CUDA device in a handful of places that are not about the math:
it allocates with ``device=torch.cuda.current_device()``, keeps per-parallel-group RNG states
through the CUDA generator (``tensor_parallel.random``), and calls ``torch.cuda.synchronize``.
This adapter redirects exactly those assumptions to the CPU so that the same GPTModel, the
same tensor-parallel layers and the same pipeline schedules run over gloo:

* ``torch.cuda.current_device`` returns 0 and a ``TorchFunctionMode`` rewrites every CUDA (or
  bare integer) ``device=`` argument, ``Tensor.cuda()`` and ``Tensor.to("cuda")`` to the CPU;
  ``pin_memory=True`` becomes False (pinning needs an accelerator).
* The CUDA RNG-state helpers use the CPU default generator, which on a CPU-only process is the
  generator that dropout and initialisation draw from. The tracker's fork/restore semantics
  (a separate stream per model-parallel rank) are kept.
* ``torch.cuda.synchronize`` and stream/event helpers become no-ops: CPU ops are synchronous.
* ``Tensor.type()`` (no arguments) reports floating tensors as ``torch.cuda.*Tensor``: gradient
  clipping and the distributed optimizer group parameters by those names and assert on them.

It is switched on only when CUDA is absent (``enable_cpu_adapter`` refuses otherwise), once per
process, by ``megatron_zero.parallel.initialize_parallel``; nothing happens at import time.
The GPU path never touches it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_CPU = torch.device("cpu")
_lock = threading.Lock()
_enabled_mode: "_CudaToCpuMode | None" = None


def _is_cuda_like(device: Any) -> bool:
    # An int device means "CUDA device N" to torch: megatron passes torch.cuda.current_device().
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


_CUDA_TYPE_NAMES = {torch.float32: "torch.cuda.FloatTensor", torch.float16: "torch.cuda.HalfTensor",
                    torch.bfloat16: "torch.cuda.BFloat16Tensor"}


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placement in torch calls to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and args[0].dtype in _CUDA_TYPE_NAMES:
            return _CUDA_TYPE_NAMES[args[0].dtype]
        if "device" in kwargs and _is_cuda_like(kwargs["device"]):
            kwargs["device"] = _CPU
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_like(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


def _cpu_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


class _NullStream:
    """Stands in for torch.cuda.Stream / Event: CPU work is already ordered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, other: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> "_NullStream":
        return self

    def record(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


def _patch_torch_cuda() -> None:
    import torch.cuda
    import torch.cuda.nvtx

    torch.cuda.current_device = lambda: 0
    torch.cuda.synchronize = _noop
    torch.cuda.get_rng_state = _cpu_get_rng_state
    torch.cuda.set_rng_state = _cpu_set_rng_state
    # Seed the CPU generator directly: torch.manual_seed itself calls torch.cuda.manual_seed_all.
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.current_stream = lambda device=None: _NullStream()
    torch.cuda.Stream = _NullStream
    torch.cuda.Event = _NullStream
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    torch.cuda.nvtx.range_push = _noop
    torch.cuda.nvtx.range_pop = _noop


def _patch_megatron_rng() -> None:
    import megatron.core
    from megatron.core.tensor_parallel import random as mcore_random

    # Present in megatron-core 0.16.1 and 0.19.2; a release that renames them would otherwise leave the CUDA RNG
    # calls in place (and these patches unused) without a word.
    for name in ("_get_cuda_rng_state", "_set_cuda_rng_state"):
        if not hasattr(mcore_random, name):
            raise RuntimeError(f"megatron-core {megatron.core.__version__} has no tensor_parallel.random.{name}; the "
                               "CPU adapter (megatron_zero/parallel/cpu_adapter.py) needs updating for this version")
    mcore_random._get_cuda_rng_state = _cpu_get_rng_state
    mcore_random._set_cuda_rng_state = _cpu_set_rng_state


def enable_cpu_adapter() -> None:
    """Switch the adapter on for this process (idempotent). Refuses when CUDA is available."""
    global _enabled_mode
    if torch.cuda.is_available():
        raise RuntimeError(
            "enable_cpu_adapter() is for machines without CUDA; this one has "
            f"{torch.cuda.device_count()} GPU(s), so megatron-core must run on them unmodified"
        )
    with _lock:
        if _enabled_mode is not None:
            return
        _patch_torch_cuda()
        _patch_megatron_rng()
        mode = _CudaToCpuMode()
        # Entered for the rest of the process on this (the main) thread: megatron-core is driven
        # from it, and CPU autograd runs backward on the calling thread.
        mode.__enter__()
        _enabled_mode = mode
        logger.debug("megatron-core CPU adapter enabled")


def cpu_adapter_enabled() -> bool:
    return _enabled_mode is not None
