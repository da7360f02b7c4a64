"""Metric summaries for `xai evaluate`: per method × metric statistics, method rankings, threshold
checks and JUnit XML for CI. Pure functions over score rows (input, method output, metric, score).

Metric keys are metric output names (`pixel_flipping`) or their details (`mprt/layer4.1.conv2`).
Threshold keys name a metric key for every method, or `method/metric` for one method (a key whose
first part is a method name); method-specific bounds override general ones.
"""
from __future__ import annotations

import math
import statistics
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from .errors import UsageError

Row = tuple[str, str, str, float]  # (input relpath, method output name, metric key, score)


@dataclass(frozen=True)
class Violation:
    """A threshold a method's mean score breaks (or cannot be checked for lack of scores)."""

    method: str
    metric: str
    bound: str  # "min", "max", or "missing" when there is no finite score to check
    limit: float
    value: float | None
    reason: str  # one line, e.g. "saliency: pixel_flipping mean 0.41 > max 0.30"


def summarize(rows: Iterable[Row], higher_is_better: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Aggregate rows per metric × method: mean, std (sample), median, min, max, n (finite scores)
    and n_nan (NaN scores, excluded from the statistics); rank methods by mean for every metric
    whose direction is known (`higher_is_better`: key -> bool or {"higher_is_better": bool}).

    Returns {"methods": [...], "metrics": {key: {"higher_is_better": bool | None,
    "ranking": [best method, ...], "methods": {method: {...statistics, "rank": int | None}}}}}.
    """
    directions = {k: _direction(v) for k, v in (higher_is_better or {}).items()}
    scores: dict[str, dict[str, list[float]]] = {}
    methods: dict[str, None] = {}
    for _, method, metric, score in rows:
        methods.setdefault(method, None)
        scores.setdefault(metric, {}).setdefault(method, []).append(float(score))
    metrics = {}
    for metric, per_method in scores.items():
        direction = directions.get(metric)
        stats = {method: _stats(values) for method, values in per_method.items()}
        ranking = _rank(stats, direction)
        for method, entry in stats.items():
            entry["rank"] = ranking.index(method) + 1 if method in ranking else None
        metrics[metric] = {"higher_is_better": direction, "ranking": ranking, "methods": stats}
    return {"methods": list(methods), "metrics": metrics}


def _direction(value: Any) -> bool | None:
    if isinstance(value, Mapping):
        value = value.get("higher_is_better")
    return None if value is None else bool(value)


def _stats(values: list[float]) -> dict[str, Any]:
    finite = [v for v in values if not math.isnan(v)]
    n = len(finite)
    return {
        "n": n,
        "n_nan": len(values) - n,
        "mean": statistics.fmean(finite) if n else None,
        "std": statistics.stdev(finite) if n > 1 else (0.0 if n else None),
        "median": statistics.median(finite) if n else None,
        "min": min(finite) if n else None,
        "max": max(finite) if n else None,
    }


def _rank(stats: Mapping[str, Mapping[str, Any]], higher_is_better: bool | None) -> list[str]:
    """Methods with a mean, best first (ties keep first-seen order); [] when the direction is unknown."""
    if higher_is_better is None:
        return []
    scored = [m for m, s in stats.items() if s["mean"] is not None]
    return sorted(scored, key=lambda m: -stats[m]["mean"] if higher_is_better else stats[m]["mean"])


def parse_threshold(text: str) -> tuple[str, float]:
    """`"pixel_flipping=0.3"` or `"saliency/pixel_flipping=0.3"` -> (key, 0.3); the bound (min or
    max) comes from the flag the text was given to."""
    key, sep, value = text.partition("=")
    key = key.strip()
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not sep or not key or math.isnan(number):
        raise UsageError(f"threshold {text!r}: expected METRIC=VALUE or METHOD/METRIC=VALUE, e.g. pixel_flipping=0.3")
    return key, number


def check_thresholds(
    summary: Mapping[str, Any], thresholds: Mapping[str, Mapping[str, float]], methods: Sequence[str] | None = None,
) -> list[Violation]:
    """Every (method, metric, bound) whose mean score is below `min` or above `max`, plus every
    thresholded metric a method has no finite score for. `methods` defaults to the summary's."""
    methods = list(methods if methods is not None else summary.get("methods", []))
    violations = []
    for method in methods:
        for metric, bounds in _bounds_for(method, thresholds, methods).items():
            stats = summary.get("metrics", {}).get(metric, {}).get("methods", {}).get(method)
            violations.extend(_check(method, metric, bounds, stats))
    return violations


def _bounds_for(method: str, thresholds: Mapping[str, Mapping[str, float]], methods: Sequence[str]) -> dict[str, dict[str, float]]:
    """metric key -> {min/max: limit} that apply to `method`; its own `method/metric` keys win."""
    general: dict[str, dict[str, float]] = {}
    specific: dict[str, dict[str, float]] = {}
    for key, bounds in thresholds.items():
        owner, _, rest = key.partition("/")
        if rest and owner in methods:
            if owner == method:
                specific.setdefault(rest, {}).update(bounds)
        else:
            general.setdefault(key, {}).update(bounds)
    for metric, bounds in specific.items():
        general.setdefault(metric, {}).update(bounds)
    return general


def _check(method: str, metric: str, bounds: Mapping[str, float], stats: Mapping[str, Any] | None) -> list[Violation]:
    if not stats or stats.get("mean") is None:
        nan = f" ({stats['n_nan']} NaN)" if stats and stats.get("n_nan") else ""
        limit = bounds.get("min", bounds.get("max", math.nan))
        return [Violation(method, metric, "missing", limit, None, f"{method}: {metric} has no finite scores{nan}")]
    mean = stats["mean"]
    out = []
    for bound, broken, sign in (("min", lambda m, l: m < l, "<"), ("max", lambda m, l: m > l, ">")):
        if bound in bounds and broken(mean, bounds[bound]):
            shown, limit = _pair(mean, bounds[bound])
            out.append(Violation(method, metric, bound, bounds[bound], mean, f"{method}: {metric} mean {shown} {sign} {bound} {limit}"))
    return out


def _pair(value: float, limit: float) -> tuple[str, str]:
    """Both numbers with the fewest decimals (at least 2) that tell them apart."""
    for digits in range(2, 10):
        a, b = f"{value:.{digits}f}", f"{limit:.{digits}f}"
        if a != b:
            return a, b
    return repr(value), repr(limit)


def junit_xml(
    summary: Mapping[str, Any], thresholds: Mapping[str, Mapping[str, float]], violations: Sequence[Violation],
    time: float = 0.0, name: str = "xai evaluate", regressions: Sequence[Any] = (),
) -> str:
    """JUnit XML: one testsuite, one testcase per method × metric (classname `xai.<method>`, name the
    metric key; details keys only when thresholded), a <failure> per violation; the statistics are in
    each case's <system-out>. Unthresholded cases pass: they record the scores. Each regression check
    against a baseline (`xaicli.baseline.Change` with a tolerance) is a case `<metric> vs baseline`."""
    stats = summary.get("metrics", {})
    keys = [k for k in stats if "/" not in k or _thresholded(k, thresholds)]
    cases: dict[tuple[str, str], list[Violation]] = {(m, k): [] for k in keys for m in stats[k]["methods"]}
    for v in violations:
        cases.setdefault((v.method, v.metric), []).append(v)
    suite = ET.Element("testsuite", name=name, tests=str(len(cases)), failures=str(sum(1 for v in cases.values() if v)),
                       errors="0", skipped="0", time=f"{time:.3f}")
    for (method, metric), broken in cases.items():
        case = ET.SubElement(suite, "testcase", classname=f"xai.{method}", name=metric, time="0")
        for v in broken:
            ET.SubElement(case, "failure", message=v.reason, type=f"threshold.{v.bound}").text = v.reason
        entry = stats.get(metric, {}).get("methods", {}).get(method)
        if entry:
            ET.SubElement(case, "system-out").text = " ".join(f"{k}={_show(entry[k])}" for k in ("mean", "std", "median", "n", "n_nan"))
    for change in regressions:
        case = ET.SubElement(suite, "testcase", classname=f"xai.{change.method}", name=f"{change.metric} vs baseline", time="0")
        if change.regressed:
            ET.SubElement(case, "failure", message=change.reason, type="regression").text = change.reason
        ET.SubElement(case, "system-out").text = change.reason
    failed = sum(1 for v in cases.values() if v) + sum(1 for c in regressions if c.regressed)
    suite.set("tests", str(len(cases) + len(regressions)))
    suite.set("failures", str(failed))
    root = ET.Element("testsuites", name="xai", tests=suite.get("tests"), failures=suite.get("failures"), errors="0",
                      time=suite.get("time"))
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _thresholded(key: str, thresholds: Mapping[str, Any]) -> bool:
    return key in thresholds or any(k.endswith("/" + key) for k in thresholds)


def _show(value: Any) -> str:
    return "null" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)
