"""The plan file: what goes where, what it is predicted to cost, and how sure we are.

A plan embeds the tables spec and topology it was made for, so it can be checked
against the inputs of a run and re-costed later. JSON, with ``schema_version``.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planner.errors import PlanFileError, PlannerError
from planner.inputs.cost import ShardCost, Sharding, Tier
from planner.inputs.specs import TablesSpec, Topology, _sha256, parse_tables, parse_topology

SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True)
class Shard:
    """One piece of a table: a row range and a column range on one device."""

    device: int
    row_start: int
    row_end: int
    col_start: int
    col_end: int
    tier: Tier = Tier.HBM
    cache_rows: int = 0


@dataclass(frozen=True, slots=True)
class TablePlan:
    name: str
    sharding: Sharding
    shards: tuple[Shard, ...]
    cost: ShardCost
    """Predicted cost of all shards together."""
    limited_by: str | None = None
    """What narrowed the table's options when it was planned (its constraints, pins,
    ``--tiers``, ``--sharding``), in words; None when nothing did."""


@dataclass(frozen=True, slots=True)
class DeviceLoad:
    device: int
    host: int
    load_ms: float
    hbm_bytes: int
    hbm_capacity_bytes: int


class StopReason(enum.Enum):
    """Why the planner's search stopped."""

    OPTIMAL = "optimal"
    """The plan meets its lower bound: proven optimal."""
    GAP_REACHED = "gap reached"
    """The plan is proven within the target gap of its lower bound."""
    STALLED = "stalled"
    """Neither the plan nor the bound improved over the stall window, or no stage
    was left that could improve them."""
    TIME_LIMIT = "time limit"


OPTIMAL_GAP = 1e-7
"""A plan whose relative gap to its bound is at most this is proven optimal: the
solvers' incumbents and bounds reach the search through their logs, which print about
eight digits."""


@dataclass(frozen=True, slots=True)
class SolveReport:
    method: str
    """``ilp`` or ``baseline:<name>``."""
    solver: str
    status: str
    """``Optimal`` only when the plan is proven optimal (its objective meets its lower
    bound); otherwise ``Feasible`` (ILP), ``Heuristic`` (baselines) or ``Evaluated``."""
    sol_status: str
    objective_ms: float
    lower_bound_ms: float | None
    """A proven lower bound on every plan's slowest device; None when none is known
    (baselines and re-costed plans prove nothing about the problem)."""
    solve_seconds: float
    time_limit_s: float
    threads: int
    stop_reason: StopReason | None = None
    """Why the search stopped (None: no search, as for baselines)."""
    target_gap: float | None = None
    """The relative gap at which the search was to stop."""

    @property
    def gap(self) -> float | None:
        """(objective - bound) / bound: 0 means proven optimal; None without a bound."""
        bound = self.lower_bound_ms
        if bound is None or not math.isfinite(bound) or not math.isfinite(self.objective_ms):
            return None
        if bound <= 0:
            return 0.0 if self.objective_ms <= 0 else None
        return max(0.0, (self.objective_ms - bound) / bound)

    @property
    def proven_optimal(self) -> bool:
        return self.gap is not None and self.gap <= OPTIMAL_GAP


@dataclass(frozen=True, slots=True)
class Plan:
    tables_spec: TablesSpec
    topology: Topology
    cost_model: str
    tables: tuple[TablePlan, ...]
    devices: tuple[DeviceLoad, ...]
    solve: SolveReport

    @property
    def inputs_sha256(self) -> str:
        return inputs_sha256(self.tables_spec, self.topology, self.cost_model)

    def table(self, name: str) -> TablePlan:
        for table in self.tables:
            if table.name == name:
                return table
        raise KeyError(name)


def inputs_sha256(tables: TablesSpec, topology: Topology, cost_model: str) -> str:
    return _sha256([tables.sha256(), topology.sha256(), cost_model])


# ---------------------------------------------------------------- JSON


