"""The search for a plan: every option of a table priced by the cost model
(``options``), the aggregate ILP that picks one per table and bounds the objective
(``aggregate``), the placement of the chosen shards on devices (``placement``,
``packing``, ``balance``), the device-indexed ILP on small instances (``exact``),
the greedy baselines (``baselines``), the solver runner (``solvers``), the anytime
stopping rule (``anytime``) and the entry point :func:`plan` that runs them in turn
(``api``).

This stage uses ``planner.inputs`` and the plan file (``planner.plan_file``), never
``planner.tools``.
"""

from planner.search.anytime import SearchProgress
from planner.search.api import (
    DEFAULT_GAP,
    DEFAULT_STALL_S,
    PlanOptions,
    check_plan_inputs,
    check_tables_fit,
    cost_model_name,
    plan,
)
from planner.search.aggregate import solve_aggregate
from planner.search.baselines import BASELINES
from planner.search.options import OptionSettings, Placement, TableOption, table_options

__all__ = [
    "BASELINES", "DEFAULT_GAP", "DEFAULT_STALL_S", "OptionSettings", "PlanOptions", "Placement",
    "SearchProgress", "TableOption", "check_plan_inputs", "check_tables_fit", "cost_model_name",
    "plan", "solve_aggregate", "table_options",
]
