"""Input specs: the tables to plan and the machine to plan them on.

Both are read from JSON (or TOML on Python >= 3.11) and validated strictly: every
malformed field raises :class:`planner.errors.SpecError` naming the file, the field
path and the value. Units live in field names: ``_gb`` is 1e9 bytes, ``_gbps`` is
1e9 bytes per second.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from planner.errors import SpecError
from planner.inputs._fields import Fields

GB = 1_000_000_000

MAX_TABLE_BYTES = 2**53
"""Most bytes one table (weights and optimizer state) may take, about 9 PB: byte
counts stay exact in int64 sums and float64 arithmetic."""
MAX_DEVICES = 16_384
"""Most devices (hosts x devices_per_host) a topology may have: the planner prices
and places shards per device, and plans for up to this many within its time limit."""
MAX_MEMORY_GB = 1_000_000.0
"""Most HBM per device and DRAM per host, in GB (1 PB): byte counts stay exact."""


class DType(enum.Enum):
    """Storage dtype of an embedding table."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"

    @property
    def bytes(self) -> int:
        return 4 if self is DType.FP32 else 2


class Optimizer(enum.Enum):
    """Embedding optimizer; decides the per-row state the planner must store."""

    SGD = "sgd"
    ROWWISE_ADAGRAD = "rowwise_adagrad"
    ADAM = "adam"

    def state_bytes_per_row(self, dim: int) -> int:
        """fp32 optimizer state per row: none, one value per row, or two per element."""
        if self is Optimizer.SGD:
            return 0
        if self is Optimizer.ROWWISE_ADAGRAD:
            return 4
        return 8 * dim


@dataclass(frozen=True, slots=True)
class AccessProfile:
    """How lookups spread over a table's rows.

    Exactly one description is used: a Zipf exponent (``zipf``), or a measured profile
    (``hot_rows[i]`` hottest rows serve ``share[i]`` of lookups), or neither (uniform).
    """

    zipf: float | None = None
    hot_rows: tuple[int, ...] = ()
    share: tuple[float, ...] = ()

    def hit_rate(self, num_rows: int, cache_rows: int) -> float:
        """Share of lookups served by the ``cache_rows`` hottest of ``num_rows`` rows."""
        if cache_rows <= 0:
            return 0.0
        if cache_rows >= num_rows:
            return 1.0
        if self.zipf is not None:
            return _harmonic(cache_rows, self.zipf) / _harmonic(num_rows, self.zipf)
        if self.hot_rows:
            return _interpolate_profile(self.hot_rows, self.share, num_rows, cache_rows)
        return cache_rows / num_rows

    def expected_distinct(self, num_rows: int, draws: float) -> float:
        """Expected number of distinct rows among ``draws`` independent lookups of a
        table of ``num_rows`` rows: the sum over rows of ``1 - (1 - p)^draws``, with the
        rows grouped by rank into geometric buckets (ratio 1.25) whose rows share the
        bucket's mean probability, read off :meth:`hit_rate`. About 1 ms a call, so
        results are cached: the planner asks once per table and shard size."""
        return _expected_distinct(self, num_rows, float(draws))

    def to_json(self) -> dict[str, Any] | None:
        if self.zipf is not None:
            return {"zipf": self.zipf}
        if self.hot_rows:
            return {"hot_rows": list(self.hot_rows), "share": list(self.share)}
        return None


@functools.lru_cache(maxsize=4096)
def _expected_distinct(profile: AccessProfile, num_rows: int, draws: float) -> float:
    """:meth:`AccessProfile.expected_distinct`."""
    if num_rows <= 0 or draws <= 0:
        return 0.0
    edges = [0]
    while edges[-1] < num_rows:
        edges.append(min(num_rows, max(edges[-1] + 1, int(edges[-1] * 1.25))))
    total, below = 0.0, 0.0
    for lo, hi in zip(edges, edges[1:]):
        upto = profile.hit_rate(num_rows, hi)
        p = max(0.0, upto - below) / (hi - lo)
        below = upto
        if p > 0:
            total += (hi - lo) * -math.expm1(draws * math.log1p(-min(p, 1.0 - 1e-15)))
    return min(total, float(num_rows), draws)


