"""Tests of the package layout (issue #23): no import circles, no module over 450 lines, config/ at the bottom.

Why: a circle makes import order matter (a module half-initialised when its partner reads it) and hides which
layer depends on which; a long module usually does more than one job; STYLE.md rule 18 keeps config/ free of
implementation modules. The checks read the source with ``ast`` and import nothing, so they run in a second.

How: every ``import x`` / ``from x import y`` of every .py under megatron_zero/ is an edge of the module graph,
at any depth (function-local imports too: they still run, and a circle they close still exists), except those
under ``if TYPE_CHECKING:``, which never run. ``from megatron_zero.pkg import mod`` points at the submodule
``mod``, not at the package. Circles are the strongly connected components (Tarjan), each reported as the
chains of modules that close it.

Violations known today, while other work splits modules, are allow-listed below. A new violation fails, and so
does an allow-listed one that no longer occurs, so the lists shrink as the splits land.

    python -m pytest tests/test_layout.py -q
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, Optional

PACKAGE = "megatron_zero"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / PACKAGE
MAX_MODULE_LINES = 450

# Each circle is written as the chain from its alphabetically first module; the last module imports the first.
KNOWN_CIRCLES: set[tuple[str, ...]] = set()

# Paths relative to megatron_zero/.
KNOWN_LONG_MODULES: set[str] = set()

# (config module, module of ours outside config/ that it imports).
KNOWN_CONFIG_IMPORTS: set[tuple[str, str]] = set()


# --- the module graph ---------------------------------------------------------------------------------------


def module_files(package_dir: Path = PACKAGE_DIR) -> dict[str, Path]:
    """Every module of the package by dotted name; a package's ``__init__.py`` is the package itself."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement under `node` that can run: at any depth, but not in the body of ``if TYPE_CHECKING``."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
        return
    if isinstance(node, ast.If) and _is_type_checking(node.test):
        children: list[ast.AST] = list(node.orelse)
    else:
        children = list(ast.iter_child_nodes(node))
    for child in children:
        yield from _runtime_imports(child)


