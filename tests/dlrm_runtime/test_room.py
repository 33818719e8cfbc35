"""The runtime's layout: sub-packages behind doors, imports one way, no circle."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import dlrm_runtime

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = ROOT / "dlrm_runtime"
TOP = {"__init__.py", "calibrate.py", "checkpoint.py", "config.py", "errors.py", "files.py",
       "model.py", "prepare.py", "train.py"}
SUBPACKAGES = {"data", "embeddings", "distributed", "measure"}
TABLE_KINDS = ("batched", "sharded", "cached")
"""Modules of dlrm_runtime.embeddings that build tables on the shared base."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in RUNTIME.rglob("*.py")}


def _imports(path: Path, *, top_level_only: bool = True) -> set[str]:
    """Modules (or ``module.name`` for ``from module import name``) that ``path``
    imports, at module level unless ``top_level_only`` is False."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return out


def _edges() -> dict[str, set[str]]:
    """Module-level imports among the runtime's modules; a door's imports of its own
    sub-modules are its re-exports and left out."""
    modules = _modules()
    return {name: {t for t in _imports(path) if t in modules and not t.startswith(name + ".")}
            for name, path in modules.items()}


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in edges:
        if node not in index:
            visit(node)
    return found


def test_the_room_is_sub_packages_with_doors() -> None:
    assert {p.name for p in RUNTIME.glob("*.py")} == TOP
    packages = {p.parent.name for p in RUNTIME.glob("*/__init__.py")}
    assert packages == SUBPACKAGES


def test_no_module_imports_itself_back() -> None:
    assert _cycles(_edges()) == []


def test_no_sub_package_imports_itself_back() -> None:
    def package(module: str) -> str:
        return ".".join(module.split(".")[:2])

    edges: dict[str, set[str]] = {}
    for module, targets in _edges().items():
        for target in targets:
            if package(module) != package(target):
                edges.setdefault(package(module), set()).add(package(target))
    assert _cycles(edges) == []


@pytest.mark.parametrize("kind", TABLE_KINDS)
def test_table_kinds_build_on_the_base_not_on_each_other(kind: str) -> None:
    path = RUNTIME / "embeddings" / f"{kind}.py"
    others = {f"dlrm_runtime.embeddings.{k}" for k in TABLE_KINDS if k != kind}
    assert not _imports(path, top_level_only=False) & (others | {"dlrm_runtime.embeddings"})


@pytest.mark.parametrize("package", ["planner", "storage"])
def test_the_runtime_uses_the_other_packages_doors(package: str) -> None:
    public = set(importlib.import_module(package).__all__)
    for name, path in _modules().items():
        inner = {t for t in _imports(path, top_level_only=False)
                 if t.startswith(package + ".") and t.split(".")[1] not in public}
        assert not inner, f"{name} imports {sorted(inner)}"


def test_the_cli_imports_the_runtime_door_only() -> None:
    for path in sorted((ROOT / "cli").glob("*.py")):
        inner = {t for t in _imports(path, top_level_only=False)
                 if t.startswith("dlrm_runtime.") and t.split(".")[1] not in dlrm_runtime.__all__}
        assert not inner, f"{path.name} imports {sorted(inner)}"


def test_public_names_stay_at_the_door() -> None:
    for name in ("train", "train_distributed", "ModelConfig", "TrainConfig", "prepare_run",
                 "RunSetup", "evaluate", "DLRM", "SyntheticClicks", "embeddings_from_plan"):
        assert name in dlrm_runtime.__all__ and hasattr(dlrm_runtime, name), name
    assert not [n for n in dlrm_runtime.__all__ if not hasattr(dlrm_runtime, n)]
