"""What a report shows, read from folders: an explain run, its evaluation and its analysis.

Inputs are keyed by their output stem (`arrays/<output>/<stem>.npz`, non-UTF-8 bytes written
`\\xNN`); metrics rows and analysis groups name inputs by relative path or stem, and `Keys.find`
maps either to the stem. Every reader raises UsageError naming the file and what is wrong with it.
"""
from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

from ..data import escaped
from ..errors import UsageError
from ..summary import Row, summarize

CURVE = re.compile(r"^(?P<metric>[^/]+)/curve_(?P<step>\d+)$")  # detail keys holding a curve point


@dataclass
class Run:
    """An `xai explain` (or evaluate) folder: manifest, failed inputs, and the arrays per method output."""

    folder: Path
    manifest: dict[str, Any]
    errors: list[dict[str, Any]]
    arrays_dir: Path | None  # arrays/ of this run, or of the run an evaluation reused (--from)
    methods: list[str]
    keys: list[str]  # input stems, sorted; the row order of everything the report holds per input
    files: dict[str, dict[str, Path]]  # method -> stem -> npz file
    labels: list[str] | None = None


@dataclass
class Evaluation:
    """Scores of an `xai evaluate` run: summary statistics, per-input scores, mean curves."""

    folder: Path
    summary: dict[str, Any]
    rows: list[Row]
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # metric -> method -> mean curve


@dataclass
class Analysis:
    """The analysis folder of `xai analyze` (analysis.json, version 1, and means/*.png)."""

    folder: Path
    data: dict[str, Any]


class Keys:
    """Maps the names metrics and analyses give inputs (relpath or stem) to the run's stems."""

    def __init__(self, keys: Iterable[str]):
        self.index = {k: i for i, k in enumerate(keys)}

    def find(self, name: str) -> int | None:
        """Row of the input called `name` (its stem, or its relpath: the stem plus an extension)."""
        name = escaped(name)
        if name in self.index:
            return self.index[name]
        last = name.rsplit("/", 1)[-1]
        return self.index.get(name.rsplit(".", 1)[0]) if "." in last else None


def read_json(path: Path, what: str) -> Any:
    """A JSON file, or UsageError naming it and the cause."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file; {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not valid JSON ({exc})") from None


def read_run(folder: Path, manifest: dict[str, Any] | None = None) -> Run:
    """The run in `folder`; `manifest` replaces run.json (a writer closing a run has not written it yet)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{folder}: no such folder; point `xai report` at the output folder of `xai explain`")
    if manifest is None:
        manifest = read_json(folder / "run.json", "not an xai run folder (no run.json)")
    if not isinstance(manifest, dict):
        raise UsageError(f"{folder / 'run.json'}: expected a JSON object")
    arrays = _arrays_dir(folder, manifest)
    methods = _methods(arrays, manifest) if arrays else []
    files = {m: _stems(arrays / m) for m in methods} if arrays else {}
    keys = sorted({k for per in files.values() for k in per})
    return Run(folder, manifest, read_errors(folder / "errors.jsonl"), arrays, methods, keys, files, _labels(folder, manifest))


def _arrays_dir(folder: Path, manifest: dict[str, Any]) -> Path | None:
    if (folder / "arrays").is_dir():
        return folder / "arrays"
    previous = (manifest.get("recipe") or {}).get("from_run")
    if previous:
        path = Path(previous) if Path(previous).is_absolute() else folder / previous
        for candidate in (path, Path(previous)):
            if (candidate / "arrays").is_dir():
                return candidate / "arrays"
    return None


def _methods(arrays: Path, manifest: dict[str, Any]) -> list[str]:
    """Method outputs with arrays, in the recipe's order (others after it, sorted)."""
    present = sorted(p.name for p in arrays.iterdir() if p.is_dir())
    ordered = [m for m in (manifest.get("recipe") or {}).get("methods", {}) if m in present]
    return ordered + [m for m in present if m not in ordered]


def _stems(folder: Path) -> dict[str, Path]:
    return {escaped(p.relative_to(folder).as_posix()[: -len(".npz")]): p for p in folder.rglob("*.npz") if p.is_file()}


def _labels(folder: Path, manifest: dict[str, Any]) -> list[str] | None:
    """Class names from the run's labels file, when it is still there."""
    name = (manifest.get("recipe") or {}).get("labels")
    if not name:
        return None
    for path in (Path(name), folder / name):
        if path.is_file():
            return [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    return None


def read_errors(path: Path) -> list[dict[str, Any]]:
    """Failed inputs of errors.jsonl (none when the file is missing)."""
    if not path.exists():
        return []
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}:{number}: not a JSON line ({exc.msg})") from None
        if isinstance(entry, dict):
            out.append({k: str(entry.get(k, "")) for k in ("path", "input", "stage", "cause")})
    return out


