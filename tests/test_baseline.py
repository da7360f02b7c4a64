"""`xai evaluate --baseline`: a CI gate that fails when explanations got worse than an earlier evaluation."""
from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from xaicli.baseline import Change, compare

XAI = [sys.executable, "-m", "xaicli.cli"]
METRICS = ["--metric", "sparseness", "--metric", "pixel_flipping"]
SALIENCY = ["--set", "methods.attr.method=saliency"]
# one occlusion window over the whole 32x32 input: a constant map, whose Gini sparseness is 0
CONSTANT = ["--set", "methods.attr.method=occlusion", "--set", "methods.attr.window=32", "--set", "methods.attr.stride=32"]


def xai(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*XAI, *map(str, args)], capture_output=True, text=True)


def evaluate(digits, out: Path, method: list[str], *extra) -> subprocess.CompletedProcess:
    return xai("evaluate", digits.torchscript, digits.images, "-o", out, "--quiet", *METRICS, *method, *extra)


@pytest.fixture(scope="module")
def baseline(digits, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("baseline") / "eval"
    done = evaluate(digits, out, SALIENCY)
    assert done.returncode == 0, done.stderr
    return out


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_a_degraded_explanation_fails_the_gate_and_names_the_change(digits, baseline, tmp_path):
    out = tmp_path / "new"
    done = evaluate(digits, out, CONSTANT, "--baseline", baseline, "--max-regression", "sparseness=0.05")
    old = summary(baseline)["metrics"]["sparseness"]["methods"]["attr"]["mean"]
    new = summary(out)["metrics"]["sparseness"]["methods"]["attr"]["mean"]
    assert new == pytest.approx(0.0, abs=1e-6) and old > 0.3  # the constant map has no sparseness at all
    assert done.returncode == 1, done.stderr
    line = next(line for line in done.stderr.splitlines() if line.startswith("regression:"))
    assert "attr: sparseness" in line and f"worse by {old - new:.4g}" in line and "allowed 0.05" in line
    checks = summary(out)["baseline"]
    assert checks["path"] == str(baseline) and checks["max_regression"] == {"sparseness": 0.05}
    rows = {(c["method"], c["metric"]): c for c in checks["changes"]}
    assert rows[("attr", "sparseness")]["regressed"] and rows[("attr", "sparseness")]["change"] == pytest.approx(new - old)
    assert not rows[("attr", "pixel_flipping")]["regressed"]  # shown, not checked: no tolerance names it
    assert rows[("attr", "pixel_flipping")]["tolerance"] is None
    assert not any("/" in metric for _, metric in rows)  # curve points and other details only when named
    table = (out / "summary.md").read_text()
    assert "## Compared with the baseline" in table
    assert f"| attr | sparseness | {old:.4g} | {new:.4g} | {new - old:+.4g} | 0.05 | regressed |" in table
    cases = {case.get("name"): case for case in ET.parse(out / "junit.xml").getroot().iter("testcase")}
    assert cases["sparseness vs baseline"].find("failure").get("type") == "regression"
    assert "pixel_flipping vs baseline" not in cases


def test_within_tolerance_or_unchanged_passes(digits, baseline, tmp_path):
    loose = evaluate(digits, tmp_path / "loose", CONSTANT, "--baseline", baseline, "--max-regression", "attr/sparseness=5")
    assert loose.returncode == 0, loose.stderr
    case = {c.get("name"): c for c in ET.parse(tmp_path / "loose" / "junit.xml").getroot().iter("testcase")}
    assert case["sparseness vs baseline"].find("failure") is None
    same = evaluate(digits, tmp_path / "same", SALIENCY, "--baseline", baseline,
                    "--max-regression", "sparseness=0", "--max-regression", "pixel_flipping=0")
    assert same.returncode == 0, same.stderr  # the same model and method: every change is 0
    assert all(c["change"] == 0 for c in summary(tmp_path / "same")["baseline"]["changes"])


def test_bad_baselines_are_usage_errors(digits, baseline, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    done = evaluate(digits, tmp_path / "a", SALIENCY, "--baseline", empty)
    assert done.returncode == 2 and f"{empty / 'summary.json'}: missing" in done.stderr and "Traceback" not in done.stderr
    (empty / "summary.json").write_text("{not json")
    done = evaluate(digits, tmp_path / "b", SALIENCY, "--baseline", empty)
    assert done.returncode == 2 and "cannot be read" in done.stderr
    done = evaluate(digits, tmp_path / "c", SALIENCY, "--max-regression", "sparseness=0.1")
    assert done.returncode == 2 and "max_regression" in done.stderr and "needs `baseline:`" in done.stderr
    done = evaluate(digits, tmp_path / "d", SALIENCY, "--baseline", baseline, "--max-regression", "sparsenes=0.1")
    assert done.returncode == 2 and "max_regression.sparsenes" in done.stderr and "sparseness" in done.stderr
    done = evaluate(digits, tmp_path / "e", SALIENCY, "--baseline", baseline, "--max-regression", "sparseness=-1")
    assert done.returncode == 2 and "DELTA ≥ 0" in done.stderr


@pytest.mark.parametrize("higher, old, new, worse", [(True, 0.5, 0.4, 0.1), (False, 0.5, 0.4, -0.1), (None, 0.5, 0.4, 0.1)])
def test_worse_follows_the_metric_direction(higher, old, new, worse):
    summaries = [{"metrics": {"m": {"higher_is_better": higher, "methods": {"a": {"mean": v}}}}} for v in (new, old)]
    (change,) = compare(summaries[0], summaries[1], {"m": 0.05}, ["a"])
    assert change.worse == pytest.approx(worse) and change.regressed == (worse > 0.05)
    assert Change("a", "m", 0.5, None, True, 0.1).regressed  # a checked metric that vanished fails the gate
