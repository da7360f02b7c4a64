"""Summaries, rankings, thresholds, JUnit XML and the metric report writers."""
from __future__ import annotations

import csv
import json
import math
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from xaicli.descriptors import BatchOutput, InputItem, WriterContext
from xaicli.errors import UsageError
from xaicli.registry import default_registry
from xaicli.summary import check_thresholds, junit_xml, parse_threshold, summarize

NAN = float("nan")
ROWS = [
    ("a.png", "saliency", "pixel_flipping", 0.40),
    ("b.png", "saliency", "pixel_flipping", 0.42),
    ("c.png", "saliency", "pixel_flipping", NAN),
    ("a.png", "gxi", "pixel_flipping", 0.10),
    ("b.png", "gxi", "pixel_flipping", 0.30),
    ("a.png", "saliency", "sparseness", 0.5),
    ("a.png", "gxi", "sparseness", 0.7),
    ("a.png", "gxi", "mprt/layer1", 0.2),
]
DIRECTIONS = {"pixel_flipping": {"higher_is_better": False}, "sparseness": True, "mprt": False}


def test_summarize_statistics_nan_and_rankings():
    s = summarize(ROWS, DIRECTIONS)
    assert s["methods"] == ["saliency", "gxi"]
    pf = s["metrics"]["pixel_flipping"]
    sal = pf["methods"]["saliency"]
    assert (sal["n"], sal["n_nan"]) == (2, 1)
    assert sal["mean"] == pytest.approx(0.41) and sal["median"] == pytest.approx(0.41)
    assert sal["std"] == pytest.approx(np.std([0.40, 0.42], ddof=1))
    assert pf["ranking"] == ["gxi", "saliency"]  # lower is better
    assert pf["methods"]["gxi"]["rank"] == 1 and sal["rank"] == 2
    assert s["metrics"]["sparseness"]["ranking"] == ["gxi", "saliency"]  # higher is better
    detail = s["metrics"]["mprt/layer1"]  # a detail key has no declared direction: statistics, no ranking
    assert detail["ranking"] == [] and detail["methods"]["gxi"]["rank"] is None and detail["higher_is_better"] is None


def test_summarize_all_nan_method_is_not_ranked():
    s = summarize([("a", "m1", "x", NAN), ("a", "m2", "x", 1.0)], {"x": True})
    m1 = s["metrics"]["x"]["methods"]["m1"]
    assert (m1["n"], m1["n_nan"], m1["mean"], m1["rank"]) == (0, 1, None, None)
    assert s["metrics"]["x"]["ranking"] == ["m2"]


def test_parse_threshold():
    assert parse_threshold("pixel_flipping=0.3") == ("pixel_flipping", 0.3)
    assert parse_threshold(" saliency/sparseness = -1e-2") == ("saliency/sparseness", -0.01)
    for bad in ("pixel_flipping", "=0.3", "pixel_flipping=high", "x=nan"):
        with pytest.raises(UsageError, match="expected METRIC=VALUE"):
            parse_threshold(bad)


def test_check_thresholds_reasons_and_method_overrides():
    s = summarize(ROWS, DIRECTIONS)
    thresholds = {"pixel_flipping": {"max": 0.3}, "gxi/pixel_flipping": {"max": 0.25}, "sparseness": {"min": 0.6}}
    reasons = [v.reason for v in check_thresholds(s, thresholds, ["saliency", "gxi"])]
    assert reasons == [
        "saliency: pixel_flipping mean 0.41 > max 0.30",
        "saliency: sparseness mean 0.50 < min 0.60",
    ]  # gxi's own max 0.25 replaces the general 0.3 and its mean 0.20 passes
    tight = check_thresholds(s, {"gxi/pixel_flipping": {"max": 0.1999}}, ["saliency", "gxi"])
    assert [v.reason for v in tight] == ["gxi: pixel_flipping mean 0.2000 > max 0.1999"]  # digits until they differ
    assert (tight[0].method, tight[0].metric, tight[0].bound, tight[0].limit) == ("gxi", "pixel_flipping", "max", 0.1999)
    assert check_thresholds(s, {"mprt/layer1": {"max": 0.5}}, ["gxi"]) == []  # a detail key of a metric


