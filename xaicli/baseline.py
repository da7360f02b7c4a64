"""Comparing an evaluation with an earlier one: `xai evaluate --baseline OLD_DIR --max-regression M=D`.

The baseline is the earlier run's summary.json. Each method × metric mean of this run is compared
with the baseline's; `change` is new − old and `worse` is how much worse the metric got in its own
direction (old − new when higher is better, new − old when lower is better; |new − old| when the
metric has no direction). A tolerance key names a metric for every method (`pixel_flipping`) or one
method (`lrp/pixel_flipping`, which wins); a pair regresses when `worse` exceeds its tolerance.
Only metrics (and details) named by a tolerance are checked; all top-level metrics are shown.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from .errors import UsageError


@dataclass(frozen=True)
class Change:
    """One method × metric mean against the baseline's."""

    method: str
    metric: str
    old: float | None
    new: float | None
    higher_is_better: bool | None
    tolerance: float | None  # None: shown, not checked

    @property
    def change(self) -> float | None:
        return None if self.old is None or self.new is None else self.new - self.old

    @property
    def worse(self) -> float | None:
        """How much worse the metric got in its direction (negative: it improved)."""
        if self.change is None:
            return None
        if self.higher_is_better is None:
            return abs(self.change)
        return -self.change if self.higher_is_better else self.change

    @property
    def regressed(self) -> bool:
        """Checked and worse than the tolerance allows, or checked and gone from this run."""
        if self.tolerance is None:
            return False
        if self.new is None and self.old is not None:
            return True
        return self.worse is not None and self.worse > self.tolerance

    @property
    def reason(self) -> str:
        """One line for the console, summary.md and junit.xml."""
        if self.old is None:
            return f"{self.method}: {self.metric} has no baseline score"
        if self.new is None:
            return f"{self.method}: {self.metric} has no score in this run (baseline {_num(self.old)})"
        direction = {True: "higher is better", False: "lower is better", None: "no direction"}[self.higher_is_better]
        text = (f"{self.method}: {self.metric} {_num(self.old)} -> {_num(self.new)} "
                f"(change {self.change:+.4g}, {direction})")
        if self.tolerance is not None:
            verdict = "worse by" if self.worse > 0 else "better by"
            text += f", {verdict} {abs(self.worse):.4g}; allowed {self.tolerance:.4g}"
        return text


def read_baseline(folder: str | Path) -> dict[str, Any]:
    """The summary.json of an earlier `xai evaluate` output folder; UsageError naming the file and cause."""
    path = Path(folder) / "summary.json"
    if not Path(folder).is_dir():
        raise UsageError(f"baseline {folder}: not a folder (give the output folder of an earlier `xai evaluate`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"baseline {path}: missing; the folder holds no `xai evaluate` summary") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UsageError(f"baseline {path}: cannot be read: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("metrics"), dict):
        raise UsageError(f"baseline {path}: not an `xai evaluate` summary (no `metrics` table)")
    return data


def parse_tolerance(text: str) -> tuple[str, float]:
    """`"pixel_flipping=0.05"` or `"lrp/pixel_flipping=0.05"` -> (key, 0.05); the delta is ≥ 0."""
    key, sep, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not sep or not key.strip() or not number >= 0 or math.isinf(number):
        raise UsageError(f"--max-regression {text!r}: expected METRIC=DELTA or METHOD/METRIC=DELTA with DELTA ≥ 0, "
                         f"e.g. pixel_flipping=0.05")
    return key.strip(), number


def compare(summary: Mapping[str, Any], baseline: Mapping[str, Any], tolerances: Mapping[str, float],
            methods: Sequence[str]) -> list[Change]:
    """Every method of this run × every top-level metric of either summary, and every detail a
    tolerance names; in this run's metric order, then the baseline's."""
    new, old = summary.get("metrics", {}), baseline.get("metrics", {})
    keys = [k for k in dict.fromkeys([*new, *old]) if "/" not in k or _named(k, tolerances, methods)]
    changes = []
    for metric in keys:
        direction = (new.get(metric) or old.get(metric) or {}).get("higher_is_better")
        for method in methods:
            tolerance = _tolerance(method, metric, tolerances, methods)
            before, after = _mean(old, metric, method), _mean(new, metric, method)
            if before is None and after is None:
                continue
            changes.append(Change(method, metric, before, after, direction, tolerance))
    return changes


def _mean(metrics: Mapping[str, Any], metric: str, method: str) -> float | None:
    value = metrics.get(metric, {}).get("methods", {}).get(method, {}).get("mean")
    if isinstance(value, str):  # summary.json writes infinities as "inf" / "-inf"
        value = float(value)
    return value


def _tolerance(method: str, metric: str, tolerances: Mapping[str, float], methods: Sequence[str]) -> float | None:
    own = tolerances.get(f"{method}/{metric}")
    return own if own is not None else tolerances.get(metric) if metric.split("/")[0] not in methods else None


def _named(key: str, tolerances: Mapping[str, float], methods: Sequence[str]) -> bool:
    return key in tolerances or any(f"{m}/{key}" in tolerances for m in methods)


def _num(value: float) -> str:
    return f"{value:.4g}"
