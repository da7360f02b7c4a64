"""`xai evaluate` end to end: metrics, summaries, thresholds that gate CI, reuse of earlier arrays."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xaicli import hookimpl
from xaicli.recipe import from_mapping
from xaicli.registry import create_registry
from xaicli.api import run_recipe

XAI = [sys.executable, "-m", "xaicli.cli"]


def xai(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*XAI, *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def masks(digits, tmp_path_factory) -> Path:
    """Ground truth for the digits: where the ink is, mirroring the inputs' relative paths."""
    folder = tmp_path_factory.mktemp("masks")
    for path in digits.images.rglob("*.png"):
        target = folder / path.relative_to(digits.images)
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(((np.asarray(Image.open(path)) > 64) * 255).astype(np.uint8)).save(target)
    return folder


def test_evaluate_writes_summaries_and_gates_on_thresholds(digits, masks, tmp_path):
    common = [digits.torchscript, digits.images, "-m", "gradient_x_input", "-m", "saliency",
              "--metric", "sparseness", "--metric", "pointing_game", "--masks", masks, "-q"]
    ok = xai("evaluate", *common, "-o", tmp_path / "ok", "--fail-under", "sparseness=0.0")
    assert ok.returncode == 0, ok.stderr
    rows = list(csv.DictReader((tmp_path / "ok" / "metrics.csv").open()))
    assert len(rows) == 20 * 2 * 2
    assert {r["metric"] for r in rows} == {"sparseness", "pointing_game"}
    assert {r["method"] for r in rows} == {"gradient_x_input", "saliency"}
    summary = json.loads((tmp_path / "ok" / "summary.json").read_text())
    sparse = summary["metrics"]["sparseness"]["methods"]["saliency"]
    scores = [float(r["score"]) for r in rows if r["metric"] == "sparseness" and r["method"] == "saliency"]
    assert sparse["n"] == 20 and sparse["mean"] == pytest.approx(np.mean(scores))
    assert "| " in (tmp_path / "ok" / "summary.md").read_text()
    assert not (tmp_path / "ok" / "heatmaps").exists()  # scores only, unless a writer is asked for

    bad = xai("evaluate", *common, "-o", tmp_path / "bad", "--fail-under", "sparseness=0.99",
              "--fail-over", "saliency/pointing_game=-1")
    assert bad.returncode == 1
    assert "sparseness" in bad.stderr and "pointing_game" in bad.stderr and "Traceback" not in bad.stderr
    suite = ET.parse(tmp_path / "bad" / "junit.xml").getroot()
    suites = [suite] if suite.tag == "testsuite" else suite.findall("testsuite")
    cases = [c for s in suites for c in s.findall("testcase")]
    failures = [c for c in cases if c.find("failure") is not None]
    assert len(failures) == 3  # sparseness for both methods, pointing game for saliency
    assert sum(int(s.get("failures")) for s in suites) == 3
    assert all(c.get("name") and c.get("classname") for c in cases)


def test_recipe_thresholds_exit_codes(digits, tmp_path):
    recipe = tmp_path / "gate.yaml"
    recipe.write_text(
        f"model: {digits.torchscript}\ninputs: [{digits.images}]\n"
        "methods: {gradient_x_input: {}}\n"
        "metrics: {complexity: {}}\n"
        "thresholds: {complexity: {max: 0.1}}\n"
    )
    failed = xai("run", recipe, "-o", tmp_path / "a", "-q")
    assert failed.returncode == 1 and "complexity" in failed.stderr
    passed = xai("run", recipe, "-o", tmp_path / "b", "-q", "--set", "thresholds.complexity.max=100")
    assert passed.returncode == 0, passed.stderr


def test_evaluating_earlier_arrays_recomputes_no_explanation(digits, tmp_path):
    calls = []
    from xaicli_plugins.methods.gradient import gradient_x_input

    counting = types.ModuleType("counting")

    def counted(model, x, target, rng):
        calls.append(len(x))
        return gradient_x_input(model, x, target, rng)

    from xaicli import Method

    counting.xai_methods = hookimpl(lambda: [Method("counted_gxi", "counted gradient x input", counted)])
    registry = create_registry(extra=[counting])
    explained = run_recipe(from_mapping({"model": str(digits.torchscript), "inputs": [str(digits.images)],
                                         "methods": {"counted_gxi": {}}, "output": str(tmp_path / "run"),
                                         "writers": {"npz": {}}}, registry=registry), registry=registry)
    assert explained.exit_code == 0 and sum(calls) == 20
    calls.clear()
    evaluated = run_recipe(from_mapping({"model": str(digits.torchscript), "inputs": [str(digits.images)],
                                         "metrics": {"pixel_flipping": {"features_per_step": 64}, "sparseness": {}},
                                         "from_run": str(tmp_path / "run"), "output": str(tmp_path / "eval"),
                                         "writers": {}}, registry=registry), registry=registry)
    assert evaluated.exit_code == 0, evaluated.errors
    assert calls == []
    rows = list(csv.DictReader((tmp_path / "eval" / "metrics.csv").open()))
    assert len(rows) == 40 and {r["method"] for r in rows} == {"counted_gxi"}