def _harmonic(k: int, s: float, head: int = 16) -> float:
    """Generalised harmonic number sum_{i<=k} i^-s: exact for the first terms, then
    Euler-Maclaurin (integral, end-point and first derivative corrections; the
    relative error is below 1e-7 for k > 16)."""
    if k <= head:
        return math.fsum(i ** -s for i in range(1, k + 1))
    m = head
    total = math.fsum(i ** -s for i in range(1, m))
    integral = math.log(k / m) if abs(s - 1.0) < 1e-12 else (k ** (1 - s) - m ** (1 - s)) / (1 - s)
    ends = (m ** -s + k ** -s) / 2
    derivative = s * (m ** (-s - 1) - k ** (-s - 1)) / 12
    return total + integral + ends + derivative


def _interpolate_profile(
    hot_rows: tuple[int, ...], share: tuple[float, ...], num_rows: int, cache_rows: int
) -> float:
    """Piecewise-linear interpolation of the cumulative share, (0,0) to (n,1)."""
    xs = (0, *hot_rows, num_rows)
    ys = (0.0, *share, 1.0)
    for i in range(1, len(xs)):
        if cache_rows <= xs[i]:
            span = xs[i] - xs[i - 1]
            frac = (cache_rows - xs[i - 1]) / span if span else 1.0
            return ys[i - 1] + frac * (ys[i] - ys[i - 1])
    return 1.0


@dataclass(frozen=True, slots=True)
class TableSpec:
    """One embedding table."""

    name: str
    num_embeddings: int
    embedding_dim: int
    pooling_factor: float
    """Mean ids looked up per sample."""
    dtype: DType = DType.FP32
    access: AccessProfile = field(default_factory=AccessProfile)
    optimizer: Optimizer = Optimizer.SGD

    @property
    def row_bytes(self) -> int:
        return self.embedding_dim * self.dtype.bytes

    @property
    def weight_bytes(self) -> int:
        return self.num_embeddings * self.row_bytes

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "pooling_factor": self.pooling_factor,
            "dtype": self.dtype.value,
        }
        access = self.access.to_json()
        if access is not None:
            out["access"] = access
        if self.optimizer is not Optimizer.SGD:
            out["optimizer"] = self.optimizer.value
        return out


@dataclass(frozen=True, slots=True)
class TablesSpec:
    """The tables of one model, in feature order."""

    tables: tuple[TableSpec, ...]
    description: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tables": [t.to_json() for t in self.tables]}
        if self.description:
            out["description"] = self.description
        return out

    def sha256(self) -> str:
        """Hash of the content that planning depends on (not the description)."""
        return _sha256([t.to_json() for t in self.tables])

    def by_name(self, name: str) -> TableSpec:
        for table in self.tables:
            if table.name == name:
                return table
        raise KeyError(name)


DENSE_RATES = ("dense_gflops", "dense_gbps", "dense_step_ms")
"""Optional measured numbers that predict the dense part of a step (not planning inputs)."""
OVERHEADS = ("shard_overhead_ms", "cache_shard_overhead_ms", "cache_ns_per_miss",
             "cache_ns_per_lookup", "cache_ns_per_overflow_row", "optimizer_ns_per_id")