def read_evaluation(folder: Path) -> Evaluation:
    """metrics.csv and summary.json of an `xai evaluate` folder (directions from its run.json)."""
    folder = Path(folder)
    path = folder / "metrics.csv"
    if not path.is_file():
        raise UsageError(f"{folder}: no metrics.csv; point --evaluation at the output folder of `xai evaluate`")
    rows = _read_metrics(path)
    summary_path = folder / "summary.json"
    if summary_path.is_file():
        summary = read_json(summary_path, "")
        if not isinstance(summary, dict) or not isinstance(summary.get("metrics"), dict):
            raise UsageError(f"{summary_path}: expected an object with a 'metrics' table (written by `xai evaluate`)")
    else:
        run = folder / "run.json"
        summary = summarize(rows, read_json(run, "").get("metrics", {}) if run.is_file() else {})
    return evaluation_of(folder, summary, rows)


def evaluation_from_manifest(folder: Path, manifest: dict[str, Any]) -> Evaluation | None:
    """The evaluation a run's manifest holds (its scores), or None when it computed no metrics."""
    scores = manifest.get("scores") or []
    if not scores:
        return None
    rows = [(escaped(str(i)), str(m), str(k), float(s)) for i, m, k, s in scores]
    return evaluation_of(folder, summarize(rows, manifest.get("metrics", {})), rows)


def evaluation_of(folder: Path, summary: dict[str, Any], rows: list[Row]) -> Evaluation:
    """Split curve points (`<metric>/curve_<k>`) from the other scores: mean curves per method."""
    points: dict[str, dict[int, str]] = {}
    for key in summary["metrics"]:
        match = CURVE.match(key)
        if match:
            points.setdefault(match["metric"], {})[int(match["step"])] = key
    curves: dict[str, dict[str, list[float]]] = {}
    for metric, steps in points.items():
        ordered = [steps[k] for k in sorted(steps)]
        methods = summary["metrics"][ordered[0]]["methods"]
        curves[metric] = {m: [_finite(summary["metrics"][k]["methods"].get(m, {}).get("mean")) for k in ordered]
                          for m in methods}
    kept = [r for r in rows if not CURVE.match(r[2])]
    return Evaluation(folder, summary, kept, curves)


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _read_metrics(path: Path) -> list[Row]:
    rows = []
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"input", "method", "metric", "score"} <= set(reader.fieldnames):
            raise UsageError(f"{path}: expected the columns input, method, metric, score; got {reader.fieldnames}")
        for line, record in enumerate(reader, start=2):
            try:
                score = float(record["score"])
            except (TypeError, ValueError):
                raise UsageError(f"{path}:{line}: score {record['score']!r} is not a number") from None
            rows.append((record["input"], record["method"], record["metric"], score))
    return rows


def read_analysis(folder: Path) -> Analysis:
    """analysis.json of an `xai analyze` folder, checked against the contract the page relies on."""
    folder = Path(folder)
    path = folder / "analysis.json"
    data = read_json(path, "point --analysis at the output folder of `xai analyze`")
    if not isinstance(data, dict) or data.get("version") != 1 or not isinstance(data.get("groups"), list):
        raise UsageError(f"{path}: expected analysis.json version 1 with a 'groups' list")
    for number, group in enumerate(data["groups"]):
        _check_group(path, number, group)
    return Analysis(folder, data)


def _check_group(path: Path, number: int, group: Any) -> None:
    where = f"{path}: groups[{number}]"
    if not isinstance(group, dict):
        raise UsageError(f"{where}: expected an object")
    for key, kind in (("method", str), ("class", int), ("inputs", list), ("eigenvalues", list), ("clusterings", dict)):
        if not isinstance(group.get(key), kind):
            raise UsageError(f"{where}.{key}: expected {kind.__name__}, got {type(group.get(key)).__name__}")
    n = len(group["inputs"])
    for name, clustering in group["clusterings"].items():
        labels = clustering.get("labels") if isinstance(clustering, dict) else None
        if not isinstance(labels, list) or len(labels) != n:
            raise UsageError(f"{where}.clusterings.{name}.labels: expected {n} labels, one per input")
        for cluster, mean in (clustering.get("means") or {}).items():
            if not _inside(str(mean)):
                raise UsageError(f"{where}.clusterings.{name}.means.{cluster}: {mean!r} is not a path inside the analysis folder")
    for name, points in (group.get("views") or {}).items():
        if not isinstance(points, list) or len(points) != n:
            raise UsageError(f"{where}.views.{name}: expected {n} points, one per input")


def _inside(relative: str) -> bool:
    path = PurePosixPath(relative.replace("\\", "/"))
    return bool(relative) and not path.is_absolute() and ".." not in path.parts and ":" not in relative