def _cost_json(cost: ShardCost) -> dict[str, Any]:
    return {
        "lookup_ms": cost.lookup_ms,
        "communication_ms": cost.communication_ms,
        "backward_ms": cost.backward_ms,
        "optimizer_ms": cost.optimizer_ms,
        "total_ms": cost.total_ms,
        "hbm_bytes": cost.hbm_bytes,
        "dram_bytes": cost.dram_bytes,
    }


def _number(value: float | None) -> float | None:
    """A finite number, or None (JSON null) for an unknown one."""
    return value if value is not None and math.isfinite(value) else None


def plan_to_json(plan: Plan) -> dict[str, Any]:
    """The plan as JSON-ready data; unknown numbers (no bound, hence no gap) are
    None, never NaN or infinity."""
    solve = plan.solve
    return {
        "schema_version": SCHEMA_VERSION,
        "inputs_sha256": plan.inputs_sha256,
        "tables_sha256": plan.tables_spec.sha256(),
        "cost_model": plan.cost_model,
        "method": solve.method,
        "solver": solve.solver,
        "status": solve.status,
        "sol_status": solve.sol_status,
        "objective_ms": _number(solve.objective_ms),
        "lower_bound_ms": _number(solve.lower_bound_ms),
        "gap": _number(solve.gap),
        "stop_reason": None if solve.stop_reason is None else solve.stop_reason.value,
        "target_gap": _number(solve.target_gap),
        "solve_seconds": _number(solve.solve_seconds),
        "time_limit_s": _number(solve.time_limit_s),
        "threads": solve.threads,
        "devices": [
            {
                "device": d.device,
                "host": d.host,
                "load_ms": d.load_ms,
                "hbm_bytes": d.hbm_bytes,
                "hbm_capacity_bytes": d.hbm_capacity_bytes,
            }
            for d in plan.devices
        ],
        "tables": [
            {
                "name": t.name,
                "sharding": t.sharding.value,
                "shards": [
                    {
                        "device": s.device,
                        "rows": [s.row_start, s.row_end],
                        "cols": [s.col_start, s.col_end],
                        "tier": s.tier.value,
                        "cache_rows": s.cache_rows,
                    }
                    for s in t.shards
                ],
                "predicted": _cost_json(t.cost),
                **({} if t.limited_by is None else {"limited_by": t.limited_by}),
            }
            for t in plan.tables
        ],
        "tables_spec": plan.tables_spec.to_json(),
        "topology": plan.topology.to_json(),
    }


