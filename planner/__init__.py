"""Sharding planner: table specs, topology, the public cost model, the ILP and the plan file.

Typical use::

    from planner import load_tables, load_topology, plan, write_plan
    p = plan(load_tables("tables.json"), load_topology("topology.json"))
    write_plan(p, "plan.json")
"""

from planner.api import PlanOptions, plan
from planner.capacity import CapacityResult, TargetUnreachableError, capacity
from planner.cost import (
    AnalyticCostModel,
    CostModel,
    CostModelError,
    ShardCost,
    ShardOption,
    Sharding,
    Tier,
    check_cost_model,
    load_cost_model,
)
from planner.diff import PlanDiff, diff_plans
from planner.errors import (
    CapacityError,
    InfeasibleError,
    PlanFileError,
    PlannerError,
    Resource,
    SolverError,
    SpecError,
)
from planner.plan import (
    Plan,
    Shard,
    TablePlan,
    plan_from_json,
    plan_sha256,
    plan_to_json,
    read_plan,
    write_plan,
)
from planner.replan import ReplanResult, replan
from planner.specs import (
    AccessProfile,
    DType,
    Optimizer,
    TablesSpec,
    TableSpec,
    Topology,
    load_tables,
    load_topology,
    parse_tables,
    parse_topology,
)
from planner.torchrec import from_torchrec, to_torchrec, to_torchrec_sharding_plan

__all__ = [
    "AccessProfile", "AnalyticCostModel", "CapacityError", "CostModel", "CostModelError", "DType", "InfeasibleError", "Optimizer",
    "Plan", "PlanFileError", "PlanOptions", "PlannerError", "Resource", "Shard", "ShardCost",
    "ShardOption", "Sharding", "SolverError", "SpecError", "TablePlan", "TableSpec", "TablesSpec",
    "check_cost_model", "load_cost_model",
    "Tier", "Topology", "load_tables", "load_topology", "parse_tables", "parse_topology", "plan",
    "plan_from_json", "plan_sha256", "plan_to_json", "read_plan", "write_plan",
    "CapacityResult", "PlanDiff", "ReplanResult", "TargetUnreachableError", "capacity",
    "diff_plans", "replan", "from_torchrec", "to_torchrec", "to_torchrec_sharding_plan",
]
