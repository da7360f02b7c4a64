"""Declared plugin parameters: one schema for recipes, `--set`, and `xai plugins show`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

_MISSING = object()
_TYPE_NAMES = {int: "int", float: "float", str: "str", bool: "bool", list: "list"}


@dataclass(frozen=True)
class Param:
    """One parameter of a plugin.

    `type` is a Python type (int, float, str, bool, list) or a tuple of them for unions
    (e.g. `(int, list)` for "a size or an [h, w] pair"). Ints are accepted for floats.
    `choices` restricts values; `low`/`high` bound numbers (inclusive).
    """

    name: str
    type: type | tuple[type, ...]
    default: Any
    doc: str
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None

    @property
    def type_name(self) -> str:
        types = self.type if isinstance(self.type, tuple) else (self.type,)
        return " | ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)

    def check(self, value: Any) -> Any:
        """Return `value` converted to this parameter's type, or raise ValueError saying why."""
        types = self.type if isinstance(self.type, tuple) else (self.type,)
        if value is None and self.default is None:
            return None
        ok = False
        for t in types:
            if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
                value, ok = float(value), True
                break
            if t is bool and isinstance(value, bool):
                ok = True
                break
            if t is not bool and t is not float and isinstance(value, t) and not (
                t is int and isinstance(value, bool)
            ):
                ok = True
                break
        if not ok:
            raise ValueError(f"expected {self.type_name}, got {type(value).__name__} {value!r}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"must be one of {', '.join(map(str, self.choices))}; got {value!r}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if self.low is not None and value < self.low:
                raise ValueError(f"must be >= {self.low}; got {value!r}")
            if self.high is not None and value > self.high:
                raise ValueError(f"must be <= {self.high}; got {value!r}")
        return value


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
    from .suggest import did_you_mean

    errors: list[ParamError] = []
    by_name = {p.name: p for p in declared}
    out: dict[str, Any] = {}
    for key, value in given.items():
        if key in reserved:
            continue
        if key not in by_name:
            errors.append(ParamError(key, f"unknown parameter{did_you_mean(key, by_name)}"))
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
