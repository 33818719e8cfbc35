"""Sharding planner: table specs, topology, the public cost model, the ILP and the plan file.

Typical use::

    from planner import load_tables, load_topology, plan, write_plan
    p = plan(load_tables("tables.json"), load_topology("topology.json"))
    write_plan(p, "plan.json")

The room, in the order a plan is made: ``planner.inputs`` (specs, constraints, the
cost model), ``planner.search`` (options, the ILPs, placement, :func:`plan`), the
plan file (``planner.plan_file``) and ``planner.tools`` (evaluate, diff, replan,
capacity, TorchRec). ``planner.errors`` holds the errors every stage raises. Callers
import from this door; ``planner.plan`` is the function :func:`plan`.
"""

from planner.errors import (
    CapacityError,
    InfeasibleError,
    PlanFileError,
    PlannerError,
    Resource,
    SolverError,
    SpecError,
)
from planner.inputs import (
    GB,
    NO_CONSTRAINTS,
    ZERO_COST,
    AccessProfile,
    AnalyticCostModel,
    Constraints,
    CostModel,
    CostModelError,
    DeviceSpec,
    DType,
    HostSpec,
    NetworkSpec,
    Optimizer,
    ShardCost,
    ShardOption,
    Sharding,
    StoreSpec,
    TablesSpec,
    TableSpec,
    Tier,
    Topology,
    TorchRecCostModel,
    check_cost_model,
    collective_latency_ms,
    link_ms,
    load_constraints,
    load_cost_model,
    load_tables,
    load_topology,
    parse_constraints,
    parse_tables,
    parse_topology,
)
from planner.plan_file import (
    DeviceLoad,
    Plan,
    Shard,
    SolveReport,
    StopReason,
    TablePlan,
    plan_from_json,
    plan_sha256,
    plan_to_json,
    read_plan,
    write_json_atomic,
    write_plan,
)
from planner.search import (
    BASELINES,
    DEFAULT_GAP,
    DEFAULT_STALL_S,
    OptionSettings,
    PlanOptions,
    check_plan_inputs,
    cost_model_name,
    plan,
)
from planner.tools import (
    CapacityResult,
    ChangeKind,
    HostTrial,
    PlanDiff,
    ReplanResult,
    TargetUnreachableError,
    TorchRecPlanner,
    capacity_overflows,
    check_plan_fits,
    diff_plans,
    evaluate_plan,
    explain,
    from_torchrec,
    shard_option,
    to_torchrec,
    to_torchrec_sharding_plan,
)
from planner.tools.capacity import capacity
from planner.tools.replan import check_replan, replan

__all__ = [
    "AccessProfile", "AnalyticCostModel", "CapacityError", "CostModel", "CostModelError", "DType", "InfeasibleError", "Optimizer",
    "Plan", "PlanFileError", "PlanOptions", "PlannerError", "Resource", "Shard", "ShardCost",
    "ShardOption", "Sharding", "SolverError", "SpecError", "TablePlan", "TableSpec", "TablesSpec",
    "check_cost_model", "collective_latency_ms", "link_ms", "load_cost_model", "TorchRecCostModel",
    "Tier", "Topology", "load_tables", "load_topology", "parse_tables", "parse_topology", "plan",
    "plan_from_json", "plan_sha256", "plan_to_json", "read_plan", "write_plan",
    "CapacityResult", "PlanDiff", "ReplanResult", "TargetUnreachableError", "capacity",
    "diff_plans", "check_replan", "replan", "TorchRecPlanner", "from_torchrec", "to_torchrec", "to_torchrec_sharding_plan",
    # inputs
    "GB", "DeviceSpec", "HostSpec", "NetworkSpec", "StoreSpec", "ZERO_COST",
    "Constraints", "NO_CONSTRAINTS", "load_constraints", "parse_constraints",
    # the plan file
    "DeviceLoad", "SolveReport", "StopReason", "write_json_atomic",
    # search
    "BASELINES", "DEFAULT_GAP", "DEFAULT_STALL_S", "OptionSettings", "check_plan_inputs", "cost_model_name",
    # tools
    "ChangeKind", "HostTrial", "capacity_overflows", "check_plan_fits", "evaluate_plan",
    "explain", "shard_option",
]
