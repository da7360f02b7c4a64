"""Metric report writers: `metrics_csv` (every score), `summary` (summary.json, summary.md) and
`junit` (junit.xml for CI). They are not per input: `expected()` is empty.

Rows are (input relpath, method output, metric key, score), one per input of `BatchOutput.scores`
(metric key -> [B] scores, details keys such as `mprt/layer1` included).

What `close(run)` reads from the run manifest:
- `run["metrics"]`: metric output name -> {"higher_is_better": bool, ...} (or a bool) — rankings;
- `run["thresholds"]`: key -> {"min": x} and/or {"max": y} — junit failures, violations in summary.json;
- `run["timings"]["total"]`: seconds — junit's `time`;
- `run["baseline"]`: {"path": an earlier evaluation's folder, "max_regression": {key: delta}} or None —
  the comparison with its summary.json (summary.json, summary.md, a junit case per checked pair);
- `run["recipe"]["overwrite"]`: when false, rows of an earlier metrics.csv in the folder are kept for
  the (input, method) pairs this run did not score again (a resumed run skipped them).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

from xaicli import Writer, hookimpl
from xaicli.baseline import Change, compare, read_baseline
from xaicli.data import escaped
from xaicli.descriptors import BatchOutput, InputItem
from xaicli.io import TEMP_SUFFIX, atomic_write_bytes, storage_errors
from xaicli.summary import Row, check_thresholds, junit_xml, summarize

HEADER = ("input", "method", "metric", "score")


def batch_rows(batch: BatchOutput) -> list[Row]:
    """The score rows of one batch, input by input."""
    return [
        (escaped(item.relpath), batch.output, metric, float(values[i]))  # names that are not UTF-8: \xNN
        for i, item in enumerate(batch.items)
        for metric, values in batch.scores.items()
    ]


def is_curve_point(key: str) -> bool:
    """`pixel_flipping/curve_07`: a point of a metric's curve, summarised (mean curve) but not a score."""
    return key.rpartition("/")[2].startswith("curve_")


def read_rows(path: Path) -> Iterator[Row]:
    """Rows of an existing metrics.csv (none when the file does not exist)."""
    if not path.exists():
        return
    with open(path, newline="") as fh:
        for record in csv.DictReader(fh):
            yield record["input"], record["method"], record["metric"], float(record["score"])


def _keep_previous(run: dict[str, Any]) -> bool:
    return not run.get("recipe", {}).get("overwrite", False)


class MetricsCsvSink:
    """Appends each batch's rows to a temporary file; renamed to metrics.csv at close.

    The temporary file holds whole rows only: a write that fails (a full disk raises StorageError,
    which stops the run) is cut off again, and close renames what is whole. If close itself
    fails, the temporary file is removed and an earlier metrics.csv stays as it was.
    """

    def __init__(self, out_dir: Path):
        self.path = out_dir / "metrics.csv"
        with storage_errors(out_dir):
            out_dir.mkdir(parents=True, exist_ok=True)
            self.fd, self.tmp = tempfile.mkstemp(prefix=".metrics.csv.", suffix=TEMP_SUFFIX, dir=out_dir)
        self.size = 0  # bytes of whole rows in the temporary file
        self.scored: set[tuple[str, str]] = set()
        self.lock = threading.Lock()
        self.write_rows([HEADER])

    def expected(self, item: InputItem, output: str) -> list[Path]:
        return []

    def write(self, batch: BatchOutput) -> None:
        rows = [row for row in batch_rows(batch) if not is_curve_point(row[2])]  # scores only; curves: summary.json
        with self.lock:
            self.write_rows([(i, m, k, repr(s)) for i, m, k, s in rows])
            self.scored.update((escaped(item.relpath), batch.output) for item in batch.items)

    def write_rows(self, rows: list[tuple[str, ...]]) -> None:
        text = io.StringIO()
        csv.writer(text).writerows(rows)
        data = text.getvalue().encode()
        left = memoryview(data)
        try:
            with storage_errors(self.path):
                while left:
                    left = left[os.write(self.fd, left):]
        except BaseException:
            os.ftruncate(self.fd, self.size)
            os.lseek(self.fd, self.size, os.SEEK_SET)
            raise
        self.size += len(data)

    def close(self, run: dict[str, Any]) -> None:
        with self.lock:
            try:
                if _keep_previous(run):
                    self.write_rows([(i, m, k, repr(s)) for i, m, k, s in read_rows(self.path) if (i, m) not in self.scored])
                with storage_errors(self.path):
                    os.fsync(self.fd)
                    os.replace(self.tmp, self.path)
            except BaseException:
                try:
                    os.unlink(self.tmp)
                except FileNotFoundError:
                    pass
                raise
            finally:
                os.close(self.fd)


