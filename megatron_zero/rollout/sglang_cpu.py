"""What the real SGLang 0.5.23 server needs to serve on a machine without a GPU, in one place.

Why: SGLang 0.5.23 serves on CPU (measured on our 2-core CI machines: greedy output of the demo model equals HF
transformers, weight updates over gloo work; docs/sglang.md), so the trainer's SGLang paths run against the real
server in CI instead of a stand-in. It takes four things a GPU launch must never carry:
- flags: ``--device cpu --attention-backend torch_native --disable-cuda-graph`` (the only attention backend and
  graph mode with a CPU path) and ``--sleep-on-idle`` (an idle scheduler otherwise spins a whole core);
- ``SGLANG_USE_CPU_ENGINE=1``, without which model init imports vllm's rotary embedding and fails;
- a CUDA driver library that reports no device (``sglang_cpu_files/libcuda_stub.c``, compiled here once per
  machine): SGLang imports sgl_kernel unconditionally and its CUDA build links libcuda.so.1;
- ``sglang_cpu_files/sitecustomize.py`` first on the server's PYTHONPATH: /release_memory_occupation would
  otherwise crash the server (torch's CUDA build answers ``torch.cuda`` for the default device module).
Its defaults differ too (config/sglang.py): float32, and a KV-cache pool of fixed size (SGLang sizes it from the
machine's RAM otherwise). And it must not have ``--enable-memory-saver`` (torch_memory_saver needs CUDA; the server
does not start). Release and resume then free nothing: they only flush the cache (the weights stay), which the tests
say.

The launch path (``rollout/sglang_servers.py``, ``rollout/sglang_launch.launch_server_command``) consults this
module only for an engine whose placement has no GPU; ``tests/test_sglang_cpu_mode.py`` checks that a GPU launch's
command and environment carry none of it.

How::

    command = launch_server_command(config, on_cpu=True)   # adds CPU_SERVER_ARGS, no memory saver
    env = cpu_server_env(os.environ)                         # the variables above
    build_driver_stub()                                      # before the first server starts on this machine
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Mapping

CPU_SERVER_ARGS = ("--device", "cpu", "--attention-backend", "torch_native", "--disable-cuda-graph",
                   "--sleep-on-idle")
CPU_ENGINE_VARIABLE = "SGLANG_USE_CPU_ENGINE"

FILES_DIR = Path(__file__).resolve().with_name("sglang_cpu_files")
STUB_SOURCE = FILES_DIR / "libcuda_stub.c"
STUB_NAME = "libcuda.so.1"
# Where the compiled stub is kept (one folder per version of its source); MEGATRON_ZERO_CACHE overrides.
CACHE_VARIABLE = "MEGATRON_ZERO_CACHE"


def stub_dir() -> Path:
    """The folder holding this version of the driver stub (not necessarily built yet: ``build_driver_stub``)."""
    cache = Path(os.environ.get(CACHE_VARIABLE) or Path.home() / ".cache" / "megatron-zero")
    digest = hashlib.sha256(STUB_SOURCE.read_bytes()).hexdigest()[:16]
    return cache / f"libcuda-stub-{digest}"


def _prepend(path: str, existing: str | None) -> str:
    return path if not existing else f"{path}{os.pathsep}{existing}"


def cpu_server_env(base: Mapping[str, str]) -> dict[str, str]:
    """``base`` plus what the CPU server needs; pure (the stub's path is computed, not built)."""
    env = dict(base)
    env[CPU_ENGINE_VARIABLE] = "1"
    env["LD_LIBRARY_PATH"] = _prepend(str(stub_dir()), env.get("LD_LIBRARY_PATH"))
    env["PYTHONPATH"] = _prepend(str(FILES_DIR), env.get("PYTHONPATH"))
    return env


def build_driver_stub() -> Path:
    """Compile the driver stub into ``stub_dir()`` unless it is there; return its path. Safe when several
    processes race: each compiles into a temporary folder and the first rename wins."""
    target_dir = stub_dir()
    target = target_dir / STUB_NAME
    if target.is_file():
        return target
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError(f"the SGLang server on CPU needs a C compiler to build {STUB_NAME} from {STUB_SOURCE} "
                           "(no cc or gcc on PATH); install one (apt-get install gcc) or set CC")
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target_dir.parent, prefix=".libcuda-stub-",
                                     ignore_cleanup_errors=True) as scratch:  # renamed away on success
        built = Path(scratch) / STUB_NAME
        result = subprocess.run([compiler, "-shared", "-fPIC", "-O1", f"-Wl,-soname,{STUB_NAME}", "-o", str(built),
                                 str(STUB_SOURCE)], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"building {STUB_NAME} for the SGLang CPU server failed ({compiler}, exit "
                               f"{result.returncode}): {result.stderr.strip()[-2000:]}")
        try:
            Path(scratch).rename(target_dir)
        except OSError:
            if not target.is_file():  # not another process's finished stub: a real failure
                raise
    return target
