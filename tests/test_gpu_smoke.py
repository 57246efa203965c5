"""The GPU smoke run on this CPU machine: the script refuses at once, and its device checks run on the CPU.

tools/gpu_smoke.sh must stop within seconds with one line when there is no CUDA (a lent slot is short; a
misrouted run must not spend it). Its checks are plain functions: the actor-vs-HF comparison runs here at float32
on the tiny model, the IPC hand-off through shared memory by the same torch reductions CUDA IPC uses. The GPU
machine has no network: the wheels its pins name (with their dependencies, less the image's torch) must cover
every package the smoke's code imports.

    python -m pytest tests/test_gpu_smoke.py -q
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
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


# --- the wheels fetched for the GPU machine -------------------------------------------------------------------

# Packages imported somewhere in the modules the smoke reaches that its parts never run, and why; each may only be
# imported inside a function, so that importing those modules does not need it.
NOT_RUN_IMPORTS = {
    "transformer_engine": "models/common/spec.py probes for it; the smoke's image has none, so the local layers run",
    "datasets": "data/problems.py reads dataset directories; the smoke reads no data files",
    "pyarrow": "data/splits.py reads Parquet files; the smoke reads no data files",
    "omegaconf": "config/trainer.py parse_config reads YAML configs; the smoke builds its configs in code",
}


def _smoke_imports() -> dict[str, list[tuple[str, bool]]]:
    """Top-level name of every import outside the repository and the standard library in the modules
    tools/gpu_smoke.py reaches (following every import of ours, at module level or inside functions), each with
    (file, whether it sits inside a function)."""
    def local_file(name: str):
        path = ROOT.joinpath(*name.split("."))
        for candidate in (path.with_suffix(".py"), path / "__init__.py", ROOT / "tools" / f"{name}.py"):
            if candidate.is_file():
                return candidate
        return None

    found: dict[str, list[tuple[str, bool]]] = {}
    seen, todo = set(), [ROOT / "tools" / "gpu_smoke.py"]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)

        def visit(node, in_function: bool) -> None:
            in_function = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            for name in names:
                parts = name.split(".")
                ours = [local_file(".".join(parts[:i])) for i in range(1, len(parts) + 1)]
                todo.extend(file for file in ours if file is not None)
                if ours[0] is None and parts[0] not in sys.stdlib_module_names and parts[0] != "__future__":
                    found.setdefault(parts[0], []).append((str(path.relative_to(ROOT)), in_function))
            for child in ast.iter_child_nodes(node):
                visit(child, in_function)

        visit(ast.parse(path.read_text()), False)
    return found


def _requirement_closure(names: set[str]) -> set[str]:
    """``names`` and what they require, transitively, by the installed packages' metadata (requirements under an
    ``extra`` marker left out); normalized names."""
    closure, todo = set(), list(names)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in closure:
            continue
        closure.add(name)
        try:
            requirements = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        todo += [re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group() for requirement in requirements
                 if "extra ==" not in requirement]
    return closure


def test_fetched_wheels_cover_every_import_the_smoke_runs():
    """Every package the smoke's code imports is the image's (torch and what it requires), a pin of
    tools/gpu_smoke.sh, or a dependency of a pin (fetch-wheels resolves those); requirements are read from this
    machine's installed versions of the same packages."""
    script = (ROOT / "tools" / "gpu_smoke.sh").read_text()
    pins = {re.sub(r"[-_.]+", "-", pin.split("==")[0]).lower()
            for pin in re.search(r"^PINS=\(([^)]*)\)", script, re.MULTILINE).group(1).split()}
    imports = _smoke_imports()
    for name, why in NOT_RUN_IMPORTS.items():
        assert name in imports, f"{name} is no longer imported; drop it from NOT_RUN_IMPORTS"
        assert all(lazy for _, lazy in imports[name]), f"{name} is imported at module level ({why}): fetch it"
    distributions = importlib.metadata.packages_distributions()
    unknown = sorted(set(imports) - set(NOT_RUN_IMPORTS) - set(distributions))
    assert not unknown, f"imported by the smoke, installed nowhere here: {unknown} ({imports[unknown[0]]})"
    imported = {re.sub(r"[-_.]+", "-", distribution).lower()
                for name in set(imports) - set(NOT_RUN_IMPORTS) for distribution in distributions[name]}
    covered = _requirement_closure({"torch"}) | _requirement_closure(pins)
    assert {"transformers", "safetensors", "megatron-core"} <= imported  # the walk finds what the parts use
    assert imported <= covered, f"imported by the smoke, but not fetched: {sorted(imported - covered)}"


def test_wheels_to_fetch_leaves_out_torch_and_what_it_requires():
    from gpu_smoke import wheels_to_fetch

    def item(name, version, *requires):
        return {"metadata": {"name": name, "version": version, "requires_dist": list(requires)}}

    report = {"install": [
        item("torch", "2.14.1", "filelock", "sympy>=1.13.3", 'nvidia-nccl-cu13==2.28; platform_system == "Linux"',
             'opt-einsum>=3.3; extra == "opt-einsum"'),
        item("sympy", "1.14.0", "mpmath<1.4,>=1.1.0"), item("mpmath", "1.3.0"), item("filelock", "4.3.2"),
        item("nvidia-nccl-cu13", "2.28"), item("opt_einsum", "3.4.0"),
        item("transformers", "5.19.0", "huggingface-hub<3.0,>=1.31.0", "numpy>=1.17"),
        item("huggingface_hub", "2.4.0", "filelock>=3.10.0", 'hf-xet<2; platform_machine == "x86_64"'),
        item("hf-xet", "1.8.0"), item("numpy", "2.5.5"), item("megatron-core", "0.19.2", "torch>=2.6.0", "numpy"),
    ]}
    # opt_einsum is only an extra of torch: whoever pulled it in here needs it fetched.
    assert wheels_to_fetch(report) == ["hf-xet==1.8.0", "huggingface_hub==2.4.0", "megatron-core==0.19.2",
                                       "numpy==2.5.5", "opt_einsum==3.4.0", "transformers==5.19.0"]


def test_smoke_says_what_it_does_not_cover():
    """The run prints DOES_NOT_COVER and writes it into the JSON; the script's header names the same gaps."""
    from gpu_smoke import DOES_NOT_COVER

    header = (ROOT / "tools" / "gpu_smoke.sh").read_text().split("set -euo pipefail")[0]
    for gap in ("SGLang", "Transformer Engine", "FP8", "THD", "NCCL", "TP/PP/DP"):
        assert gap in header and any(gap.split("/")[0] in line for line in DOES_NOT_COVER), gap