"""Optional measured fixed costs of the runtime (0: none, as on a datasheet)."""


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    hbm_gb: float
    hbm_gbps: float
    dense_gflops: float | None = None
    """fp32 matrix-multiply rate (GFLOP/s) of the dense MLPs, measured by
    ``dlrm-plan calibrate``. The planner does not use it (dense work is the same on
    every device whatever the plan); ``dlrm-run`` uses it to predict step times."""
    dense_gbps: float | None = None
    """Rate (GB/s) at which the dense step moves its activations and parameters (the
    element-wise and memory-bound part of narrow MLPs), measured and used likewise."""
    dense_step_ms: float | None = None
    """Fixed time of one dense step whatever its size (operator dispatch, autograd,
    optimizer calls), measured and used likewise."""
    shard_overhead_ms: float = 0.0
    """Time per shard per step beyond moving its bytes (dispatch, id routing, kernel
    launches), measured by ``dlrm-plan calibrate`` on this runtime; a planning input."""
    cache_shard_overhead_ms: float = 0.0
    """Time per cached shard per step beyond an in-memory shard's (the row cache's
    per-call work: index probes, slot bookkeeping, its fused update), measured
    likewise; a planning input."""
    cache_ns_per_miss: float = 0.0
    """Row-cache work per miss of a cached shard beyond moving its bytes (fetch,
    install, eviction, write-back bookkeeping), measured likewise; a planning input."""
    cache_ns_per_lookup: float = 0.0
    """Row-cache work per looked-up id of a cached shard, hit or miss (index probe,
    policy stamps, slot gather and fused update), measured likewise; a planning input."""
    cache_ns_per_overflow_row: float = 0.0
    """Row-cache work per row of a batch that finds no slot (a batch with more distinct
    rows than the cache has slots: the excess rows are read, pooled and updated in the
    store directly), measured likewise; a planning input."""
    optimizer_ns_per_id: float = 0.0
    """Work per looked-up id of an in-memory shard whose optimizer keeps state
    (row-wise Adagrad, Adam) beyond moving its bytes: the row optimizer sums the
    gradients of repeated rows first (a sort of the step's ids), measured likewise;
    a planning input."""


@dataclass(frozen=True, slots=True)
class HostSpec:
    dram_gb: float
    dram_gbps: float
    h2d_gbps: float


@dataclass(frozen=True, slots=True)
class StoreSpec:
    read_gbps: float
    write_gbps: float


@dataclass(frozen=True, slots=True)
class NetworkSpec:
    intra_host_gbps: float
    inter_host_gbps: float
    """Per device: each device's own share of its host's network links."""
    collective_latency_us: float | None = None
    """Fixed time of one collective whatever its size; None: the datasheet default
    (:data:`planner.inputs.cost.DEFAULT_COLLECTIVE_LATENCY_US`). Measured by
    ``dlrm-plan calibrate``; step predictions use it, the planner does not (the same
    on every device)."""


@dataclass(frozen=True, slots=True)
class Topology:
    """Identical hosts of identical devices; device ``d`` lives on host ``d // devices_per_host``."""

    hosts: int
    devices_per_host: int
    device: DeviceSpec
    host: HostSpec
    store: StoreSpec
    network: NetworkSpec
    batch_size_per_device: int
    reserved_hbm_gb: float = 0.0
    description: str = ""
    calibration: tuple[tuple[str, str], ...] = ()
    """Where measured numbers came from (``dlrm-plan calibrate``): date, machine, method."""

    @property
    def world_size(self) -> int:
        return self.hosts * self.devices_per_host

    @property
    def global_batch_size(self) -> int:
        return self.batch_size_per_device * self.world_size

    @property
    def usable_hbm_bytes(self) -> int:
        """HBM per device available to embedding tables."""
        return int((self.device.hbm_gb - self.reserved_hbm_gb) * GB)

    def host_of(self, device: int) -> int:
        return device // self.devices_per_host

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for key in DENSE_RATES:
            if out["device"][key] is None:
                del out["device"][key]
        for key in OVERHEADS:  # older files and datasheet topologies have none
            if not out["device"][key]:
                del out["device"][key]
        if out["network"]["collective_latency_us"] is None:
            del out["network"]["collective_latency_us"]
        if not self.description:
            del out["description"]
        if self.calibration:
            out["calibration"] = dict(self.calibration)
        else:
            del out["calibration"]
        return out

    def sha256(self) -> str:
        out = self.to_json()
        out.pop("description", None)
        out.pop("calibration", None)
        for key in DENSE_RATES:  # not planning inputs
            out["device"].pop(key, None)
        out["network"].pop("collective_latency_us", None)
        return _sha256(out)


def _sha256(obj: object) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------- reading