def test_check_thresholds_without_scores_is_a_violation():
    s = summarize([("a", "m1", "x", NAN), ("a", "m1", "x", NAN)], {"x": True})
    (only,) = check_thresholds(s, {"x": {"min": 0.0}})
    assert only.reason == "m1: x has no finite scores (2 NaN)" and only.bound == "missing"
    (absent,) = check_thresholds(s, {"y": {"max": 1.0}})
    assert absent.reason == "m1: y has no finite scores"


def test_junit_xml_structure_and_counts():
    s = summarize(ROWS, DIRECTIONS)
    thresholds = {"pixel_flipping": {"max": 0.3}, "mprt/layer1": {"max": 0.1}}
    violations = check_thresholds(s, thresholds, ["saliency", "gxi"])
    root = ET.fromstring(junit_xml(s, thresholds, violations, time=12.5))
    assert root.tag == "testsuites"
    (suite,) = root.findall("testsuite")
    cases = suite.findall("testcase")
    names = {(c.get("classname"), c.get("name")) for c in cases}
    # 2 methods × 2 headline metrics + the thresholded detail for both (saliency has no mprt score: a failure)
    assert names == {("xai.saliency", "pixel_flipping"), ("xai.gxi", "pixel_flipping"), ("xai.saliency", "sparseness"),
                     ("xai.gxi", "sparseness"), ("xai.gxi", "mprt/layer1"), ("xai.saliency", "mprt/layer1")}
    failed = {(c.get("classname"), c.get("name")): c.find("failure") for c in cases if c.find("failure") is not None}
    assert set(failed) == {("xai.saliency", "pixel_flipping"), ("xai.gxi", "mprt/layer1"), ("xai.saliency", "mprt/layer1")}
    assert failed[("xai.saliency", "pixel_flipping")].get("message") == "saliency: pixel_flipping mean 0.41 > max 0.30"
    assert failed[("xai.saliency", "mprt/layer1")].get("message") == "saliency: mprt/layer1 has no finite scores"
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors"), suite.get("time")) == ("6", "3", "0", "12.500")
    assert root.get("tests") == "6" and root.get("failures") == "3"
    out = next(c for c in cases if c.get("name") == "sparseness" and c.get("classname") == "xai.gxi").find("system-out").text
    assert "mean=0.7" in out and "n=1" in out


def batch(output: str, names: list[str], scores: dict[str, list[float]]) -> BatchOutput:
    n = len(names)
    return BatchOutput(
        output=output, method="saliency", params={}, items=[InputItem(Path(p), p) for p in names],
        inputs=np.zeros((n, 1, 2, 2), np.float32), images=[], crops=[], resized=[], target=np.zeros(n, np.int64),
        logit=np.zeros(n, np.float32), prob=np.zeros(n, np.float32), relevance=np.zeros((n, 1, 2, 2), np.float32),
        scores={k: np.asarray(v) for k, v in scores.items()},
    )


def open_sinks(out: Path) -> dict:
    registry = default_registry()
    ctx = WriterContext(out_dir=out)
    return {name: registry.writer(name).open(ctx) for name in ("metrics_csv", "summary", "junit")}


RUN = {"metrics": {"pixel_flipping": {"higher_is_better": False, "family": "faithfulness"}},
       "thresholds": {"pixel_flipping": {"max": 0.35}}, "timings": {"total": 3.0}, "recipe": {"overwrite": False}}


