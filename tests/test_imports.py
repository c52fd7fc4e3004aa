"""Import structure of the packages: no import cycles, and every module imports on its own.

(a) The static import graph of every module, built with ``ast`` from the import statements at
    module level and inside functions (``if TYPE_CHECKING:`` blocks excluded), must be acyclic:
    no module may import one that imports it back, directly or through others, eagerly or lazily.
    Edges: ``import a.b`` -> ``a.b``; ``from a import b`` -> ``a.b`` when that is a module, else
    ``a`` (b is a name defined in a). A parent package's ``__init__``, which Python runs first, is
    not an edge (every ``from pkg.sub import x`` would otherwise close a loop through pkg), nor
    are ``importlib.import_module`` calls or imports of modules outside the package.
(b) Every module imports with none of the project's modules loaded before it (a child forked
    from an interpreter that imported only numpy and torch, one per module), so none depends on
    another having been imported first.

The packages are read where this interpreter imports them from (the editable source tree or the
installed copy).
"""

from __future__ import annotations

import ast
import graphlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGES = ["moe_kernels", "moe_testbed"]
EXTENSION_SUFFIXES = (".so", ".pyd")


def package_modules(package: str) -> dict[str, Path]:
    """Module name -> source file of every module of ``package`` (packages by their __init__)."""
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.submodule_search_locations, f"{package} is not a package"
    root = Path(next(iter(spec.submodule_search_locations)))
    modules = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        parts = [package, *rel.parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_extension(name: str, modules: dict[str, Path]) -> bool:
    """Whether ``name`` is a compiled module next to the sources (``moe_kernels._C``)."""
    parent, _, leaf = name.rpartition(".")
    if parent not in modules or modules[parent].name != "__init__.py":
        return False
    return any(
        p.name.startswith(leaf + ".") and p.suffix in EXTENSION_SUFFIXES
        for p in modules[parent].parent.iterdir()
    )


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST):
    """Every Import / ImportFrom node, at any depth, outside ``if TYPE_CHECKING:`` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def import_graph(modules: dict[str, Path]) -> dict[str, dict[str, int]]:
    """module -> {imported module of the same set: line of the first such import}."""
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges: dict[str, int] = {}
        for node in _import_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    here = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = here[: len(here) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = []
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in modules:
                        targets.append(sub)
                    elif not _is_extension(sub, modules):
                        targets.append(base)
            for target in targets:
                if target in modules and target != name:
                    edges.setdefault(target, node.lineno)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import cycle (first module repeated at the end), or None."""
    try:
        tuple(graphlib.TopologicalSorter({m: set(e) for m, e in graph.items()}).static_order())
    except graphlib.CycleError as exc:
        return list(reversed(exc.args[1]))
    return None


def describe_cycle(cycle: list[str], graph, modules) -> str:
    steps = [
        f"  {a} ({modules[a].name}:{graph[a][b]}) imports {b}"
        for a, b in zip(cycle, cycle[1:], strict=False)
    ]
    return "import cycle " + " -> ".join(cycle) + ":\n" + "\n".join(steps)


@pytest.mark.parametrize("package", PACKAGES)
def test_static_import_graph_is_acyclic(package):
    modules = package_modules(package)
    graph = import_graph(modules)
    assert sum(map(len, graph.values())), "no import edges found: the scan is broken"
    cycle = find_cycle(graph)
    if cycle:
        print(describe_cycle(cycle, graph, modules))
    assert cycle is None, describe_cycle(cycle, graph, modules)


def test_the_graph_sees_function_level_imports_and_skips_type_checking(tmp_path):
    (tmp_path / "pkg").mkdir()
    files = {
        "__init__.py": "",
        "a.py": "def f():\n    from pkg import b\n",
        "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import c\n"
        "from . import a\n",
        "c.py": "import pkg.b\n",
    }
    for file, text in files.items():
        (tmp_path / "pkg" / file).write_text(text)
    modules = {("pkg." + f[:-3]).removesuffix(".__init__"): tmp_path / "pkg" / f for f in files}
    graph = import_graph(modules)
    assert graph == {"pkg": {}, "pkg.a": {"pkg.b": 2}, "pkg.b": {"pkg.a": 4}, "pkg.c": {"pkg.b": 1}}
    cycle = find_cycle(graph)
    assert cycle is not None and set(cycle) == {"pkg.a", "pkg.b"} and cycle[0] == cycle[-1]


# Imports every module named in argv[1] (JSON) in a child forked from an interpreter that has
# imported only the heavy third-party packages: each child starts with none of the project's
# modules loaded, like a fresh interpreter, without paying torch's import time again.
_FORK_EACH = r"""
import json, os, sys, traceback
import numpy, torch  # noqa: F401  (third-party only: the children share them)
result = {}
for module in json.loads(sys.argv[1]):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            __import__(module)
            code, message = 0, b""
        except BaseException:
            code, message = 1, traceback.format_exc()[-2000:].encode()
        os.write(write, message)
        os._exit(code)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 65536):
        chunks.append(chunk)
    os.close(read)
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    result[module] = None if status == 0 else (b"".join(chunks).decode() or f"exit {status}")
print(json.dumps(result))
"""


def _import_each_alone(modules: list[str], cwd: Path) -> dict[str, str | None]:
    """module -> None when it imports with none of the project's modules loaded before it, else
    the end of its traceback (one forked child per module; a fresh interpreter per module where
    the platform cannot fork)."""
    if hasattr(os, "fork"):
        done = subprocess.run(
            [sys.executable, "-c", _FORK_EACH, json.dumps(modules)],
            capture_output=True,
            text=True,
            cwd=cwd,  # not the source root, so the packages come from where this process has them
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])
    errors = {}
    for module in modules:
        done = subprocess.run(
            [sys.executable, "-c", f"import {module}"], capture_output=True, text=True, cwd=cwd
        )
        errors[module] = None if done.returncode == 0 else done.stderr.strip()[-2000:]
    return errors


@pytest.mark.parametrize("package", PACKAGES)
def test_every_module_imports_in_a_fresh_interpreter(package, tmp_path):
    errors = _import_each_alone(sorted(package_modules(package)), tmp_path)
    failed = {m: e for m, e in errors.items() if e}
    assert not failed, "\n\n".join(f"import {m} failed:\n{e}" for m, e in failed.items())


def test_a_module_that_needs_another_first_is_caught(tmp_path):
    # pkg.b works only after pkg.a has run: imported alone it must fail.
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("import builtins\nbuiltins.READY = True\n")
    (tmp_path / "pkg" / "b.py").write_text("import builtins\nassert builtins.READY\n")
    errors = _import_each_alone(["pkg.a", "pkg.b"], tmp_path)
    assert errors["pkg.a"] is None
    assert errors["pkg.b"] is not None and "READY" in errors["pkg.b"]
