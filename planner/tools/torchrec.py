"""TorchRec sharding plans: export ours, import theirs.

The JSON form mirrors TorchRec 1.8's ``ShardingPlan``: ``plan`` maps a module path
to its tables, each with the fields of ``ParameterSharding`` (``sharding_type``,
``compute_kernel``, ``ranks``, ``sharding_spec`` as a list of shards with
``shard_offsets`` [row, col], ``shard_sizes`` [rows, cols] and ``placement``
``"rank:R/cuda:L"``, and ``cache_params`` with ``load_factor``). Writing and reading
that JSON needs neither torch nor torchrec; :func:`to_torchrec_sharding_plan` builds
the real TorchRec object and imports torchrec only then.

Mapping (by tier value, so a tier this version lacks is simply not mapped):

=============  ===================  ====================================
our tier       TorchRec kernel      notes
=============  ===================  ====================================
hbm            fused                ``dense`` for data-parallel tables
dram_cache     fused_uvm_caching    load_factor = cache rows / rows
store_cache    fused_uvm_caching    TorchRec has no store tier; see below
host           fused_uvm            rows in host memory, no device cache
=============  ===================  ====================================

Sharding types have the same names in both. TorchRec routes an id of a row-wise
table to rank ``id // ceil(rows / N)`` (N devices, or devices of the host for
table-row-wise), so the export cuts row-wise shards into those blocks, in device
order: a shard may hold a row more or fewer than the plan said (the plan splits
``rows * i // N``). Each table also carries ``dlrm_tier``, which TorchRec ignores and
the import uses to tell a store cache from a DRAM cache.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, replace
from typing import Any

from planner.errors import PlanFileError, PlannerError
from planner.inputs.cost import AnalyticCostModel, CostModel, ZERO_COST, Sharding, Tier
from planner.inputs.specs import TablesSpec, Topology
from planner.plan_file import DeviceLoad, Plan, Shard, SolveReport, TablePlan

FORMAT = "torchrec_sharding_plan"
TORCHREC_VERSION = "1.8.0"
"""The TorchRec release whose field names and semantics the JSON follows."""

KERNEL_OF_TIER = {
    "hbm": "fused",
    "dram_cache": "fused_uvm_caching",
    "store_cache": "fused_uvm_caching",
    "host": "fused_uvm",
}
"""TorchRec compute kernel of each of our tiers (by ``Tier.value``)."""

TIER_OF_KERNEL = {
    "fused": "hbm",
    "dense": "hbm",
    "fused_uvm_caching": "dram_cache",
    "fused_uvm": "host",
}
"""Our tier of each TorchRec compute kernel we can cost."""

DENSE_KERNEL = "dense"
DEFAULT_LOAD_FACTOR = 0.2
"""TorchRec's cache load factor when a caching table's plan gives none."""
DEVICES = ("cuda", "cpu")
_PLACEMENT = re.compile(r"^rank:(\d+)/(cpu|cuda:\d+|meta)$")
_MODULE_PATH = re.compile(r"^([A-Za-z_]\w*|\d+)(\.([A-Za-z_]\w*|\d+))*$")
"""A module's path in a model: attribute names (or ``ModuleList`` indices) joined by
dots, as ``named_modules`` gives them."""


def check_module_path(module_path: str) -> None:
    """``""`` (the model is the collection) or a dotted path of attribute names or
    indices; :class:`PlannerError` otherwise."""
    if module_path and not _MODULE_PATH.match(module_path):
        raise PlannerError(f"module path {module_path!r} is not a path of a module in a model: "
                         f"attribute names (or indices) joined by dots, e.g. "
                         f"sparse_arch.embedding_bag_collection; '' for the model itself")


def _tier(value: str, where: str, file: str) -> Tier:
    try:
        return Tier(value)
    except ValueError:
        raise PlanFileError(file, f"{where}: tier {value!r} is not supported by this "
                                  f"version (tiers: {', '.join(t.value for t in Tier)})") from None


# ---------------------------------------------------------------- export


def torchrec_row_blocks(rows: int, parts: int) -> list[tuple[int, int]]:
    """TorchRec's row-wise layout: ``parts`` blocks of ``ceil(rows / parts)`` rows in
    rank order, the last ones shorter or empty."""
    block = -(-rows // parts)
    return [(min(i * block, rows), min((i + 1) * block, rows)) for i in range(parts)]


def _placement(rank: int, device: str, local_world_size: int) -> str:
    return f"rank:{rank}/cpu" if device == "cpu" else f"rank:{rank}/cuda:{rank % local_world_size}"


def _load_factor(shards: tuple[Shard, ...]) -> float:
    """One load factor per table (TorchRec's ``CacheParams`` is per table): the
    smallest cache share of the shards, so that ``ceil(load_factor * rows)`` gives
    back each shard's cache rows when they were ``ceil(rows * f)`` for one f."""
    return min(s.cache_rows / (s.row_end - s.row_start) for s in shards)


def _shard_json(offsets: tuple[int, int], sizes: tuple[int, int], rank: int, device: str,
                local_world_size: int) -> dict[str, Any]:
    return {"shard_offsets": list(offsets), "shard_sizes": list(sizes),
            "placement": _placement(rank, device, local_world_size)}


def _table_sharding(plan: Plan, table: TablePlan, device: str) -> dict[str, Any]:
    spec = plan.tables_spec.by_name(table.name)
    rows, dim = spec.num_embeddings, spec.embedding_dim
    local = plan.topology.devices_per_host
    tier = table.shards[0].tier
    out: dict[str, Any] = {"sharding_type": table.sharding.value}
    if table.sharding is Sharding.DATA_PARALLEL:
        out.update(compute_kernel=DENSE_KERNEL, ranks=sorted(s.device for s in table.shards),
                   sharding_spec=None, cache_params=None, dlrm_tier=tier.value)
        return out
    if table.sharding in (Sharding.ROW_WISE, Sharding.TABLE_ROW_WISE):
        ordered = sorted(table.shards, key=lambda s: s.row_start)
        blocks = torchrec_row_blocks(rows, len(ordered))
        shards = [_shard_json((start, 0), (end - start, dim), s.device, device, local)
                  for s, (start, end) in zip(ordered, blocks)]
    else:
        ordered = sorted(table.shards, key=lambda s: (s.col_start, s.row_start))
        shards = [_shard_json((s.row_start, s.col_start), (s.row_end - s.row_start,
                                                           s.col_end - s.col_start),
                              s.device, device, local) for s in ordered]
    cached = tier.value in ("dram_cache", "store_cache")
    out.update(
        compute_kernel=KERNEL_OF_TIER[tier.value],
        ranks=[s.device for s in ordered],
        sharding_spec={"shards": shards},
        cache_params={"load_factor": _load_factor(table.shards)} if cached else None,
        dlrm_tier=tier.value,
    )
    return out


def to_torchrec(plan: Plan, module_path: str = "", device: str = "cuda") -> dict[str, Any]:
    """The plan as TorchRec ``ParameterSharding`` fields, per table of the module at
    ``module_path`` (``""``: the sharded module is the model itself). ``device`` is
    the compute device of the placements: ``cuda`` (``rank:R/cuda:L``) or ``cpu``
    (``rank:R/cpu``, to run the plan on CPU processes)."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    check_module_path(module_path)
    for table in plan.tables:
        if len({s.tier for s in table.shards}) != 1:
            raise PlanFileError("<plan>", f"table {table.name!r}: TorchRec takes one compute "
                                          f"kernel per table, its shards use several tiers")
    return {
        "format": FORMAT,
        "torchrec_version": TORCHREC_VERSION,
        "world_size": plan.topology.world_size,
        "local_world_size": plan.topology.devices_per_host,
        "device": device,
        "plan": {module_path: {t.name: _table_sharding(plan, t, device) for t in plan.tables}},
    }


def recut_tables(plan: Plan) -> tuple[str, ...]:
    """Tables whose row-wise shards the export cuts differently from the plan."""
    out = []
    for table in plan.tables:
        if table.sharding in (Sharding.ROW_WISE, Sharding.TABLE_ROW_WISE):
            rows = plan.tables_spec.by_name(table.name).num_embeddings
            ours = sorted((s.row_start, s.row_end) for s in table.shards)
            if ours != torchrec_row_blocks(rows, len(ours)):
                out.append(table.name)
    return tuple(out)


def import_torchrec() -> Any:
    """Import torchrec (and fbgemm-gpu) with their import-time warnings silenced;
    raise ``ImportError`` naming the extra when they are missing."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchrec.distributed.types as types
    except ImportError as exc:
        raise ImportError(f"torchrec is not installed ({exc}); run `make install-torchrec`") from exc
    return types


def to_torchrec_sharding_plan(plan: Plan | dict[str, Any], module_path: str = "",
                              device: str = "cuda") -> Any:
    """A ``torchrec.distributed.types.ShardingPlan`` for ``DistributedModelParallel``,
    from a plan or from the JSON of :func:`to_torchrec`. Needs torchrec."""
    doc = plan if isinstance(plan, dict) else to_torchrec(plan, module_path, device)
    types = import_torchrec()
    modules = {}
    for path, tables in _modules(doc, "<memory>").items():
        params = {}
        for name, entry in tables.items():
            spec = entry.get("sharding_spec")
            cache = entry.get("cache_params")
            params[name] = types.ParameterSharding(
                sharding_type=entry["sharding_type"],
                compute_kernel=entry["compute_kernel"],
                ranks=list(entry["ranks"]) if entry.get("ranks") is not None else None,
                sharding_spec=None if spec is None else types.EnumerableShardingSpec([
                    types.ShardMetadata(shard_offsets=list(s["shard_offsets"]),
                                        shard_sizes=list(s["shard_sizes"]),
                                        placement=s["placement"])
                    for s in spec["shards"]]),
                cache_params=None if cache is None else types.CacheParams(
                    load_factor=cache.get("load_factor")),
            )
        modules[path] = types.EmbeddingModuleShardingPlan(params)
    return types.ShardingPlan(modules)


# ---------------------------------------------------------------- import


@dataclass(frozen=True, slots=True)
class _ImportedShard:
    rank: int
    offsets: tuple[int, int]
    sizes: tuple[int, int]


def _modules(doc: Any, file: str) -> dict[str, dict[str, Any]]:
    if not isinstance(doc, dict):
        raise PlanFileError(file, "a TorchRec plan must be a JSON object")
    modules = doc.get("plan", doc) if "format" in doc or "plan" in doc else doc
    if not isinstance(modules, dict) or not all(isinstance(v, dict) for v in modules.values()):
        raise PlanFileError(file, "'plan' must map module paths to tables")
    return modules


def _doc_from_sharding_plan(plan: Any) -> dict[str, Any]:
    """The JSON form of a ``ShardingPlan`` object (read by attribute, no torchrec import)."""
    modules: dict[str, dict[str, Any]] = {}
    for path, tables in plan.plan.items():
        entries = {}
        for name, ps in tables.items():
            spec = ps.sharding_spec
            cache = ps.cache_params
            entries[name] = {
                "sharding_type": ps.sharding_type,
                "compute_kernel": ps.compute_kernel,
                "ranks": None if ps.ranks is None else list(ps.ranks),
                "sharding_spec": None if spec is None else {"shards": [
                    {"shard_offsets": list(s.shard_offsets), "shard_sizes": list(s.shard_sizes),
                     "placement": str(s.placement)} for s in spec.shards]},
                "cache_params": None if cache is None else {"load_factor": cache.load_factor},
            }
        modules[path] = entries
    return {"format": FORMAT, "plan": modules}


def _int_pair(value: Any, field: str, where: str, file: str) -> tuple[int, int]:
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
        raise PlanFileError(file, f"{where}: {field} must be two integers >= 0, got {value!r}")
    return int(value[0]), int(value[1])


def _parse_shards(entry: dict[str, Any], where: str, file: str) -> list[_ImportedShard]:
    spec = entry.get("sharding_spec")
    if not isinstance(spec, dict) or not isinstance(spec.get("shards"), list):
        raise PlanFileError(file, f"{where}: sharding_spec must hold a list of shards")
    ranks = entry.get("ranks")
    out = []
    for i, s in enumerate(spec["shards"]):
        if not isinstance(s, dict):
            raise PlanFileError(file, f"{where}: shard {i} must be an object")
        placement = str(s.get("placement", ""))
        match = _PLACEMENT.match(placement)
        if match:
            rank = int(match.group(1))
        elif placement:
            raise PlanFileError(file, f"{where}: shard {i} has placement {placement!r}; "
                                      f"TorchRec writes rank:R/cuda:L or rank:R/cpu")
        elif isinstance(ranks, list) and i < len(ranks) and isinstance(ranks[i], int):
            rank = ranks[i]
        else:
            raise PlanFileError(file, f"{where}: shard {i} has no rank (placement "
                                      f"{placement!r}, no ranks[{i}])")
        out.append(_ImportedShard(rank, _int_pair(s.get("shard_offsets"), "shard_offsets", where,
                                                  file),
                                  _int_pair(s.get("shard_sizes"), "shard_sizes", where, file)))
    return out


def _imported_table(name: str, entry: Any, tables: TablesSpec, topology: Topology,
                    file: str) -> TablePlan:
    where = f"table {name!r}"
    if not isinstance(entry, dict):
        raise PlanFileError(file, f"{where}: must be an object of ParameterSharding fields")
    try:
        sharding = Sharding(entry.get("sharding_type"))
    except ValueError:
        raise PlanFileError(file, f"{where}: sharding_type {entry.get('sharding_type')!r} is "
                                  f"not supported (supported: "
                                  f"{', '.join(s.value for s in Sharding)})") from None
    kernel = entry.get("compute_kernel")
    if kernel not in TIER_OF_KERNEL:
        raise PlanFileError(file, f"{where}: compute_kernel {kernel!r} is not supported "
                                  f"(supported: {', '.join(TIER_OF_KERNEL)})")
    tier_value = TIER_OF_KERNEL[kernel]
    hint = entry.get("dlrm_tier")
    if hint is not None and KERNEL_OF_TIER.get(hint) == kernel:
        tier_value = hint
    tier = _tier(tier_value, where, file)
    spec = tables.by_name(name)
    rows, dim = spec.num_embeddings, spec.embedding_dim
    if sharding is Sharding.DATA_PARALLEL:
        if tier is not Tier.HBM:
            raise PlanFileError(file, f"{where}: a data-parallel table must use the dense or "
                                      f"fused kernel, not {kernel}")
        shards = tuple(Shard(d, 0, rows, 0, dim) for d in range(topology.world_size))
        return TablePlan(name, sharding, shards, ZERO_COST)
    load_factor = 0.0
    if tier.value in ("dram_cache", "store_cache"):
        cache = entry.get("cache_params")
        load_factor = cache.get("load_factor") if isinstance(cache, dict) else None
        if load_factor is None:
            load_factor = DEFAULT_LOAD_FACTOR
        if (isinstance(load_factor, bool) or not isinstance(load_factor, (int, float))
                or not 0 < load_factor <= 1):
            raise PlanFileError(file, f"{where}: {kernel} needs cache_params.load_factor in "
                                      f"(0, 1], got {load_factor!r}")
    shards = []
    for s in _parse_shards(entry, where, file):
        (row, col), (n_rows, n_cols) = s.offsets, s.sizes
        if n_rows == 0 or n_cols == 0:
            continue  # TorchRec pads row-wise tables with empty shards
        if not 0 <= s.rank < topology.world_size:
            raise PlanFileError(file, f"{where}: rank {s.rank} outside the topology's "
                                      f"0..{topology.world_size - 1}")
        if row + n_rows > rows or col + n_cols > dim:
            raise PlanFileError(file, f"{where}: shard at {[row, col]} of {[n_rows, n_cols]} "
                                      f"lies outside the table's {rows} x {dim} in --tables")
        cache_rows = 0
        if load_factor:
            cache_rows = min(n_rows, max(1, math.ceil(load_factor * n_rows - 1e-9)))
        shards.append(Shard(s.rank, row, row + n_rows, col, col + n_cols, tier, cache_rows))
    if not shards:
        raise PlanFileError(file, f"{where}: no shard holds any rows")
    return TablePlan(name, sharding, tuple(shards), ZERO_COST)


def from_torchrec(source: Any, tables: TablesSpec, topology: Topology, *,
                  cost_model: CostModel | None = None, module_path: str | None = None,
                  file: str = "<memory>") -> Plan:
    """A TorchRec plan (the JSON of :func:`to_torchrec`, or a ``ShardingPlan``) as our
    plan, re-costed under ``cost_model`` (default: the analytic model) on
    ``topology``. ``module_path`` picks one module; by default every module's
    tables are read (their names must be unique). Raises :class:`PlanFileError`
    for tables missing from ``tables`` or not planned, unknown kernels and shards
    outside a table or the topology."""
    from planner.search.api import cost_model_name
    from planner.tools.evaluate import evaluate_plan

    doc = source if isinstance(source, dict) else _doc_from_sharding_plan(source)
    modules = _modules(doc, file)
    world = doc.get("world_size")
    if isinstance(world, int) and not isinstance(world, bool) and world != topology.world_size:
        raise PlanFileError(file, f"the TorchRec plan is for world size {world}, the topology has "
                                  f"{topology.world_size} devices: pass a topology of {world} "
                                  f"devices (hosts x devices_per_host)")
    if module_path is not None:
        if module_path not in modules:
            raise PlanFileError(file, f"no module {module_path!r} in the plan (modules: "
                                      f"{sorted(modules)})")
        modules = {module_path: modules[module_path]}
    entries: dict[str, Any] = {}
    for path, module_tables in modules.items():
        for name, entry in module_tables.items():
            if name in entries:
                raise PlanFileError(file, f"table {name!r} is planned in two modules; pass "
                                          f"module_path")
            entries[name] = entry
    known = {t.name for t in tables.tables}
    unknown = sorted(set(entries) - known)
    missing = sorted(known - set(entries))
    if unknown or missing:
        raise PlanFileError(file, f"the TorchRec plan's tables do not match the tables spec "
                                  f"(not in the spec: {unknown}, not planned: {missing})")
    planned = tuple(_imported_table(t.name, entries[t.name], tables, topology, file)
                    for t in tables.tables)
    model = cost_model or AnalyticCostModel()
    devices = tuple(DeviceLoad(d, topology.host_of(d), 0.0, 0, topology.usable_hbm_bytes)
                    for d in range(topology.world_size))
    report = SolveReport("import:torchrec", "none", "Imported", "Not Solved", 0.0, 0.0, 0.0, 0.0, 1)
    imported = Plan(tables, topology, cost_model_name(model), planned, devices, report)
    try:
        result = evaluate_plan(imported, model, cost_model_name(model), topology)
    except PlanFileError as exc:
        raise PlanFileError(file, exc.problem) from None
    return replace(result, solve=replace(result.solve, method="import:torchrec"))