def test_writers_stream_rows_and_write_reports(tmp_path):
    sinks = open_sinks(tmp_path)
    assert all(s.expected(InputItem(Path("a.png"), "a.png"), "sal") == [] for s in sinks.values())
    first = batch("sal", ["a.png", "b.png"], {"pixel_flipping": [0.4, NAN], "mprt/layer1": [0.1, 0.2]})
    second = batch("gxi", ["a.png", "b.png"], {"pixel_flipping": [0.1, 0.3], "mprt/layer1": [0.3, 0.4]})
    threads = [threading.Thread(target=lambda b=b: [s.write(b) for s in sinks.values()]) for b in (first, second)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not (tmp_path / "metrics.csv").exists()  # appended to a temporary file until close
    for sink in sinks.values():
        sink.close(RUN)
    with open(tmp_path / "metrics.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["input", "method", "metric", "score"]
    assert sorted(rows[1:]) == sorted([
        ["a.png", "sal", "pixel_flipping", "0.4"], ["b.png", "sal", "pixel_flipping", "nan"],
        ["a.png", "sal", "mprt/layer1", "0.1"], ["b.png", "sal", "mprt/layer1", "0.2"],
        ["a.png", "gxi", "pixel_flipping", "0.1"], ["b.png", "gxi", "pixel_flipping", "0.3"],
        ["a.png", "gxi", "mprt/layer1", "0.3"], ["b.png", "gxi", "mprt/layer1", "0.4"],
    ])
    summary = json.loads((tmp_path / "summary.json").read_text())
    pf = summary["metrics"]["pixel_flipping"]
    assert pf["ranking"] == ["gxi", "sal"] and pf["methods"]["sal"]["n_nan"] == 1
    assert summary["violations"] == ["sal: pixel_flipping mean 0.40 > max 0.35"]
    md = (tmp_path / "summary.md").read_text()
    assert "## pixel_flipping (lower is better)" in md and "| 1 | gxi | 0.2 |" in md and "- sal: pixel_flipping" in md
    assert "## mprt details (mean per method)" in md and "| layer1 | 0.15 | 0.35 |" in md
    suite = ET.parse(tmp_path / "junit.xml").getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("time")) == ("2", "1", "3.000")
    assert not list(tmp_path.glob("*.tmp"))


def test_resumed_run_keeps_rows_of_skipped_inputs(tmp_path):
    sinks = open_sinks(tmp_path)
    for s in sinks.values():
        s.write(batch("sal", ["a.png", "b.png"], {"pixel_flipping": [0.4, 0.2]}))
        s.close(RUN)
    sinks = open_sinks(tmp_path)  # rerun: a.png was skipped, b.png scored again
    for s in sinks.values():
        s.write(batch("sal", ["b.png"], {"pixel_flipping": [0.6]}))
        s.close(RUN)
    with open(tmp_path / "metrics.csv", newline="") as fh:
        assert sorted(tuple(r.values()) for r in csv.DictReader(fh)) == [
            ("a.png", "sal", "pixel_flipping", "0.4"), ("b.png", "sal", "pixel_flipping", "0.6")]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["metrics"]["pixel_flipping"]["methods"]["sal"]["mean"] == pytest.approx(0.5)
    sinks = open_sinks(tmp_path)  # overwrite: only this run's rows
    for s in sinks.values():
        s.write(batch("sal", ["b.png"], {"pixel_flipping": [0.1]}))
        s.close({**RUN, "recipe": {"overwrite": True}})
    assert json.loads((tmp_path / "summary.json").read_text())["metrics"]["pixel_flipping"]["methods"]["sal"]["n"] == 1


def test_summary_json_is_strict_json_with_infinite_scores(tmp_path):
    sinks = open_sinks(tmp_path)
    sinks["summary"].write(batch("sal", ["a.png"], {"max_sensitivity": [math.inf]}))
    sinks["summary"].close({})
    text = (tmp_path / "summary.json").read_text()
    assert json.loads(text)["metrics"]["max_sensitivity"]["methods"]["sal"]["mean"] == "inf"
    assert "Infinity" not in text
