"""Declared plugin parameters: one schema for recipes, `--set`, and `xai plugins show`."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

_MISSING = object()
_TYPE_NAMES = {int: "int", float: "float", str: "str", bool: "bool", list: "list", dict: "dict"}
INT_RANGE = (-(2**63), 2**63 - 1)
"""Every int parameter fits in int64 (torch and numpy take it without overflow)."""


@dataclass(frozen=True)
class Param:
    """One parameter of a plugin.

    `type` is a Python type (int, float, str, bool, list, dict) or a tuple of them for unions
    (e.g. `(int, list)` for "a size or an [h, w] pair"). Ints are accepted for floats; floats
    must be finite, ints fit in int64 and strings hold no NUL character.
    `choices` restricts values; `low`/`high` bound numbers (inclusive).
    A list value takes `item` (default: the union's scalar type, e.g. int for `(int, list)`) for
    each element, which `low`/`high` then bound too; `length` fixes its length.
    """

    name: str
    type: type | tuple[type, ...]
    default: Any
    doc: str
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    item: type | None = None
    length: int | None = None

    @property
    def type_name(self) -> str:
        types = self.type if isinstance(self.type, tuple) else (self.type,)
        return " | ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)

    def check(self, value: Any) -> Any:
        """Return `value` converted to this parameter's type, or raise ValueError saying why."""
        types = self.type if isinstance(self.type, tuple) else (self.type,)
        if value is None and self.default is None:
            return None
        converted = _convert(value, types)
        if converted is _MISSING:
            raise ValueError(f"expected {self.type_name}, got {_describe(value)}")
        if isinstance(converted, list):
            return self._check_list(converted, types)
        if self.choices is not None and converted not in self.choices:
            raise ValueError(f"must be one of {', '.join(map(str, self.choices))}; got {short_repr(value)}")
        self._check_scalar(converted)
        return converted

    def _check_list(self, values: list, types: tuple[type, ...]) -> list:
        if self.length is not None and len(values) != self.length:
            raise ValueError(f"expected {self.length} values; got {len(values)}: {short_repr(values)}")
        item = self.item or next((t for t in types if t in (int, float, str, bool)), None)
        if item is None:
            return values
        out = []
        for i, value in enumerate(values):
            converted = _convert(value, (item,))
            try:
                if converted is _MISSING:
                    raise ValueError(f"expected {_TYPE_NAMES[item]}, got {_describe(value)}")
                self._check_scalar(converted)
            except ValueError as exc:
                raise ValueError(f"item {i} of {short_repr(values)}: {exc}") from None
            out.append(converted)
        return out

    def _check_scalar(self, value: Any) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"must be a finite number; got {value!r}")
        if isinstance(value, int) and not isinstance(value, bool) and not INT_RANGE[0] <= value <= INT_RANGE[1]:
            raise ValueError(f"must be between -2**63 and 2**63-1; got {short_repr(value)}")
        if isinstance(value, str) and "\0" in value:
            raise ValueError(f"must not contain a NUL character; got {short_repr(value)}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if self.low is not None and value < self.low:
                raise ValueError(f"must be >= {self.low}; got {short_repr(value)}")
            if self.high is not None and value > self.high:
                raise ValueError(f"must be <= {self.high}; got {short_repr(value)}")


def _convert(value: Any, types: tuple[type, ...]) -> Any:
    """`value` as the first of `types` it is (ints widen to float), or _MISSING."""
    for t in types:
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an int beyond float range: let the range check name it
                return value
        if t is bool and isinstance(value, bool):
            return value
        if t is not bool and t is not float and isinstance(value, t) and not (t is int and isinstance(value, bool)):
            return value
    return _MISSING


def short_repr(value: Any, limit: int = 60) -> str:
    """repr of `value`, cut to `limit` characters (a 4,000-digit int or a long list stays readable)."""
    big = isinstance(value, int) and abs(value) > 10**limit  # repr refuses ints past 4,300 digits
    text = f"<int of {value.bit_length()} bits>" if big else repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {short_repr(value)}"


class ParamError(ValueError):
    """A parameter problem, with the key (relative to the plugin's mapping) it concerns."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def resolve(declared: Sequence[Param], given: Mapping[str, Any], reserved: Iterable[str] = ()) -> dict[str, Any]:
    """Check `given` against `declared` and fill in defaults; raise a list of ParamError.

    Keys in `reserved` (such as `method`) are skipped; unknown keys get a suggestion.
    """
    from .suggest import MAX_SUGGESTED, did_you_mean

    errors: list[ParamError] = []
    by_name = {p.name: p for p in declared}
    out: dict[str, Any] = {}
    unknown = 0
    for key, value in given.items():
        if key in reserved:
            continue
        if key not in by_name:
            hint = did_you_mean(str(key), by_name) if unknown < MAX_SUGGESTED else ""
            errors.append(ParamError(key, f"unknown parameter{hint}"))
            unknown += 1
            continue
        try:
            out[key] = by_name[key].check(value)
        except ValueError as exc:
            errors.append(ParamError(key, str(exc)))
    for p in declared:
        out.setdefault(p.name, p.default)
    if errors:
        raise ParamErrors(errors)
    return out


class ParamErrors(ValueError):
    """Several ParamError at once, so a user sees every problem in one go."""

    def __init__(self, errors: list[ParamError]):
        super().__init__("; ".join(str(e) for e in errors))
        self.errors = errors
