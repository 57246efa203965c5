"""SGLang's HTTP contract read from the pinned wheel itself, so the fake and the stand-in servers cannot drift.

Why: the servers in tests/ play SGLang 0.5.23 on CPU. Importing ``sglang`` runs its package ``__init__``, which pulls
transformers patches, torchvision, apache-tvm-ffi and CUDA kernels; so this module takes only what needs none of it:
- ``api_types``: ``sglang/api/v1/api_types.py``, the generated JSON schema the server applies to every /generate body
  (``entrypoints/api_contract.py``), loaded from its file under a private name (it needs only msgspec);
- the request classes of ``sglang/srt/managers/io_struct.py`` (msgspec Structs FastAPI parses with
  ``extra_behavior="ignore"``, utils/msgspec_utils.py): their fields and which are required, read from the source's
  syntax tree, not imported (io_struct imports the scheduler);
- the ``launch_server`` flags (``sglang/srt/arg_groups/fields/*.py``) and the memory tags (``srt/constants.py``), the
  same way.

Install (CI does, both stacks): ``pip install --no-deps sglang==0.5.23 msgspec``. Without it, tests that need the
contract skip, naming that line; with MEGATRON_ZERO_REQUIRE_SGLANG_WHEEL=1 they fail instead.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import importlib.util
import os
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

PINNED_VERSION = "0.5.23"
INSTALL = f"pip install --no-deps sglang=={PINNED_VERSION} msgspec"
REQUIRE_ENV = "MEGATRON_ZERO_REQUIRE_SGLANG_WHEEL"


def wheel_dir() -> Optional[Path]:
    """The installed sglang package directory (found, not imported), or None."""
    spec = importlib.util.find_spec("sglang")
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


def missing_reason() -> Optional[str]:
    """Why the contract cannot be read here (None: it can)."""
    if wheel_dir() is None:
        return f"the sglang wheel is not installed; {INSTALL}"
    version = importlib.metadata.version("sglang")
    if version != PINNED_VERSION:
        return f"sglang {version} is installed but the adapter targets {PINNED_VERSION}; {INSTALL}"
    if importlib.util.find_spec("msgspec") is None:
        return f"msgspec (which sglang's api_types needs) is not installed; {INSTALL}"
    return None


def require_wheel() -> None:
    """Skip the calling test without the wheel; fail instead under MEGATRON_ZERO_REQUIRE_SGLANG_WHEEL=1 (CI)."""
    import pytest

    reason = missing_reason()
    if reason is None:
        return
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but {reason}")
    pytest.skip(reason)


_LOAD_LOCK = threading.Lock()


def api_types() -> ModuleType:
    """``sglang/api/v1/api_types.py`` as a module of its own (``GenerateRequest.from_json_value`` etc.). Loaded once,
    under a lock: a second load racing the first would replace the module msgspec resolves annotations in."""
    with _LOAD_LOCK:
        return _load_api_types()


@functools.cache
def _load_api_types() -> ModuleType:
    path = wheel_dir() / "api" / "v1" / "api_types.py"
    spec = importlib.util.spec_from_file_location("_sglang_wheel_api_types", path)
    module = importlib.util.module_from_spec(spec)
    # Registered under its private name: msgspec resolves the Structs' annotations through sys.modules.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@functools.cache
def struct_defaults(struct: type) -> dict[str, Any]:
    """Field name -> default of an api_types Struct (every field of the JSON contract has one)."""
    import msgspec

    return {field.name: (field.default_factory() if field.default is msgspec.NODEFAULT else field.default)
            for field in msgspec.structs.fields(struct)}


@functools.cache
def _classes(relative: str) -> dict[str, ast.ClassDef]:
    tree = ast.parse((wheel_dir() / relative).read_text())
    return {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}


def request_fields(class_name: str, module: str = "srt/managers/io_struct.py") -> tuple[frozenset[str], frozenset[str]]:
    """(required, all) field names of an io_struct request class, its bases' included (BaseReq: rid, ...)."""
    classes = _classes(module)
    required: set[str] = set()
    every: set[str] = set()
    node = classes[class_name]
    while node is not None:
        for statement in node.body:
            if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
                every.add(statement.target.id)
                if statement.value is None:
                    required.add(statement.target.id)
        bases = [base.id for base in node.bases if isinstance(base, ast.Name) and base.id in classes]
        node = classes[bases[0]] if bases else None
    return frozenset(required), frozenset(every)


@functools.cache
def server_flags() -> frozenset[str]:
    """Every ``--flag`` (and alias) ``python -m sglang.launch_server`` accepts: ``--`` + the field name with dashes
    (arg_groups/arg_utils.py), for each field of the config namespaces in arg_groups/fields/."""
    flags: set[str] = set()
    for path in sorted((wheel_dir() / "srt" / "arg_groups" / "fields").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            if node.target.id.startswith("_") or "no_cli=True" in ast.unparse(node.annotation):
                continue
            flags.add("--" + node.target.id.replace("_", "-"))
            for keyword in (k for call in ast.walk(node.annotation) if isinstance(call, ast.Call)
                            for k in call.keywords if k.arg == "aliases"):
                flags |= set(ast.literal_eval(keyword.value))
    return frozenset(flags)


@functools.cache
def memory_tags() -> frozenset[str]:
    """``GPU_MEMORY_ALL_TYPES`` of srt/constants.py."""
    tree = ast.parse((wheel_dir() / "srt" / "constants.py").read_text())
    values = {node.targets[0].id: node.value for node in tree.body
              if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)}
    return frozenset(ast.literal_eval(values[element.id]) for element in values["GPU_MEMORY_ALL_TYPES"].elts)
