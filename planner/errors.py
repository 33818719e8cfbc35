"""Typed errors of the planner.

Every error subclasses :class:`PlannerError` and a builtin, so callers can catch
either. The CLI maps each type to one exit code in one place (``cli/errors.py``).
"""

from __future__ import annotations

import enum


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()
"""Sentinel for a field that is absent (distinct from a JSON null)."""


class PlannerError(Exception):
    """Base of every error the planner raises on purpose."""


class SpecError(PlannerError, ValueError):
    """A tables or topology spec is malformed.

    ``file`` is the spec's path (or ``"<memory>"``), ``field`` the JSON path of the
    offending field (``tables[3].num_embeddings``) and ``value`` what was found.
    """

    def __init__(self, file: str, field: str, problem: str, value: object = _MISSING) -> None:
        self.file = file
        self.field = field
        self.problem = problem
        self.value = value
        shown = "" if value is _MISSING else f", got {value!r}"
        super().__init__(f"{file}: {field}: {problem}{shown}")


class Resource(enum.Enum):
    """The resource that makes a problem infeasible."""

    HBM = "hbm"
    DRAM = "dram"


class InfeasibleError(PlannerError, ValueError):
    """No plan satisfies the capacity constraints.

    ``resource`` is the binding resource, ``tables`` the table(s) concerned (empty
    when the shortfall is in the total), ``shortfall_bytes`` how much is missing.
    """

    def __init__(
        self,
        resource: Resource,
        shortfall_bytes: int,
        detail: str,
        tables: tuple[str, ...] = (),
        fixes: tuple[str, ...] = (),
    ) -> None:
        self.resource = resource
        self.shortfall_bytes = shortfall_bytes
        self.tables = tables
        self.fixes = fixes
        hint = f" Fixes: {'; '.join(fixes)}." if fixes else ""
        super().__init__(
            f"infeasible: {resource.value} short by {shortfall_bytes} bytes: {detail}.{hint}"
        )


class SolverError(PlannerError, RuntimeError):
    """The MIP solver failed or returned no usable solution."""


class PlanFileError(PlannerError, ValueError):
    """A plan file is unreadable, of another schema version, or inconsistent."""

    def __init__(self, file: str, problem: str) -> None:
        self.file = file
        self.problem = problem
        super().__init__(f"{file}: {problem}")


class CapacityError(PlannerError, ValueError):
    """A given plan does not fit: some device's HBM or some host's DRAM overflows.

    ``overflows`` lists each one as ``(resource, where, used_bytes, capacity_bytes)``
    with ``where`` like ``"device 3"`` or ``"host 0"``.
    """

    def __init__(self, overflows: tuple[tuple[Resource, str, int, int], ...]) -> None:
        self.overflows = overflows
        parts = [f"{where} {resource.value.upper()} needs {used / 1e9:.3f} GB, has "
                 f"{capacity / 1e9:.3f} GB (over by {(used - capacity) / 1e9:.3f} GB)"
                 for resource, where, used, capacity in overflows]
        super().__init__("the plan does not fit: " + "; ".join(parts))
