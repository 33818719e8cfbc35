"""What is done with plans once made: re-cost one and check that it fits
(``evaluate``), compare two (``diff``), re-plan with few moves (``replan``), find
the smallest topology that fits (``capacity``), and convert to and from TorchRec's
sharding plans (``torchrec``, which imports torchrec only when called).

This stage uses ``planner.search``, ``planner.inputs`` and the plan file.

The functions :func:`planner.capacity` and :func:`planner.replan` are at the
``planner`` door; here ``capacity`` and ``replan`` stay the names of their modules.
"""

from planner.tools.capacity import (
    CapacityResult,
    HostBound,
    HostTrial,
    TargetUnreachableError,
    sweep,
    topology_for,
)
from planner.tools.diff import ChangeKind, PlanDiff, diff_plans
from planner.tools.evaluate import (
    capacity_overflows,
    check_plan_fits,
    evaluate_plan,
    explain,
    shard_option,
)
from planner.tools.replan import ReplanResult
from planner.tools.torchrec import (
    DEVICES,
    check_module_path,
    from_torchrec,
    import_torchrec,
    recut_tables,
    to_torchrec,
    to_torchrec_sharding_plan,
)
from planner.tools.torchrec_planner import TorchRecPlanner, topology_from_torchrec

__all__ = [
    "DEVICES", "CapacityResult", "ChangeKind", "check_module_path", "HostBound", "HostTrial", "PlanDiff",
    "ReplanResult", "TargetUnreachableError", "TorchRecPlanner", "capacity_overflows", "check_plan_fits",
    "diff_plans", "evaluate_plan", "explain", "from_torchrec", "import_torchrec",
    "recut_tables", "shard_option", "sweep", "to_torchrec", "to_torchrec_sharding_plan",
    "topology_for", "topology_from_torchrec",
]
