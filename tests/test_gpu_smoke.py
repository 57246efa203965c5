"""The GPU smoke run on this CPU machine: the script refuses at once, and its device checks run on the CPU.

tools/gpu_smoke.sh must stop within seconds with one line when there is no CUDA (a lent slot is short; a
misrouted run must not spend it). Its checks are plain functions: the actor-vs-HF comparison runs here at float32
on the tiny model, the IPC hand-off through shared memory by the same torch reductions CUDA IPC uses.

    python -m pytest tests/test_gpu_smoke.py -q
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_zero.benchmark.device_checks import (
    compare_actor_with_hf,
    comparison_batch,
    flatten_bucket,
    hf_logprobs,
    ipc_handoff,
    unflatten_bucket,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", [["tools/gpu_smoke.sh"], [sys.executable, "tools/gpu_smoke.py"]])
def test_smoke_refuses_without_cuda_at_once(command, tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="", OUT=str(tmp_path))
    start = time.monotonic()
    process = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert process.returncode == 2, process.stderr
    assert time.monotonic() - start < 30
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_smoke: no CUDA device visible to torch")
    assert not list(tmp_path.iterdir())  # nothing started, nothing written


def test_actor_matches_hf_on_cpu_and_a_wrong_model_would_not(tiny_qwen2, tmp_path):
    from megatron_zero.models.tiny import save_tiny_model

    hf_dir, mcore_dir = tiny_qwen2
    result = compare_actor_with_hf(hf_dir, mcore_dir, "float32", num_rows=3, seq_length=24)
    assert result["ok"] and result["device"] == "cpu" and result["params_dtype"] == "float32"
    assert result["gap_max"] < 1e-4  # float32 on both sides: summation order only (tests/test_actor.py)
    assert result["num_response_tokens"] > 0 and result["qkv_layer"] == "ColumnParallelLinear"
    # The same comparison against another model of the same shape fails its bound by far.
    other = save_tiny_model("qwen2", tmp_path / "other", seed=1)
    batch = comparison_batch(251, 3, 24)
    gap = (hf_logprobs(other, batch, torch.device("cpu")) - hf_logprobs(hf_dir, batch, torch.device("cpu"))).abs()
    assert float(gap[batch.response_mask].mean()) > 100 * result["bound_mean"]


def test_flattened_bucket_round_trip():
    named = [("a", torch.randn(3, 5).bfloat16()), ("b", torch.arange(6, dtype=torch.int64)), ("c", torch.randn(7))]
    buffer, metadata = flatten_bucket(named)
    # 30 bytes of a, padded to 32 so that b's int64 view starts aligned, 48 of b, 28 of c.
    assert buffer.dtype == torch.uint8 and buffer.numel() == 32 + 48 + 28
    assert [m["start"] for m in metadata] == [0, 32, 80]
    for (name, tensor), (name_back, back) in zip(named, unflatten_bucket(buffer, metadata)):
        assert name == name_back and back.dtype == tensor.dtype and torch.equal(back, tensor)


def test_ipc_handoff_through_shared_memory_on_cpu():
    result = ipc_handoff(torch.device("cpu"), num_bytes=4 * 2**20)
    assert result["checksums_equal"] and result["consumer_exit_code"] == 0
    assert result["consumer_device"] == "cpu" and result["num_bytes"] >= 4 * 2**20 * 3 // 4
    # A handle crossed the pipe, not the tensor bytes.
    assert result["payload_bytes"] < result["num_bytes"] / 1000