def plan_sha256(plan: Plan) -> str:
    """Identity of a plan's content (what ``write_plan`` writes), e.g. to tie a
    training run's measurements to the plan it executed."""
    text = json.dumps(plan_to_json(plan), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def write_plan(plan: Plan, path: str | Path) -> None:
    """Write atomically: a crash leaves either the old file or the new one."""
    write_json_atomic(plan_to_json(plan), path)


def write_json_atomic(doc: object, path: str | Path) -> None:
    """JSON to ``path`` through a temp file, fsync and rename. Strict JSON: a NaN or
    infinity in ``doc`` raises ValueError before anything is written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(doc, indent=1, allow_nan=False) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from others
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's file mode creation mask (read by setting it and back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read_plan(path: str | Path, *, require_inputs_sha256: bool = True) -> Plan:
    """Read and check a plan file; every problem is a :class:`PlanFileError`. With
    ``require_inputs_sha256=False`` a plan without ``inputs_sha256`` (hand-written,
    or from another tool) is accepted; a present one must still match."""
    name = str(path)
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PlanFileError(name, "no such file") from None
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":
            raise PlanFileError(name, "holds several JSON documents (a metrics log?), not a "
                                      "plan") from None
        raise PlanFileError(name, f"not a readable JSON plan: {exc.msg} at line {exc.lineno} "
                                  f"column {exc.colno}") from None
    except IsADirectoryError:
        raise PlanFileError(name, "is a directory, not a plan file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanFileError(name, f"not a readable JSON plan: {exc}") from None
    return plan_from_json(doc, name, require_inputs_sha256=require_inputs_sha256)


def plan_from_json(doc: Any, name: str = "<memory>", *, require_inputs_sha256: bool = True) -> Plan:
    if not isinstance(doc, dict):
        raise PlanFileError(name, "a plan must be a JSON object")
    version = doc.get("schema_version")
    if version is None:
        raise PlanFileError(name, _what_instead(doc))
    if version != SCHEMA_VERSION:
        raise PlanFileError(name, f"schema_version {version!r} is not supported "
                                  f"(this version reads {SCHEMA_VERSION}); re-run dlrm-plan")
    try:
        tables_spec = parse_tables(doc["tables_spec"], f"{name}#tables_spec")
        topology = parse_topology(doc["topology"], f"{name}#topology")
        devices = tuple(
            DeviceLoad(int(d["device"]), int(d["host"]), float(d["load_ms"]),
                       int(d["hbm_bytes"]), int(d["hbm_capacity_bytes"]))
            for d in doc["devices"]
        )
        tables = tuple(_table_from_json(t) for t in doc["tables"])
        solve = SolveReport(
            method=str(doc["method"]),
            solver=str(doc["solver"]),
            status=str(doc["status"]),
            sol_status=str(doc["sol_status"]),
            objective_ms=float(doc["objective_ms"]),
            lower_bound_ms=_optional_number(doc["lower_bound_ms"]),
            solve_seconds=_optional_number(doc["solve_seconds"]) or 0.0,
            time_limit_s=_optional_number(doc["time_limit_s"]) or 0.0,
            threads=int(doc["threads"]),
            stop_reason=(None if doc.get("stop_reason") is None
                         else StopReason(doc["stop_reason"])),
            target_gap=_optional_number(doc.get("target_gap")),
        )
        cost_model = str(doc["cost_model"])
    except PlannerError as exc:
        raise PlanFileError(name, f"embedded spec invalid: {exc}") from None
    except KeyError as exc:
        raise PlanFileError(name, f"missing field {exc.args[0]!r}") from None
    except (TypeError, ValueError, IndexError) as exc:
        raise PlanFileError(name, f"malformed field: {exc}") from None
    plan = Plan(tables_spec, topology, cost_model, tables, devices, solve)
    check_plan(plan, name)
    if "inputs_sha256" not in doc and not require_inputs_sha256:
        return plan
    if doc.get("inputs_sha256") != plan.inputs_sha256:
        raise PlanFileError(name, "inputs_sha256 does not match the embedded specs "
                                  "(edited by hand?); re-run dlrm-plan")
    return plan


def _optional_number(value: Any) -> float | None:
    """A JSON number, or None for null (and for the non-standard NaN and Infinity
    that older plan files may hold)."""
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _what_instead(doc: dict[str, Any]) -> str:
    """What a JSON object without ``schema_version`` is, for the error message."""
    make = "make a plan with dlrm-plan --tables TABLES --topology TOPOLOGY -o PLAN"
    if doc.get("format") == "torchrec_sharding_plan":
        return ("this is a TorchRec plan (dlrm-plan export); read it with --format torchrec "
                "--tables TABLES")
    if isinstance(doc.get("tables"), list) and "devices" not in doc:
        return f"this is a tables spec, not a plan; {make}"
    if "devices_per_host" in doc or "hosts" in doc:
        return f"this is a topology spec, not a plan; {make}"
    if isinstance(doc.get("tables"), dict) or "colocate" in doc or "separate" in doc:
        return f"this is a constraints file, not a plan; {make}"
    return f"not a plan: it has no schema_version field; {make}"


def _table_from_json(t: dict[str, Any]) -> TablePlan:
    shards = tuple(
        Shard(int(s["device"]), int(s["rows"][0]), int(s["rows"][1]), int(s["cols"][0]),
              int(s["cols"][1]), Tier(s["tier"]), int(s.get("cache_rows", 0)))
        for s in t["shards"]
    )
    p = t["predicted"]
    cost = ShardCost(float(p["lookup_ms"]), float(p["communication_ms"]), float(p["backward_ms"]),
                     float(p["optimizer_ms"]), int(p["hbm_bytes"]), int(p.get("dram_bytes", 0)))
    limited = t.get("limited_by")
    return TablePlan(str(t["name"]), Sharding(t["sharding"]), shards, cost,
                     None if limited is None else str(limited))


def check_plan(plan: Plan, name: str = "<memory>") -> None:
    """Structural checks: every table planned once; shards inside the table, on
    devices that exist, and covering the table as their sharding type requires."""
    world = plan.topology.world_size
    planned = [t.name for t in plan.tables]
    expected = [t.name for t in plan.tables_spec.tables]
    if sorted(planned) != sorted(expected):
        missing = sorted(set(expected) - set(planned))
        extra = sorted(set(planned) - set(expected))
        raise PlanFileError(name, f"tables planned do not match the spec "
                                  f"(missing {missing}, unknown {extra})")
    for table in plan.tables:
        spec = plan.tables_spec.by_name(table.name)
        if not table.shards:
            raise PlanFileError(name, f"table {table.name!r} has no shards")
        for s in table.shards:
            if not 0 <= s.device < world:
                raise PlanFileError(name, f"table {table.name!r}: device {s.device} "
                                          f"outside 0..{world - 1}")
            if not (0 <= s.row_start < s.row_end <= spec.num_embeddings
                    and 0 <= s.col_start < s.col_end <= spec.embedding_dim):
                raise PlanFileError(name, f"table {table.name!r}: shard rows "
                                          f"[{s.row_start}, {s.row_end}) cols [{s.col_start}, "
                                          f"{s.col_end}) outside {spec.num_embeddings} x "
                                          f"{spec.embedding_dim}")
            cached = s.tier in (Tier.DRAM_CACHE, Tier.STORE_CACHE)
            if cached == (s.cache_rows == 0) or s.cache_rows > s.row_end - s.row_start:
                raise PlanFileError(name, f"table {table.name!r}: a {s.tier.value} shard of "
                                          f"{s.row_end - s.row_start} rows cannot have "
                                          f"{s.cache_rows} cache rows")
        problem = _coverage_problem(table, spec.num_embeddings, spec.embedding_dim, plan.topology)
        if problem:
            raise PlanFileError(name, f"table {table.name!r} ({table.sharding.value}): {problem}")


def _coverage_problem(table: TablePlan, rows: int, dim: int, topology: Topology) -> str:
    """Why the shards do not tile the table as the sharding type says ('' if they do)."""
    shards = table.shards
    devices = [s.device for s in shards]
    if table.sharding is Sharding.DATA_PARALLEL:
        if sorted(devices) != list(range(topology.world_size)):
            return "needs one replica on every device"
        if any((s.row_start, s.row_end, s.col_start, s.col_end) != (0, rows, 0, dim) for s in shards):
            return "every replica must hold the whole table"
        return ""
    if len(set(devices)) != len(devices) and table.sharding is not Sharding.COLUMN_WISE:
        return "two shards on one device"
    if table.sharding is Sharding.TABLE_WISE and len(shards) != 1:
        return "needs exactly one shard"
    if table.sharding is Sharding.TABLE_ROW_WISE and len({topology.host_of(d) for d in devices}) != 1:
        return "shards must lie on the devices of one host"
    cells = sorted((s.row_start, s.col_start, s.row_end, s.col_end) for s in shards)
    if table.sharding is Sharding.COLUMN_WISE:
        if any(c[0] != 0 or c[2] != rows for c in cells):
            return "column shards must hold every row"
        spans = sorted((c[1], c[3]) for c in cells)
        whole = dim
    else:
        if any(c[1] != 0 or c[3] != dim for c in cells):
            return "row shards must hold every column"
        spans = sorted((c[0], c[2]) for c in cells)
        whole = rows
    position = 0
    for start, end in spans:
        if start != position:
            return f"shards leave a gap or overlap at {position}"
        position = end
    return "" if position == whole else f"shards end at {position}, not {whole}"
