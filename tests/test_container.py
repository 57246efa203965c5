"""The GPU container's pins: containers/pins.py's rules on small listings and on this Python's real packages,
setup.py's extras against containers/constraints-gpu.txt, and (in CI, MEGATRON_ZERO_CI=1, on Python 3.12)
containers/check.sh, which resolves the constraints against the package index and lints the Dockerfile.

  python -m pytest -q tests/test_container.py
"""

import ast
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PINS_SCRIPT = ROOT / "containers" / "pins.py"
CONSTRAINTS = ROOT / "containers" / "constraints-gpu.txt"
APEX_URL = "git+https://github.com/NVIDIA/apex@6424da3b4faa6c8f062da4a48c424fff3f02d42d"

_spec = importlib.util.spec_from_file_location("container_pins", PINS_SCRIPT)
pins = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pins)


def listing(text: str) -> dict[str, str]:
    return pins.parse_listing(text, "test")


CONSTRAINED = listing(f"sglang==0.5.23\ntorch==2.14.1  # SGLang's pin\nray==2.60.0\napex @ {APEX_URL}\n")
BASE = listing("sglang==0.5.23\ntorch==2.14.1+cu130\nnumpy==2.3.5\n")
IMAGE = listing(f"sglang==0.5.23\ntorch==2.14.1+cu130\nnumpy==2.3.5\nray==2.60.0\napex @ {APEX_URL}\n"
                "megatron-zero==0.1.0\n")


def test_a_consistent_image_has_no_problems():
    assert pins.problems(CONSTRAINED, BASE, IMAGE) == []


def test_rebuilt_torch_of_the_same_version_counts_as_replaced():
    # The pin (2.14.1) matches both builds; what apex and Transformer Engine were compiled against is the +cu130 one.
    rebuilt = {**IMAGE, "torch": "2.14.1+cu128"}
    assert pins.problems(CONSTRAINED, BASE, rebuilt) == [
        "base package replaced: torch 2.14.1+cu130 -> 2.14.1+cu128; pin what the base image has"]


def test_each_rule_names_the_package():
    assert pins.problems(CONSTRAINED, BASE, {**IMAGE, "ray": "2.61.0"}) == [
        "pin not honoured: ray is 2.61.0, the constraints say 2.60.0"]
    assert pins.problems({**CONSTRAINED, "wandb": "0.31.0"}, BASE, IMAGE) == [
        "stale pin: wandb (0.31.0) is not in the installed set; drop it or require it"]
    assert pins.problems(CONSTRAINED, BASE, {**IMAGE, "omegaconf": "2.4.0"}) == [
        "unpinned addition: omegaconf 2.4.0; add `omegaconf==2.4.0` to the constraints"]
    assert pins.problems(CONSTRAINED, BASE, {**IMAGE, "numpy": "2.4.0"}) == [
        "base package replaced: numpy 2.3.5 -> 2.4.0; pin what the base image has"]
    other_apex = {**IMAGE, "apex": "git+https://github.com/NVIDIA/apex@" + "0" * 40}
    assert pins.problems(CONSTRAINED, BASE, other_apex) == [
        f"pin not honoured: apex is {other_apex['apex']}, the constraints say {APEX_URL}"]


def test_a_resolution_skips_git_pins_and_the_base_image_check_skips_missing_pins():
    resolved = {name: value for name, value in IMAGE.items() if name != "apex"}
    assert pins.problems(CONSTRAINED, BASE, resolved) == [
        f"stale pin: apex ({APEX_URL}) is not in the installed set; drop it or require it"]
    assert pins.problems(CONSTRAINED, BASE, resolved, ignore_url_pins=True) == []
    assert pins.problems(CONSTRAINED, BASE, BASE, allow_missing=True) == []
    assert pins.problems(CONSTRAINED, {**BASE, "torch": "2.13.0"}, {**BASE, "torch": "2.13.0"}, allow_missing=True) == [
        "pin not honoured: torch is 2.13.0, the constraints say 2.14.1"]


def test_a_range_is_not_a_pin():
    with pytest.raises(ValueError, match=r"^test:2: 'torch>=2.6' is not an exact pin; write name==version"):
        listing("sglang==0.5.23\ntorch>=2.6\n")


def test_snapshot_and_check_on_this_python(tmp_path):
    snapshot = tmp_path / "installed.txt"
    subprocess.run([sys.executable, PINS_SCRIPT, "snapshot", snapshot], check=True)
    installed = listing(snapshot.read_text())
    torch_version = importlib.metadata.version("torch")  # PyPI's CUDA build: 2.14.1, while torch.__version__ has +cu130
    assert installed["torch"] == torch_version and torch.__version__.startswith(torch_version)
    assert installed["pytest"] == importlib.metadata.version("pytest")

    def check(pinned_torch: str) -> subprocess.CompletedProcess:
        constraints = tmp_path / "constraints.txt"
        constraints.write_text(f"torch=={pinned_torch}\napex @ {APEX_URL}\n")
        return subprocess.run([sys.executable, PINS_SCRIPT, "check", "--constraints", constraints, "--base", snapshot,
                               "--full", snapshot, "--allow-missing"], check=False, capture_output=True, text=True)

    assert check(torch.__version__.split("+")[0]).returncode == 0
    refused = check("1.0.0")
    assert refused.returncode == 1
    assert f"pin not honoured: torch is {torch_version}, the constraints say 1.0.0" in refused.stderr


def _extras() -> dict[str, list[str]]:
    """setup.py's EXTRAS literal strings (starred shared lists left out), read without running setup()."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    extras = next(node.value for node in tree.body if isinstance(node, ast.Assign) and node.targets[0].id == "EXTRAS")
    return {key.value: [item.value for item in value.elts if isinstance(item, ast.Constant)]
            for key, value in zip(extras.keys, extras.values)}


def test_setup_extras_agree_with_the_image_constraints():
    constrained = pins.parse_listing(CONSTRAINTS.read_text(), str(CONSTRAINTS))
    extras = _extras()
    # The gpu extra pins the base image's SGLang; CI's second stack runs the image's torch and megatron-core.
    assert f"sglang=={constrained['sglang']}" in extras["gpu"]
    assert f"torch=={constrained['torch']}" in extras["cpu-py312"]
    assert f"megatron-core=={constrained['megatron-core']}" in extras["cpu-py312"]


def test_check_script_resolves_the_constraints_and_lints_the_dockerfile():
    if os.environ.get("MEGATRON_ZERO_CI") != "1":
        pytest.skip("containers/check.sh queries the package index (~25 s); CI runs it with MEGATRON_ZERO_CI=1")
    if sys.version_info[:2] != (3, 12):
        pytest.skip("the image's Python is 3.12: CI's Python 3.12 stack runs containers/check.sh")
    result = subprocess.run([ROOT / "containers" / "check.sh"], check=False, env={**os.environ, "PYTHON": sys.executable},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
