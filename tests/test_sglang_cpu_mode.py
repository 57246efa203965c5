"""The SGLang CPU mode (megatron_zero/rollout/sglang_cpu.py) is complete on CPU and absent on GPUs.

Why: what lets the real SGLang 0.5.23 server run without a GPU (flags, SGLANG_USE_CPU_ENGINE, the driver stub on
LD_LIBRARY_PATH, the sitecustomize on PYTHONPATH, no --enable-memory-saver) would break or slow a GPU server, so a
GPU launch must carry none of it. The stub and the sitecustomize are checked here on their own; the real server
starting with them is tests/test_sglang_real_server.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

from megatron_zero.config.sglang import DEFAULT_MAX_TOTAL_TOKENS, SGLangConfig
from megatron_zero.rollout import sglang_cpu
from megatron_zero.rollout.sglang_servers import plan_engines, slot_server_launch
from megatron_zero.cluster.placement import Bundle

CONFIG = SGLangConfig(model_path="/m", colocated=True)
CPU_MARKERS = {*sglang_cpu.CPU_SERVER_ARGS, sglang_cpu.CPU_ENGINE_VARIABLE, str(sglang_cpu.FILES_DIR)}


def _launch(gpu_ids, config=CONFIG):
    bundles = [Bundle(index=i, node_id="n", node_ip="10.0.0.1", gpu_id=gpu) for i, gpu in enumerate(gpu_ids)]
    slot = plan_engines(bundles, len(bundles))[0]
    return slot_server_launch(config, slot, "10.0.0.1", 30000, {"PATH": "/bin", "LD_LIBRARY_PATH": "/opt/lib"})


def test_a_gpu_launch_carries_nothing_of_the_cpu_mode():
    command, env = _launch([0, 1])
    text = " ".join(command) + " " + " ".join(f"{key}={value}" for key, value in env.items())
    assert not [marker for marker in CPU_MARKERS if marker in text]
    assert "libcuda-stub" not in text
    assert env == {"PATH": "/bin", "LD_LIBRARY_PATH": "/opt/lib", "CUDA_VISIBLE_DEVICES": "0,1"}
    assert command[command.index("--dtype") + 1] == "bfloat16"
    assert "--enable-memory-saver" in command  # colocated on GPUs: release/resume free memory
    assert "--max-total-tokens" not in command  # sized by mem_fraction_static


def test_a_cpu_launch_carries_all_of_it_and_no_memory_saver():
    command, env = _launch([None])
    assert " ".join(sglang_cpu.CPU_SERVER_ARGS) in " ".join(command)
    assert command[command.index("--dtype") + 1] == "float32"
    assert command[command.index("--max-total-tokens") + 1] == str(DEFAULT_MAX_TOTAL_TOKENS[False])
    assert "--enable-memory-saver" not in command  # torch_memory_saver needs CUDA: the server would not start
    assert env[sglang_cpu.CPU_ENGINE_VARIABLE] == "1"
    assert env["LD_LIBRARY_PATH"] == f"{sglang_cpu.stub_dir()}{os.pathsep}/opt/lib"
    assert env["PYTHONPATH"] == str(sglang_cpu.FILES_DIR)
    assert "CUDA_VISIBLE_DEVICES" not in env
    # A dtype or pool size the user chose is kept.
    import dataclasses
    command, _ = _launch([None], dataclasses.replace(CONFIG, dtype="bfloat16", max_total_tokens=4096))
    assert command[command.index("--dtype") + 1] == "bfloat16"
    assert command[command.index("--max-total-tokens") + 1] == "4096"


def test_driver_stub_builds_once_and_reports_no_device(tmp_path, monkeypatch):
    monkeypatch.setenv(sglang_cpu.CACHE_VARIABLE, str(tmp_path))
    stub = sglang_cpu.build_driver_stub()
    assert stub == sglang_cpu.stub_dir() / "libcuda.so.1" and stub.parent.parent == tmp_path
    built_at = stub.stat().st_mtime_ns
    assert sglang_cpu.build_driver_stub().stat().st_mtime_ns == built_at  # kept, not rebuilt
    # Loaded by its soname, as sgl_kernel's dynamic linker would: every call says "no device".
    probe = ("import ctypes; lib = ctypes.CDLL('libcuda.so.1'); count = ctypes.c_int(7); "
             "print(lib.cuInit(0), lib.cuDeviceGetCount(ctypes.byref(count)), count.value, "
             "lib.cuGetProcAddress_v2(b'cuMemAlloc', None, 0, 0, None))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={**os.environ, "LD_LIBRARY_PATH": str(stub.parent)})
    assert out.stdout.split() == ["100", "100", "0", "500"]


def test_sitecustomize_gives_sglang_the_cpu_device_module_only_in_cpu_mode():
    probe = ("import torch; m = torch.get_device_module(); m.synchronize(); m.empty_cache(); print(m.__name__, "
             "torch.get_device_module('cuda').__name__)")
    env = {**os.environ, "PYTHONPATH": str(sglang_cpu.FILES_DIR)}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={**env, sglang_cpu.CPU_ENGINE_VARIABLE: "1"})
    assert out.stdout.split() == ["torch.cpu", "torch.cuda"]
    # Without the variable nothing is patched: torch's own function.
    plain = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_device_module.__name__)"],
                           capture_output=True, text=True, check=True, env=env)
    assert plain.stdout.strip() == "get_device_module"
