"""Helpers of the tests that run the real SGLang 0.5.23 server on CPU (rollout/sglang_cpu.py).

The server needs SGLang with its own dependencies (the ``sglang-cpu`` extra; CI's second stack installs it with
the GPU image's pins). Where it is not installed (the quick start's stack: the wheel alone, ``--no-deps``) these
tests skip, except under MEGATRON_ZERO_REQUIRE_REAL_SGLANG=1 (CI's second stack), where they fail: a missing or
broken install must never pass as a skip.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path
from typing import Sequence

import pytest
import requests
import torch

REQUIRE_VARIABLE = "MEGATRON_ZERO_REQUIRE_REAL_SGLANG"
# SGLang's compiled kernels (sglang-kernel) and server (uvicorn) come only with SGLang's dependencies.
_SERVER_DISTRIBUTIONS = ("sglang", "sglang-kernel", "uvicorn", "fastapi")


def real_sglang_missing() -> str | None:
    """Why the real server cannot start here, or None."""
    missing = []
    for name in _SERVER_DISTRIBUTIONS:
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    if missing:
        return (f"the real SGLang server needs SGLang's dependencies, missing here: {missing}; "
                "pip install -e '.[sglang-cpu]'")
    return None


def require_real_sglang() -> None:
    """Skip (or, under MEGATRON_ZERO_REQUIRE_REAL_SGLANG=1, fail) when the real server cannot run here."""
    why = real_sglang_missing()
    if why is None:
        return
    if os.environ.get(REQUIRE_VARIABLE) == "1":
        pytest.fail(f"{REQUIRE_VARIABLE}=1 but {why}")
    pytest.skip(why)


def float64_logprobs(model_dir: str | Path, prompts: Sequence[Sequence[int]],
                     responses: Sequence[Sequence[int]]) -> list[list[float]]:
    """log softmax(logits)[token] of each response token, the HF model in float64: the independent reference."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64)
    result = []
    with torch.no_grad():
        for prompt, response in zip(prompts, responses):
            logits = model(input_ids=torch.tensor([list(prompt) + list(response)])).logits[0]
            logp = torch.log_softmax(logits, dim=-1)
            result.append([logp[len(prompt) - 1 + k, token].item() for k, token in enumerate(response)])
    return result


def float64_greedy(model_dir: str | Path, prompt: Sequence[int], max_new_tokens: int,
                   eos_ids: Sequence[int]) -> list[int]:
    """Greedy decoding without a KV cache, every step recomputed in float64."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64)
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=torch.tensor([tokens])).logits[0, -1].argmax())
            tokens.append(token)
            if token in eos_ids:
                break
    return tokens[len(prompt):]


def weights_checksum(url: str) -> str:
    """SGLang's own checksum of the weights it serves (POST /weights_checker, action "checksum"): a SHA-256 over
    every parameter's hash, in SGLang's fused layout (``per_engine_checksum``, over its TP ranks' ``ranks``)."""
    response = requests.post(f"{url}/weights_checker", json={"action": "checksum"}, timeout=60)
    response.raise_for_status()
    body = response.json()
    assert body["success"], body
    return body["per_engine_checksum"]


def load_weights_from_disk(url: str, model_dir: str | Path) -> None:
    """SGLang's own loader (POST /update_weights_from_disk): the reference a push must equal."""
    response = requests.post(f"{url}/update_weights_from_disk", json={"model_path": str(model_dir)}, timeout=120)
    assert response.status_code == 200, response.text
    assert response.json().get("success", True), response.text


def start_server_by_hand(model_dir: str | Path, log_path: Path, port: int):
    """A real server started outside the trainer, as a user would on a CPU machine: the command and environment of
    ``launch_server_command(..., on_cpu=True)``. Returns the process (its own session: kill its group)."""
    import subprocess

    from megatron_zero.config.sglang import SGLangConfig
    from megatron_zero.rollout.sglang_cpu import build_driver_stub
    from megatron_zero.rollout.sglang_launch import launch_server_command, launch_server_env

    build_driver_stub()
    command = launch_server_command(SGLangConfig(model_path=str(model_dir), port=port, colocated=False), on_cpu=True)
    with open(log_path, "w") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=launch_server_env(os.environ, on_cpu=True), start_new_session=True)


def wait_until_serving(process, url: str, log_path: Path, timeout_s: float = 300.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"{url} not healthy after {timeout_s} s:\n{log_path.read_text()[-3000:]}")
