"""Method options shared by the LRP-based plugins (`lrp`, `crp`, `concept_scores`): rule settings with
the model's input box as default z^B bounds, rule mappings in their command-line form, layer lists."""
from __future__ import annotations

from typing import Any

from ..errors import UsageError
from ..imaging import normalised_value
from .composites import Settings


def settings(model: Any, epsilon: float, gamma: float, low: Any, high: Any, method: str = "lrp") -> Settings:
    """Settings of a method's rules; `low`/`high` None: pixel values 0 and 1 through the model's mean/std."""
    spec = model.spec
    if low is None:
        low = normalised_value(spec, 0.0)
    if high is None:
        high = normalised_value(spec, 1.0)
    as_bound = lambda v: tuple(float(e) for e in v) if isinstance(v, (list, tuple)) else float(v)  # noqa: E731
    for name, value in (("low", low), ("high", high)):
        if isinstance(value, (list, tuple)) and len(value) not in (1, spec.channels):
            raise UsageError(f"{method} {name}: give one value or one per input channel ({spec.channels}); got {len(value)}")
    try:
        return Settings(epsilon=epsilon, gamma=gamma, low=as_bound(low), high=as_bound(high))
    except ValueError as exc:
        raise UsageError(f"{method}: {exc}") from None


def mapping(value: dict | str | None, what: str, method: str = "lrp") -> dict[str, str]:
    """A mapping, or the command-line form "conv=gamma:0.25 linear=epsilon" (pairs split by spaces or ';')."""
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return {str(k): v for k, v in value.items()}
    pairs = [p for p in value.replace(";", " ").split() if p]
    bad = [p for p in pairs if "=" not in p]
    if bad:
        raise UsageError(f"{method} {what}: expected KEY=RULE pairs such as conv=gamma:0.25; got {bad[0]!r}")
    return dict(p.split("=", 1) for p in pairs)


def names(value: list | str) -> list[str]:
    """Layer names from a list or a comma-separated string."""
    return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else [str(v) for v in value]
