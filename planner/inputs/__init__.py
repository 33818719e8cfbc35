"""What the planner is given: the tables, the topology and their access profiles
(``specs``), the user's constraints (``constraints``) and the cost model that prices a
shard (``cost``: the public :class:`CostModel` protocol, the analytic model, and the
check and loader for user models).

This stage imports no other stage of the planner (only ``planner.errors``).
"""

from planner.inputs.constraints import (
    NO_CONSTRAINTS,
    Constraints,
    TableRules,
    load_constraints,
    parse_constraints,
)
from planner.inputs.cost import (
    ZERO_COST,
    AnalyticCostModel,
    CostModel,
    CostModelError,
    ShardCost,
    ShardOption,
    Sharding,
    Tier,
    check_cost_model,
    collective_latency_ms,
    link_ms,
    load_cost_model,
)
from planner.inputs.specs import (
    GB,
    MAX_DEVICES,
    MAX_TABLE_BYTES,
    MAX_TABLE_NAME_CHARS,
    AccessProfile,
    DeviceSpec,
    DType,
    HostSpec,
    NetworkSpec,
    Optimizer,
    StoreSpec,
    TablesSpec,
    TableSpec,
    Topology,
    check_limits,
    load_tables,
    load_topology,
    parse_tables,
    parse_topology,
    table_name_problem,
)
from planner.inputs.torchrec_cost import (
    TorchRecCostModel,
    torchrec_data_type,
    torchrec_topology,
)

__all__ = [
    "GB", "MAX_DEVICES", "MAX_TABLE_BYTES", "MAX_TABLE_NAME_CHARS", "NO_CONSTRAINTS", "ZERO_COST",
    "AccessProfile", "AnalyticCostModel", "Constraints", "CostModel", "CostModelError", "DType",
    "DeviceSpec", "HostSpec", "NetworkSpec", "Optimizer", "ShardCost", "ShardOption", "Sharding",
    "StoreSpec", "TableRules", "TorchRecCostModel", "TableSpec", "TablesSpec", "Tier", "Topology",
    "check_cost_model", "check_limits", "collective_latency_ms", "link_ms", "load_constraints", "load_cost_model", "load_tables",
    "load_topology", "parse_constraints", "parse_tables", "parse_topology", "table_name_problem",
    "torchrec_data_type", "torchrec_topology",
]
