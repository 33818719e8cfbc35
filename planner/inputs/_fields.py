"""A strict reader of JSON-like objects that reports errors by file and field path."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from planner.errors import _MISSING, SpecError


class Fields:
    """Reads the keys of one JSON object; every problem becomes a :class:`SpecError`.

    Call :meth:`done` after reading to reject keys that were never asked for.
    """

    def __init__(self, obj: object, file: str, path: str) -> None:
        if not isinstance(obj, Mapping):
            raise SpecError(file, path or "<root>", "must be an object", obj)
        self._obj = obj
        self._file = file
        self._path = path
        self._seen: set[str] = set()

    def _at(self, key: str) -> str:
        return f"{self._path}.{key}" if self._path else key

    def error(self, key: str, problem: str, value: object = _MISSING) -> SpecError:
        return SpecError(self._file, self._at(key), problem, value)

    def _get(self, key: str, required: bool) -> Any:
        self._seen.add(key)
        if key not in self._obj:
            if required:
                raise self.error(key, "is required")
            return _MISSING
        return self._obj[key]

    def has(self, key: str) -> bool:
        return key in self._obj

    def child(self, key: str) -> "Fields":
        value = self._get(key, required=True)
        return Fields(value, self._file, self._at(key))

    def raw(self, key: str, required: bool = True) -> Any:
        value = self._get(key, required)
        return None if value is _MISSING else value

    def integer(self, key: str, minimum: int = 1) -> int:
        value = self._get(key, required=True)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, "must be an integer", value)
        if value < minimum:
            raise self.error(key, f"must be >= {minimum}", value)
        return value

    def number(
        self,
        key: str,
        *,
        positive: bool = True,
        default: float | None = None,
        below: float | None = None,
    ) -> float:
        value = self._get(key, required=default is None)
        if value is _MISSING:
            return float(default)  # type: ignore[arg-type]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(key, "must be a number", value)
        if not math.isfinite(value):
            raise self.error(key, "must be finite", value)
        if positive and value <= 0:
            raise self.error(key, "must be > 0", value)
        if not positive and value < 0:
            raise self.error(key, "must be >= 0", value)
        if below is not None and value >= below:
            raise self.error(key, f"must be < {below}", value)
        return float(value)

    def string(self, key: str, *, default: str | None = None, choices: Iterable[str] = ()) -> str:
        value = self._get(key, required=default is None)
        if value is _MISSING:
            return default  # type: ignore[return-value]
        if not isinstance(value, str) or not value:
            raise self.error(key, "must be a non-empty string", value)
        allowed = tuple(choices)
        if allowed and value not in allowed:
            raise self.error(key, f"must be one of {', '.join(allowed)}", value)
        return value

    def items(self, key: str) -> list[Any]:
        value = self._get(key, required=True)
        if not isinstance(value, list) or not value:
            raise self.error(key, "must be a non-empty list", value)
        return value

    def done(self) -> None:
        unknown = sorted(set(self._obj) - self._seen)
        if unknown:
            key = unknown[0]
            raise self.error(key, f"unknown key (allowed: {', '.join(sorted(self._seen))})",
                             self._obj[key])
