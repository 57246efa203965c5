"""Prepare a process without CUDA to import megatron-core: quiet its expected warnings, and make the CUDA-only
kernel packages that cannot load here look absent.

Why: megatron-core imports optional kernels inside ``try: ... except ImportError`` (megatron/core/transformer/
attention.py: ``flash_mla``). In an environment with SGLang's dependencies (the GPU image's pins, which CI's
second stack installs) those packages are present but their CUDA library cannot load without a driver, and they
raise OSError ("Could not load this library: flash_mla/cuda.abi3.so"), which megatron-core does not catch: the
actor could not even build its layer specs. Such a package is unusable on this machine, so it is made to raise the
ImportError megatron-core expects (``sys.modules[name] = None``), only after an import really failed with OSError.
On a GPU machine nothing is done.

How: ``prepare_cpu_process()`` first thing in every process entry point that may import megatron-core (the CLI,
Ray rank workers, local workers and their fork server, the conversion tool, the test session).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys

import torch

from megatron_zero.utils.cpu_warnings import silence_cpu_fallback_warnings

logger = logging.getLogger(__name__)

# Optional CUDA kernel packages that megatron-core imports guarded by ImportError only.
CUDA_ONLY_PACKAGES = ("flash_mla",)


def hide_unloadable_cuda_packages() -> list[str]:
    """Mark every package of ``CUDA_ONLY_PACKAGES`` that is installed but fails to load with OSError as absent;
    returns their names."""
    hidden = []
    for name in CUDA_ONLY_PACKAGES:
        if name in sys.modules or importlib.util.find_spec(name) is None:
            continue
        try:
            importlib.import_module(name)
        except OSError as error:
            sys.modules[name] = None  # `import name` now raises ImportError, as for a package not installed
            hidden.append(name)
            logger.debug("%s cannot load without a GPU (%s); megatron-core will see it as not installed", name, error)
    return hidden


def prepare_cpu_process() -> None:
    if torch.cuda.is_available():
        return
    silence_cpu_fallback_warnings()
    hide_unloadable_cuda_packages()
