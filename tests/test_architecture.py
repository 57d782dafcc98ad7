"""The layout's rules, checked: dependencies only point down, no import cycles (also through
imports inside functions), and every project exception derives from PipelineError."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

from pipeline.errors import PipelineError

ROOT = Path(__file__).resolve().parents[1]
# A package may import itself and any package of a lower rank, nothing else.
RANKS = {"pipeline": 0, "extract": 1, "similarity": 1, "train": 2, "aligned": 3, "analyze": 4, "search": 4,
         "study": 5, "demo": 6}
PACKAGES = [p for p in RANKS if (ROOT / p / "__init__.py").exists()]


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Project modules imported anywhere in the file (module level or inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # ``from pkg import sub`` imports pkg.sub (and runs pkg/__init__ first, which is not an
            # edge of this module's); ``from pkg import name`` imports pkg itself
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for t in targets:
            # the longest project module that t names (``from extract import datasets`` -> extract.datasets)
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_the_packages_exist():
    assert {"pipeline", "extract", "train", "analyze"} <= set(PACKAGES)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down(name):
    own = name.split(".")[0]
    upward = sorted(t for t in GRAPH[name]
                    if t.split(".")[0] != own and RANKS[t.split(".")[0]] >= RANKS[own])
    assert not upward, f"{name} imports {upward}: a package may only import packages below it ({RANKS})"


def test_no_import_cycles():
    """Depth-first search for a back edge over every import, function-level ones included (a
    submodule importing a name from its own package's ``__init__`` counts: that is a cycle)."""
    def edges(n):
        return GRAPH[n]

    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for t in sorted(edges(n)):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[n] = 2

    for n in sorted(MODULES):
        if n not in state:
            visit(n)


def test_every_exception_derives_from_pipeline_error():
    offenders = []
    for name in sorted(MODULES):
        module = importlib.import_module(name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if obj.__module__ == name and issubclass(obj, BaseException) and not issubclass(obj, PipelineError):
                offenders.append(f"{name}.{obj.__name__}")
    assert not offenders, f"exceptions not derived from PipelineError: {offenders}"


def test_the_checks_catch_what_they_should(tmp_path):
    """The import parser sees function-level and relative imports."""
    src = tmp_path / "mod.py"
    src.write_text("def f():\n    from analyze import compare\n    import train.fit\nfrom . import api\n")
    assert {"analyze.compare", "train.fit", "train.api"} <= _imports("train.x", src)


def test_no_module_over_500_lines():
    """Files are split by the thing a newcomer looks for before they grow past 500 lines."""
    long = {str(p.relative_to(ROOT)): n for p in MODULES.values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500}
    assert not long, f"split these modules by topic: {long}"
