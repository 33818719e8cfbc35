"""The planner's room: its stages import one way (inputs <- search <- tools), callers
come in through the ``planner`` door, and ``import planner`` stays light."""

from __future__ import annotations

import ast
import importlib
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import planner

ROOT = Path(__file__).resolve().parents[2]
PLANNER = ROOT / "planner"

ALLOWED = {
    "inputs": {"planner.errors", "planner.inputs"},
    "plan_file": {"planner.errors", "planner.inputs"},
    "search": {"planner.errors", "planner.inputs", "planner.plan_file", "planner.search"},
    "tools": {"planner.errors", "planner.inputs", "planner.plan_file", "planner.search",
              "planner.tools"},
    "errors": set(),
}
"""What each part of the planner may import: a stage, or a module at the top."""

FORMER_MODULES = ("_fields", "specs", "cost", "constraints", "options", "aggregate", "placement",
                  "packing", "exact", "balance", "anytime", "solvers", "baselines", "api",
                  "evaluate", "diff", "replan", "capacity", "torchrec", "plan")
"""The flat room's modules, now in the stages (``plan`` is ``plan_file``)."""

RUNTIME_NAMES = (
    "AccessProfile", "AnalyticCostModel", "CostModel", "CostModelError", "DType", "DeviceLoad",
    "DeviceSpec", "GB", "HostSpec", "NetworkSpec", "Optimizer", "Plan", "PlanOptions", "Shard",
    "ShardCost", "ShardOption", "Sharding", "SolveReport", "StopReason", "StoreSpec", "TablePlan",
    "TableSpec", "TablesSpec", "Tier", "Topology", "ZERO_COST", "evaluate_plan", "from_torchrec",
    "load_cost_model", "parse_tables", "parse_topology", "plan", "plan_sha256", "shard_option",
    "to_torchrec", "to_torchrec_sharding_plan", "write_json_atomic", "write_plan",
)
"""Names the runtime, the storage side and their tests and benchmarks take from the planner."""


def _planner_imports(path: Path) -> set[str]:
    """The planner modules ``path`` imports, anywhere in the file (lazy imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found.update(n for n in names if n == "planner" or n.startswith("planner."))
    return found


def _part(path: Path) -> str:
    relative = path.relative_to(PLANNER)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


MODULES = sorted(p for p in PLANNER.rglob("*.py") if p != PLANNER / "__init__.py")
"""Every module of the planner but its door."""


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_stages_import_one_way(path: Path) -> None:
    allowed = ALLOWED[_part(path)]
    for module in _planner_imports(path):
        stage = ".".join(module.split(".")[:2])
        assert stage in allowed, f"{path.relative_to(ROOT)} imports {module}"


def test_no_module_is_left_in_the_flat_room() -> None:
    left = [name for name in FORMER_MODULES if (PLANNER / f"{name}.py").exists()]
    assert not left
    top = sorted(p.name for p in PLANNER.glob("*.py"))
    assert top == ["__init__.py", "errors.py", "plan_file.py"]


@pytest.mark.parametrize("folder", ["cli", "bench", "tests/cli"])
def test_callers_use_the_doors(folder: str) -> None:
    doors = {"planner", "planner.inputs", "planner.search", "planner.tools"}
    for path in sorted((ROOT / folder).glob("*.py")):
        inner = _planner_imports(path) - doors
        assert not inner, f"{path.relative_to(ROOT)} imports {sorted(inner)}"


def test_the_door_exports_what_callers_need() -> None:
    assert not [n for n in planner.__all__ if not hasattr(planner, n)]
    assert len(set(planner.__all__)) == len(planner.__all__)
    assert not [n for n in RUNTIME_NAMES if n not in planner.__all__]
    for name in ("evaluate", "check_capacity", "Progress"):  # one meaning per name
        assert not hasattr(planner, name), name


def test_plan_is_the_function_after_every_module_is_loaded() -> None:
    for info in pkgutil.walk_packages(planner.__path__, "planner."):
        importlib.import_module(info.name)
    from planner import plan
    from planner.search import plan as search_plan

    assert callable(plan) and plan is search_plan and planner.plan is plan
    # at the sub-package door the names stay their modules; the functions are at the top
    assert isinstance(planner.tools.capacity, type(sys))
    assert planner.capacity is planner.tools.capacity.capacity
    assert planner.replan is planner.tools.replan.replan


def test_import_planner_does_not_import_torch() -> None:
    code = ("import sys, planner; assert 'torch' not in sys.modules, 'planner imported torch'; "
            "assert 'torchrec' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