def _known_module(name: str, modules: dict[str, Path]) -> Optional[str]:
    """`name` or its longest prefix that is a module of ours (``import a.b.c`` runs ``a.b.c``); None if not ours."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def imported_modules(module: str, modules: dict[str, Path]) -> set[str]:
    """The modules of ours that `module` imports at run time (itself excluded)."""
    path = modules[module]
    # The package relative imports start from: the module itself for an __init__.py, else its parent.
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets = set()
    for node in _runtime_imports(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            if node.level:  # `from .x import y` is level 1: x in this package; each further dot goes one up
                package_parts = package.split(".")
                base_parts = package_parts[: len(package_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from pkg import mod` imports the submodule `mod`; `from mod import name` imports `mod`.
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        for name in names:
            target = _known_module(name, modules)
            if target is not None and target != module:
                targets.add(target)
    return targets


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {module: imported_modules(module, modules) for module in modules}


# --- circles ------------------------------------------------------------------------------------------------


def strongly_connected_components(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative (no recursion limit on deep import chains)."""
    index: dict[str, int] = {}
    lowlink: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = lowlink[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = lowlink[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph[successor]))))
                    break
                if successor in on_stack:
                    lowlink[node] = min(lowlink[node], index[successor])
            else:  # every successor visited: `node` is done
                work.pop()
                if work:
                    parent = work[-1][0]
                    lowlink[parent] = min(lowlink[parent], lowlink[node])
                if lowlink[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    components.append(component)
    return components


def circles(graph: dict[str, set[str]]) -> set[tuple[str, ...]]:
    """Every elementary circle, as the chain from its alphabetically first module.

    Found inside each strongly connected component of more than one module, from each start module through
    later ones only, so each circle is found once. Components are a few modules, so enumerating is cheap.
    """
    found = set()
    for component in strongly_connected_components(graph):
        if len(component) < 2:
            continue
        for start in sorted(component):
            allowed = {module for module in component if module > start}
            paths = [(start,)]
            while paths:
                path = paths.pop()
                for successor in sorted(graph[path[-1]]):
                    if successor == start:
                        found.add(path)
                    elif successor in allowed and successor not in path:
                        paths.append(path + (successor,))
    return found


def _chain(circle: tuple[str, ...]) -> str:
    return " -> ".join(module.removeprefix(f"{PACKAGE}.") for module in (*circle, circle[0]))


# --- the checks ---------------------------------------------------------------------------------------------


def test_graph_sees_submodules_relative_and_function_local_imports_but_not_type_checking(tmp_path):
    """The graph builder itself, on a made-up package: what counts as an import and where it points."""
    package = tmp_path / PACKAGE
    (package / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "sub/__init__.py": "from . import leaf\n",
        "sub/leaf.py": "X = 1\n",
        "sub/other.py": "from .leaf import X\n",
        "a.py": (
            "from typing import TYPE_CHECKING\n"
            "import json\n"
            "from megatron_zero.sub import leaf, other\n"
            "if TYPE_CHECKING:\n"
            "    from megatron_zero import b\n"
            "else:\n"
            "    import megatron_zero.sub\n"
        ),
        "b.py": "def f():\n    from megatron_zero.a import g\n",
    }
    for name, text in files.items():
        (package / name).write_text(text)
    modules = module_files(package)
    graph = {module: imported_modules(module, modules) for module in modules}
    assert graph["megatron_zero.a"] == {"megatron_zero.sub", "megatron_zero.sub.leaf", "megatron_zero.sub.other"}
    assert graph["megatron_zero.b"] == {"megatron_zero.a"}
    assert graph["megatron_zero.sub"] == {"megatron_zero.sub.leaf"}
    assert graph["megatron_zero.sub.other"] == {"megatron_zero.sub.leaf"}
    cyclic = {"x": {"y"}, "y": {"x", "z"}, "z": {"x"}, "w": {"x"}}
    assert circles(cyclic) == {("x", "y"), ("x", "y", "z")}


def test_no_new_import_circles():
    found = circles(import_graph())
    new = sorted(found - KNOWN_CIRCLES)
    gone = sorted(KNOWN_CIRCLES - found)
    assert not new, "import circles in megatron_zero/ (break them with a TYPE_CHECKING import or by moving the " \
        "shared piece down a layer):\n" + "\n".join(_chain(circle) for circle in new)
    assert not gone, "allow-listed circles no longer occur; remove them from KNOWN_CIRCLES:\n" + "\n".join(
        _chain(circle) for circle in gone
    )


def test_no_new_modules_over_the_line_limit():
    long_modules = {}
    for path in PACKAGE_DIR.rglob("*.py"):
        num_lines = len(path.read_text().splitlines())
        if num_lines > MAX_MODULE_LINES:
            long_modules[path.relative_to(PACKAGE_DIR).as_posix()] = num_lines
    new = sorted(set(long_modules) - KNOWN_LONG_MODULES)
    gone = sorted(KNOWN_LONG_MODULES - set(long_modules))
    assert not new, f"modules over {MAX_MODULE_LINES} lines (split them by job): " + ", ".join(
        f"{name} ({long_modules[name]} lines)" for name in new
    )
    assert not gone, f"allow-listed modules are now at most {MAX_MODULE_LINES} lines or gone; remove them from " \
        f"KNOWN_LONG_MODULES: {', '.join(gone)}"


def test_config_imports_nothing_of_ours_outside_config():
    graph = import_graph()
    config_package = f"{PACKAGE}.config"
    found = {
        (module, target)
        for module, targets in graph.items()
        if module == config_package or module.startswith(f"{config_package}.")
        for target in targets
        if not (target == config_package or target.startswith(f"{config_package}."))
    }
    new = sorted(found - KNOWN_CONFIG_IMPORTS)
    gone = sorted(KNOWN_CONFIG_IMPORTS - found)
    assert not new, "config/ imports implementation modules (move the shared name registry into a small module " \
        "both sides import, STYLE.md rule 18):\n" + "\n".join(f"{module} -> {target}" for module, target in new)
    assert not gone, "allow-listed config imports no longer occur; remove them from KNOWN_CONFIG_IMPORTS:\n" + \
        "\n".join(f"{module} -> {target}" for module, target in gone)


# --- the step loop tests no mode ------------------------------------------------------------------------------

# What a mode is decided by: the layout (colocated or separate engines), the engine kind, on- or off-policy rollout.
MODE_ATTRIBUTES = ("colocate", "rollout.engine", "off_policy_steps", "engine_urls", "server_urls", "pending")


def _dotted(node: ast.AST) -> Optional[str]:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def mode_tests(source: str) -> list[str]:
    """Every condition in ``source`` (if, while, conditional expression, comprehension filter, assert) that reads
    one of MODE_ATTRIBUTES, as "line N: expression"."""
    found = []
    for node in ast.walk(ast.parse(source)):
        conditions = []
        if isinstance(node, (ast.If, ast.While, ast.IfExp, ast.Assert)):
            conditions.append(node.test)
        elif isinstance(node, ast.comprehension):
            conditions.extend(node.ifs)
        for condition in conditions:
            names = {_dotted(sub) for sub in ast.walk(condition)} - {None}
            if any(mode in name for name in names for mode in MODE_ATTRIBUTES):
                found.append(f"line {condition.lineno}: {ast.unparse(condition)}")
    return found


def test_mode_tests_are_found():
    assert mode_tests("if self.config.cluster.colocate:\n    pass\n") == ["line 1: self.config.cluster.colocate"]
    assert mode_tests("x = a if self.pending is None else b\n") == ["line 1: self.pending is None"]
    assert mode_tests("if self.config.loss.kl_coef > 0:\n    pass\n") == []


def test_the_step_loop_tests_no_mode():
    """issue #23: trainer/loop.py reads like the algorithm; colocated vs separate engines, the engine kind and on- vs
    off-policy rollout are strategies chosen once at setup (trainer/engine_layout.py, trainer/rollout_source.py)."""
    found = mode_tests((PACKAGE_DIR / "trainer" / "loop.py").read_text())
    assert not found, "trainer/loop.py tests a mode; move the choice into a strategy chosen at setup:\n" + \
        "\n".join(found)