class _Collector:
    """Keeps every row seen (and an earlier metrics.csv's rows, read at open, for resumed runs)."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.previous = list(read_rows(out_dir / "metrics.csv"))
        self.seen: list[Row] = []
        self.lock = threading.Lock()

    def expected(self, item: InputItem, output: str) -> list[Path]:
        return []

    def write(self, batch: BatchOutput) -> None:
        rows = batch_rows(batch)
        with self.lock:
            self.seen.extend(rows)

    def rows(self, run: dict[str, Any]) -> list[Row]:
        if not _keep_previous(run):
            return self.seen
        scored = {(i, m) for i, m, _, _ in self.seen}
        return [r for r in self.previous if (r[0], r[1]) not in scored] + self.seen


class SummarySink(_Collector):
    """summary.json (statistics, rankings, thresholds and violations) and summary.md (a table per metric)."""

    def close(self, run: dict[str, Any]) -> None:
        summary = summarize(self.rows(run), run.get("metrics", {}))
        thresholds = run.get("thresholds") or {}
        violations = check_thresholds(summary, thresholds) if thresholds else []
        changes = _changes(summary, run)
        data = {**summary, "thresholds": thresholds, "violations": [v.reason for v in violations]}
        if run.get("baseline"):
            data["baseline"] = {**run["baseline"], "changes": [_change_record(c) for c in changes],
                                "regressions": [c.reason for c in changes if c.regressed]}
        text = json.dumps(_finite(data), indent=2, allow_nan=False) + "\n"
        atomic_write_bytes(self.out_dir / "summary.json", text.encode(), root=self.out_dir)
        text = markdown(summary, [v.reason for v in violations], changes)
        atomic_write_bytes(self.out_dir / "summary.md", text.encode(), root=self.out_dir)


class JunitSink(_Collector):
    """junit.xml: a testcase per method × metric, failures for violated thresholds."""

    def close(self, run: dict[str, Any]) -> None:
        summary = summarize(self.rows(run), run.get("metrics", {}))
        thresholds = run.get("thresholds") or {}
        violations = check_thresholds(summary, thresholds)
        seconds = float(run.get("timings", {}).get("total", 0.0))
        checks = [c for c in _changes(summary, run) if c.tolerance is not None]
        xml = junit_xml(summary, thresholds, violations, seconds, regressions=checks)
        atomic_write_bytes(self.out_dir / "junit.xml", xml.encode(), root=self.out_dir)


def _changes(summary: dict[str, Any], run: dict[str, Any]) -> list[Change]:
    """This run's means against the baseline's (none without a baseline)."""
    baseline = run.get("baseline")
    if not baseline:
        return []
    return compare(summary, read_baseline(baseline["path"]), baseline.get("max_regression") or {}, summary["methods"])


def _change_record(change: Change) -> dict[str, Any]:
    return {"method": change.method, "metric": change.metric, "baseline": change.old, "new": change.new,
            "change": change.change, "worse": change.worse, "tolerance": change.tolerance, "regressed": change.regressed}


def markdown(summary: dict[str, Any], violations: list[str], changes: list[Change] = ()) -> str:
    """Human-readable summary: regressions and the comparison with a baseline when there is one, a
    table per metric (methods best first), then one table of means per metric with details
    (`mprt/<layer>` rows, a column per method)."""
    out = io.StringIO()
    out.write("# Metric summary\n")
    if violations:
        out.write("\n**Threshold violations**\n\n" + "".join(f"- {v}\n" for v in violations))
    regressions = [c.reason for c in changes if c.regressed]
    if regressions:
        out.write("\n**Regressions against the baseline**\n\n" + "".join(f"- {r}\n" for r in regressions))
    if changes:
        out.write("\n## Compared with the baseline\n\n| method | metric | baseline | new | change | allowed | verdict |\n"
                  "|---|---|---|---|---|---|---|\n")
        for c in changes:
            verdict = ("regressed" if c.regressed else "ok") if c.tolerance is not None else "–"
            change = "–" if c.change is None else f"{c.change:+.4g}"
            cells = [c.method, c.metric, _num(c.old), _num(c.new), change, _num(c.tolerance), verdict]
            out.write("| " + " | ".join(map(str, cells)) + " |\n")
    metrics = summary["metrics"]
    for metric, entry in metrics.items():
        if "/" in metric:
            continue
        direction = {True: "higher is better", False: "lower is better", None: "not ranked"}[entry["higher_is_better"]]
        out.write(f"\n## {metric} ({direction})\n\n| rank | method | mean | std | median | n | NaN |\n|---|---|---|---|---|---|---|\n")
        order = entry["ranking"] + [m for m in entry["methods"] if m not in entry["ranking"]]
        for method in order:
            s = entry["methods"][method]
            cells = [s["rank"] or "–", method, *(_num(s[k]) for k in ("mean", "std", "median")), s["n"], s["n_nan"]]
            out.write("| " + " | ".join(map(str, cells)) + " |\n")
    parents = dict.fromkeys(k.split("/")[0] for k in metrics if "/" in k and not is_curve_point(k))
    for parent in parents:
        keys = [k for k in metrics if k.startswith(parent + "/") and not is_curve_point(k)]
        methods = list(dict.fromkeys(m for k in keys for m in metrics[k]["methods"]))
        out.write(f"\n## {parent} details (mean per method)\n\n| detail | " + " | ".join(methods) + " |\n")
        out.write("|---" * (len(methods) + 1) + "|\n")
        for key in keys:
            means = [_num(metrics[key]["methods"].get(m, {}).get("mean")) for m in methods]
            out.write(f"| {key.split('/', 1)[1]} | " + " | ".join(means) + " |\n")
    return out.getvalue()


def _finite(value: Any) -> Any:
    """Strict JSON: infinite statistics (e.g. a sensitivity over an all-zero map) become "inf" / "-inf"."""
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _num(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.4g}"


@hookimpl
def xai_writers() -> list[Writer]:
    return [
        Writer("metrics_csv", "every metric score: metrics.csv (input, method, metric, score)",
               lambda ctx: MetricsCsvSink(Path(ctx.out_dir))),
        Writer("summary", "per method × metric statistics and rankings: summary.json, summary.md",
               lambda ctx: SummarySink(Path(ctx.out_dir))),
        Writer("junit", "metric thresholds as JUnit XML for CI: junit.xml",
               lambda ctx: JunitSink(Path(ctx.out_dir))),
    ]