def read_document(path: str | Path) -> Any:
    """Parse a JSON or TOML file; a syntax error becomes a :class:`SpecError`."""
    path = Path(path)
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(name, "<file>", "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(name, "<file>", f"cannot read: {exc}") from None
    if path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise SpecError(name, "<file>", f"invalid TOML: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(name, "<file>", f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None


def load_tables(path: str | Path) -> TablesSpec:
    """Read and validate a tables spec file."""
    return parse_tables(read_document(path), str(path))


def load_topology(path: str | Path) -> Topology:
    """Read and validate a topology spec file."""
    return parse_topology(read_document(path), str(path))


def parse_tables(doc: object, file: str = "<memory>") -> TablesSpec:
    """Validate a parsed tables spec (a dict with ``tables`` and optional ``description``)."""
    _check_kind(doc, file, "tables spec", lambda d: isinstance(d.get("tables"), list))
    root = Fields(doc, file, "")
    description = root.string("description", default="")
    entries = root.items("tables")
    root.done()
    tables = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        table = _parse_table(Fields(entry, file, f"tables[{i}]"))
        if table.name in seen:
            raise SpecError(file, f"tables[{i}].name",
                            f"duplicate table name (also tables[{seen[table.name]}])", table.name)
        seen[table.name] = i
        tables.append(table)
    for i, table in enumerate(tables):
        _check_table_size(table, file, f"tables[{i}]")
    return TablesSpec(tables=tuple(tables), description=description)


TABLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
"""What a table name may be: it names the table's files and arrays (the table store's
own rule, ``storage.layout.check_table_name``, is the same)."""
MAX_TABLE_NAME_CHARS = 96
"""At most this long, so that a row shard's store table, ``<name>.rows-<start>-<end>``,
stays within the store's 128 characters."""


def table_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a table (None when it can)."""
    if not TABLE_NAME.fullmatch(name):
        return ("must be letters, digits, '_', '.' and '-', starting with a letter or "
                "digit (it names files and arrays)")
    if len(name) > MAX_TABLE_NAME_CHARS:
        return f"must have at most {MAX_TABLE_NAME_CHARS} characters, not {len(name)}"
    return None


def _check_kind(doc: object, file: str, wanted: str, looks_right) -> None:
    """A file of another kind (a plan, a topology, a tables spec, constraints) given
    where ``wanted`` is expected is named as what it is."""
    if not isinstance(doc, Mapping):
        return
    if "schema_version" in doc and "tables_spec" in doc:
        kind = "a plan"
    elif looks_right(doc):
        return
    elif "schema_version" in doc:
        kind = "a plan"
    elif isinstance(doc.get("tables"), list):
        kind = "a tables spec"
    elif "devices_per_host" in doc or "hosts" in doc:
        kind = "a topology spec"
    elif isinstance(doc.get("tables"), Mapping) or "colocate" in doc or "separate" in doc:
        kind = "a constraints file"
    else:
        return
    raise SpecError(file, "<file>", f"this is {kind}, not a {wanted}")


def _parse_table(f: Fields) -> TableSpec:
    name = f.string("name")
    problem = table_name_problem(name)
    if problem is not None:
        raise f.error("name", problem, name)
    rows = f.integer("num_embeddings")
    dim = f.integer("embedding_dim")
    pooling = f.number("pooling_factor")
    dtype = DType(f.string("dtype", default="fp32", choices=[d.value for d in DType]))
    optimizer = Optimizer(f.string("optimizer", default="sgd", choices=[o.value for o in Optimizer]))
    access = _parse_access(f.child("access"), rows) if f.has("access") else AccessProfile()
    f.done()
    return TableSpec(name, rows, dim, pooling, dtype, access, optimizer)


def _parse_access(f: Fields, num_rows: int) -> AccessProfile:
    if f.has("zipf"):
        s = f.number("zipf")
        f.done()
        return AccessProfile(zipf=s)
    if f.has("hot_rows") or f.has("share"):
        hot = f.items("hot_rows")
        share = f.items("share")
        f.done()
        if len(hot) != len(share):
            raise f.error("share", f"must have as many entries as hot_rows ({len(hot)})", share)
        prev_k, prev_s = 0, 0.0
        for i, (k, s) in enumerate(zip(hot, share)):
            if isinstance(k, bool) or not isinstance(k, int) or not prev_k < k <= num_rows:
                raise f.error(f"hot_rows[{i}]",
                              f"must be integers increasing within 1..{num_rows}", k)
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not prev_s <= s <= 1.0:
                raise f.error(f"share[{i}]", "must be numbers non-decreasing within 0..1", s)
            prev_k, prev_s = k, float(s)
        return AccessProfile(hot_rows=tuple(hot), share=tuple(float(s) for s in share))
    f.done()
    raise f.error("zipf", 'access needs "zipf" or "hot_rows" and "share"')


def parse_topology(doc: object, file: str = "<memory>") -> Topology:
    """Validate a parsed topology spec."""
    _check_kind(doc, file, "topology spec", lambda d: "devices_per_host" in d or "hosts" in d)
    root = Fields(doc, file, "")
    description = root.string("description", default="")
    hosts = root.integer("hosts")
    per_host = root.integer("devices_per_host")
    dev = root.child("device")
    device = DeviceSpec(dev.number("hbm_gb"), dev.number("hbm_gbps"),
                        *(dev.number(key) if dev.has(key) else None for key in DENSE_RATES),
                        *(dev.number(key, positive=False, default=0.0) for key in OVERHEADS))
    dev.done()
    h = root.child("host")
    host = HostSpec(h.number("dram_gb"), h.number("dram_gbps"), h.number("h2d_gbps"))
    h.done()
    s = root.child("store")
    store = StoreSpec(s.number("read_gbps"), s.number("write_gbps"))
    s.done()
    n = root.child("network")
    network = NetworkSpec(n.number("intra_host_gbps"), n.number("inter_host_gbps"),
                          n.number("collective_latency_us", positive=False)
                          if n.has("collective_latency_us") else None)
    n.done()
    batch = root.integer("batch_size_per_device")
    reserved = root.number("reserved_hbm_gb", positive=False, default=0.0, below=device.hbm_gb)
    calibration: tuple[tuple[str, str], ...] = ()
    if root.has("calibration"):
        record = root.child("calibration")
        raw = root.raw("calibration")
        calibration = tuple((str(k), record.string(k)) for k in raw)
        record.done()
    root.done()
    topology = Topology(hosts, per_host, device, host, store, network, batch, reserved,
                        description, calibration)
    _check_topology_size(topology, file)
    return topology


def table_bytes(table: TableSpec) -> int:
    """Bytes of a table's weights and optimizer state."""
    return table.num_embeddings * (
        table.row_bytes + table.optimizer.state_bytes_per_row(table.embedding_dim))


def _check_table_size(table: TableSpec, file: str, path: str) -> None:
    size = table_bytes(table)
    if size > MAX_TABLE_BYTES:
        field = "num_embeddings" if table.num_embeddings > table.embedding_dim else "embedding_dim"
        raise SpecError(file, f"{path}.{field}",
                        f"table {table.name!r}: {table.num_embeddings} rows x "
                        f"{table.embedding_dim} columns take {size} bytes with its dtype and "
                        f"optimizer state, above the limit of {MAX_TABLE_BYTES} (2**53) bytes",
                        getattr(table, field))


def _check_topology_size(topology: Topology, file: str) -> None:
    if topology.world_size > MAX_DEVICES:
        field = "devices_per_host" if topology.devices_per_host > topology.hosts else "hosts"
        raise SpecError(file, field,
                        f"{topology.hosts} hosts x {topology.devices_per_host} devices is "
                        f"{topology.world_size} devices, above the planner's limit of "
                        f"{MAX_DEVICES}", getattr(topology, field))
    for field, value in (("device.hbm_gb", topology.device.hbm_gb),
                         ("host.dram_gb", topology.host.dram_gb)):
        if value > MAX_MEMORY_GB:
            raise SpecError(file, field, f"above the limit of {MAX_MEMORY_GB:g} GB", value)


def check_limits(tables: TablesSpec, topology: Topology, file: str = "<memory>") -> None:
    """The documented size limits (:data:`MAX_TABLE_BYTES`, :data:`MAX_DEVICES`,
    :data:`MAX_MEMORY_GB`) for specs built in Python; the readers check them too.
    Raises :class:`SpecError` naming the table and field."""
    for i, table in enumerate(tables.tables):
        _check_table_size(table, file, f"tables[{i}]")
    _check_topology_size(topology, file)


def as_tables(obj: TablesSpec | Mapping[str, Any]) -> TablesSpec:
    """Accept a parsed spec or a plain dict (validated)."""
    return obj if isinstance(obj, TablesSpec) else parse_tables(obj)
