"""`xai report`: the static HTML report of a run, its evaluation and its analysis, checked in a real
headless Chromium (the OS package, driven by Selenium) and as files."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from xaicli.errors import UsageError
from xaicli.report import build_report

ROOT = Path(__file__).resolve().parents[1]
XAI = [sys.executable, "-m", "xaicli.cli"]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
HOSTILE = '"><img src=x onerror="window.pwned=1">'  # a legal file name that is also markup


def xai(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([*XAI, *map(str, args)], capture_output=True, text=True, timeout=300)


def ok(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, done.stderr[-2000:]


def read_js(path: Path) -> dict:
    """The JSON a data/*.js file assigns (it is `...=JSON.parse("<JSON as a string literal>");`)."""
    text = path.read_text()
    literal = text[text.index("JSON.parse(") + len("JSON.parse("): text.rindex(");")]
    return json.loads(json.loads(literal))


def synthetic_run(folder: Path, names: list[str], methods=("saliency", "lrp"), size: int = 16, seed: int = 0) -> Path:
    """A run folder as `xai explain` writes it (run.json, errors.jsonl, arrays/<method>/<stem>.npz),
    with random relevance; classes cycle 0..9 and every seventh input is mispredicted."""
    rng = np.random.default_rng(seed)
    for m, method in enumerate(methods):
        for i, name in enumerate(names):
            path = folder / "arrays" / method / f"{name}.npz"
            path.parent.mkdir(parents=True, exist_ok=True)
            target = i % 10
            np.savez(path, relevance=rng.standard_normal((1, size, size)).astype(np.float32),
                     target=np.int64(target), predicted=np.int64(target if i % 7 else (target + 1) % 10),
                     logit=np.float32(1.0), prob=np.float32(0.5 + m * 0.1))
    manifest = {"xai": "test", "recipe": {"model": "synthetic.pt", "inputs": [], "methods": {m: {"method": m} for m in methods}},
                "seed": 0, "model": {"spec": "synthetic.pt", "digest": "sha256:feedbeef", "device": "cpu",
                                     "input": {"size": [size, size], "channels": 1, "mean": [0.5], "std": [0.5],
                                               "interpolation": "bilinear", "crop_pct": 1.0}},
                "engine": {"name": "local"}, "versions": {"python": "3"}, "inputs": len(names) + 1,
                "counts": {"done": len(names), "skipped": 0, "failed": 1}, "timings": {}, "metrics": {}, "scores": []}
    (folder / "run.json").write_text(json.dumps(manifest))
    error = {"path": f"/data/{HOSTILE}.jpg", "input": f"{HOSTILE}.jpg", "stage": "decode", "cause": "truncated <b>file</b>"}
    (folder / "errors.jsonl").write_text(json.dumps(error) + "\n")
    return folder


# -- a real run: two methods, an evaluation, an analysis ------------------------------------------

@pytest.fixture(scope="module")
def real(tmp_path_factory) -> dict[str, Path]:
    """The demo digits CNN explained with saliency and LRP (target class 3 for all, so that one class
    group holds every input and most are mispredicted), evaluated, analysed and reported."""
    base = tmp_path_factory.mktemp("report")
    images = base / "images"
    shutil.copytree(ROOT / "demo" / "images", images)
    shutil.copy(images / "3" / "012.png", images / f"{HOSTILE}.png")
    model = ROOT / "demo" / "digits.pt"
    run, evaluation = base / "run", base / "eval"
    ok(xai("explain", model, images, "-m", "saliency", "-m", "lrp", "--target", "3", "-o", run, "--quiet",
           "--set", "writers.npz.inputs=true"))
    ok(xai("evaluate", model, images, "--from", run, "--metric", "pixel_flipping", "--metric", "sparseness",
           "--target", "3", "-o", evaluation, "--quiet", "--set", "metrics.pixel_flipping.steps=8"))
    ok(xai("analyze", run, "-m", "lrp", "--quiet", "--set", "analysis.clusters=[2,3]"))
    done = xai("report", run, "--evaluation", evaluation)
    ok(done)
    assert "report ->" in done.stderr
    return {"run": run, "eval": evaluation, "report": run / "report", "images": images}


def test_report_files_of_a_real_run(real):
    """Data files hold every input, both methods, the evaluation with curves and the analysis."""
    report = real["report"]
    items = read_js(report / "data" / "items.js")
    data = read_js(report / "data" / "report.js")
    assert len(items["names"]) == 21 and f"{HOSTILE}.png" in items["names"]
    assert data["meta"]["methods"] == ["saliency", "lrp"] and all(all(p) for p in items["present"])
    assert all(items["inputs"]) and set(items["target"]) == {3} and items["predicted"].count(3) == 3
    evaluation = data["evaluation"]
    assert [e["key"] for e in evaluation["summary"]] == ["pixel_flipping", "sparseness"]
    assert sorted(evaluation["summary"][0]["ranking"]) == ["lrp", "saliency"]
    assert {m: len(c) for m, c in evaluation["curves"]["pixel_flipping"].items()} == {"saliency": 8, "lrp": 8}
    assert len(evaluation["rows"]) == 42 and evaluation["unknown"] == 0
    group = data["analysis"]["groups"][0]
    assert group["method"] == "lrp" and None not in group["members"] and len(group["members"]) == 21
    for c in group["clusterings"].values():
        assert all((report / path).is_file() for path in c["means"].values())
    assert (report / "thumbs" / "heat" / "0" / "0.png").is_file() and (report / "thumbs" / "input" / "0.jpg").is_file()
    assert HOSTILE not in (report / "index.html").read_text()


def test_analyze_can_build_the_report(real, tmp_path):
    """`xai analyze --report` analyses into another folder and rebuilds RUN_DIR/report with that analysis."""
    run = tmp_path / "run"
    shutil.copytree(real["run"], run)
    shutil.rmtree(run / "report")
    done = xai("analyze", run, "-m", "lrp", "-o", tmp_path / "other", "--report", "--set", "analysis.clusters=[2]")
    ok(done)
    assert f"report -> {run / 'report' / 'index.html'}" in done.stderr
    group = read_js(run / "report" / "data" / "report.js")["analysis"]["groups"][0]
    assert group["method"] == "lrp" and [c for c in group["clusterings"] if c.startswith("kmeans")] == ["kmeans-2"]


# -- the browser ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    """Headless Chromium from the OS packages, with its console log readable."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("needs Chromium and its driver: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1400,1000"):
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="xai-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def open_page(driver, index: Path) -> None:
    driver.get(index.resolve().as_uri())
    driver.get_log("browser")  # start each page with an empty log
    wait(driver, "return document.readyState === 'complete'")


def wait(driver, script: str, seconds: float = 20.0):
    end = time.monotonic() + seconds
    while True:
        value = driver.execute_script(script)
        if value or time.monotonic() > end:
            return value
        time.sleep(0.05)


def errors_in_console(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]


def artefact(driver, tmp_path: Path, name: str) -> Path:
    """A screenshot under the test's folder, copied to $XAI_ARTIFACTS when set."""
    path = tmp_path / name
    driver.save_screenshot(str(path))
    if os.environ.get("XAI_ARTIFACTS"):
        target = Path(os.environ["XAI_ARTIFACTS"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / name)
    return path


def cards(driver) -> list[str]:
    return driver.execute_script("return Array.from(document.querySelectorAll('#cards .card .name'), n => n.textContent)")


def first_heat(driver):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, "#cards .card .thumb")


def test_report_in_chromium(real, browser, tmp_path):
    """No console errors; every input's thumbnails load; colormap and method switches change the
    pictures; a cluster click shows exactly its members; a file name stays text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    open_page(browser, real["report"] / "index.html")
    names = read_js(real["report"] / "data" / "items.js")["names"]
    assert sorted(cards(browser)) == sorted(names)
    # every card shows a loaded heatmap for both methods
    assert wait(browser, "return document.querySelectorAll('#cards .thumb.ready').length === 42")
    assert browser.execute_script("return document.querySelectorAll('#cards .card .thumb').length") == 42
    assert browser.execute_script("return window.pwned") is None
    hostile = browser.find_element(By.CSS_SELECTOR, f'#cards .card[data-item="{names.index(HOSTILE + ".png")}"] .name')
    assert hostile.text == f"{HOSTILE}.png"

    before = first_heat(browser).screenshot_as_png
    Select(browser.find_element(By.ID, "colormap")).select_by_value("coldnhot")
    assert wait(browser, "return document.querySelectorAll('#cards .thumb.ready').length === 42")
    recoloured = first_heat(browser).screenshot_as_png
    assert recoloured != before
    assert "cm-coldnhot" in first_heat(browser).find_element(By.CSS_SELECTOR, ".heat").get_attribute("style")

    assert first_heat(browser).get_attribute("data-method") == "0"
    browser.find_element(By.CSS_SELECTOR, '#method-boxes input[value="0"]').click()  # hide saliency
    assert wait(browser, "return document.querySelectorAll('#cards .thumb.ready').length === 21")
    assert first_heat(browser).get_attribute("data-method") == "1"
    assert "thumbs/heat/1/" in first_heat(browser).get_attribute("data-src")
    assert first_heat(browser).screenshot_as_png != recoloured
    browser.find_element(By.CSS_SELECTOR, '#method-boxes input[value="0"]').click()

    Select(browser.find_element(By.ID, "colormap")).select_by_value("bwr")
    browser.find_element(By.ID, "overlay").click()
    assert wait(browser, "return document.querySelectorAll('#cards .thumb.ready .layer.input').length === 42")
    artefact(browser, tmp_path, "report-gallery.png")

    # metrics: the ranking table and one curve per method
    browser.find_element(By.CSS_SELECTOR, '[data-tab="metrics"]').click()
    assert len(browser.find_elements(By.CSS_SELECTOR, 'svg[data-metric="pixel_flipping"] polyline.curve')) == 2
    assert len(browser.find_elements(By.CSS_SELECTOR, "#summary tr")) == 5
    header = browser.find_element(By.CSS_SELECTOR, '#scores th[data-col="2"]')
    header.click()
    column = [float(c.text) for c in browser.find_elements(By.CSS_SELECTOR, "#scores tr td:nth-child(3)")]
    assert len(column) == 42 and column == sorted(column)
    artefact(browser, tmp_path, "report-metrics.png")

    # analysis: clicking a cluster filters the gallery to exactly its members
    analysis = json.loads((real["run"] / "analysis" / "analysis.json").read_text())["groups"][0]
    labels = analysis["clusterings"][analysis["suggested"]]["labels"]
    browser.find_element(By.CSS_SELECTOR, '[data-tab="analysis"]').click()
    assert browser.find_elements(By.CSS_SELECTOR, "#spectrum line.gap") or analysis["eigengap"] >= len(analysis["eigenvalues"])
    assert len(browser.find_elements(By.CSS_SELECTOR, "#scatter circle.point")) == 21
    artefact(browser, tmp_path, "report-analysis.png")
    for cluster in sorted(set(labels)):
        browser.find_element(By.CSS_SELECTOR, '[data-tab="analysis"]').click()
        browser.find_element(By.CSS_SELECTOR, f'#clusters .cluster[data-cluster="{cluster}"]').click()
        expected = sorted(name for name, label in zip(analysis["inputs"], labels) if label == cluster)
        assert browser.find_element(By.ID, "gallery").is_displayed()
        assert sorted(n[: -len(".png")] for n in cards(browser)) == expected
    browser.find_element(By.ID, "cluster-clear").click()
    assert len(cards(browser)) == 21
    assert errors_in_console(browser) == []


def test_ten_thousand_inputs_open(tmp_path, browser):
    """A synthetic run of 10,000 inputs (two methods) opens, pages and searches. How fast it opens is
    measured in bench/bench_report.py (a timed assertion here would fail on a loaded machine); the
    bound below only catches a hang."""
    names = [f"class{i % 10}/img{i:05d}" for i in range(10_000)]
    run = synthetic_run(tmp_path / "run", names)
    t0 = time.perf_counter()
    index = build_report(run)
    built = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in index.parent.rglob("*") if p.is_file())
    files = sum(1 for p in index.parent.rglob("*") if p.is_file())
    open_page(browser, index)
    dcl = browser.execute_script("return performance.getEntriesByType('navigation')[0].domContentLoadedEventEnd")
    print(f"\n10,000 inputs: built in {built:.1f} s, {size / 2**20:.1f} MiB in {files} files, DOMContentLoaded {dcl:.0f} ms")
    assert dcl < 60_000
    assert len(cards(browser)) == 48 and "10000 of 10000" in browser.find_element("id", "count").text
    assert wait(browser, "return document.querySelectorAll('#cards .thumb.ready').length === 96")
    browser.find_element("id", "search").send_keys("img09999")
    assert wait(browser, "return document.querySelectorAll('#cards .card').length === 1")
    assert cards(browser) == ["class9/img09999"]
    assert errors_in_console(browser) == []


# -- files, errors, the writer ----------------------------------------------------------------------

def test_hostile_file_name_is_escaped_everywhere(tmp_path):
    names = [HOSTILE, "a/</script><script>alert(1)</script>", "ok/plain"]
    run = synthetic_run(tmp_path / "run", names)
    index = build_report(run)
    for path in [index, *index.parent.joinpath("data").glob("*.js")]:
        text = path.read_text()
        assert "<img" not in text and "</script><script>" not in text and "<b>" not in text, path
    items = read_js(index.parent / "data" / "items.js")
    assert items["names"] == sorted(names)  # the page gets the names back intact, to show as text
    errors = read_js(index.parent / "data" / "report.js")["provenance"]["errors"]
    assert errors[0]["input"] == f"{HOSTILE}.jpg" and errors[0]["cause"] == "truncated <b>file</b>"


def test_run_without_evaluation_or_analysis_reports(tmp_path):
    run = synthetic_run(tmp_path / "run", [f"x{i}" for i in range(12)], methods=("occlusion",))
    done = xai("report", run, "-o", tmp_path / "out", "--thumb-size", "32")
    ok(done)
    data = read_js(tmp_path / "out" / "data" / "report.js")
    assert "evaluation" not in data and "analysis" not in data
    assert data["provenance"]["model"]["digest"] == "sha256:feedbeef" and data["meta"]["tile"] == 32
    from PIL import Image

    assert Image.open(tmp_path / "out" / "thumbs" / "heat" / "0" / "0.png").size == (320, 64)  # 10 columns, 2 rows
    ok(xai("report", run, "-o", tmp_path / "out"))  # a report folder is rewritten


def test_report_errors_are_messages(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    run = synthetic_run(tmp_path / "run", ["a", "b"])
    out = tmp_path / "o"
    cases = [
        (("report", tmp_path / "missing"), "no such folder"),
        (("report", run, "-o", tmp_path / "busy"), "is not empty"),
        (("report", run, "-o", out, "--evaluation", tmp_path / "busy"), "no metrics.csv"),
        (("report", run, "-o", out, "--analysis", tmp_path / "busy"), "analysis.json: no such file"),
        (("report", run, "-o", out, "--thumb-size", "4"), "out of range"),
    ]
    for args, needle in cases:
        done = xai(*args)
        assert done.returncode == 2 and needle in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)
    bad = tmp_path / "analysis"
    bad.mkdir()
    group = {"method": "lrp", "class": 0, "inputs": ["a"], "eigenvalues": [0.0],
             "clusterings": {"kmeans-2": {"labels": [0], "means": {"0": "../../etc/passwd"}}}}
    (bad / "analysis.json").write_text(json.dumps({"version": 1, "groups": [group]}))
    with pytest.raises(UsageError, match=r"groups\[0\]\.clusterings\.kmeans-2\.means\.0: '\.\./\.\./etc/passwd' is not a path inside"):
        build_report(run, tmp_path / "o2", analysis=bad)


def test_report_writer_in_a_recipe(tmp_path):
    """`writers: {report: {}}` builds the report when the run closes, with its failed inputs."""
    images = tmp_path / "images"
    images.mkdir()
    for name in ("0/034.png", "7/007.png", "9/021.png"):
        (images / name.replace("/", "_")).write_bytes((ROOT / "demo" / "images" / name).read_bytes())
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    recipe = tmp_path / "run.yaml"
    recipe.write_text(f"model: {ROOT / 'demo' / 'digits.pt'}\ninputs: [{images}]\noutput: {tmp_path / 'out'}\n"
                      "methods: {saliency: {}}\nmetrics: {pixel_flipping: {steps: 4}}\n"
                      "writers: {npz: {}, report: {thumb_size: 32}}\n")
    done = xai("run", recipe, "--quiet")
    assert done.returncode == 1, done.stderr  # the broken input fails; the others are reported
    report = tmp_path / "out" / "report"
    items = read_js(report / "data" / "items.js")
    data = read_js(report / "data" / "report.js")
    assert items["names"] == ["0_034.png", "7_007.png", "9_021.png"]
    assert [e["input"] for e in data["provenance"]["errors"]] == ["broken.png"]
    assert data["evaluation"]["summary"][0]["key"] == "pixel_flipping" and len(data["evaluation"]["curves"]["pixel_flipping"]["saliency"]) == 4
    assert (report / "index.html").is_file() and (report / "thumbs" / "heat" / "0" / "0.png").is_file()


@pytest.mark.parametrize("folder", ["../elsewhere", "/tmp/report", ""])
def test_report_writer_stays_inside_the_output_folder(folder, tmp_path):
    from xaicli.descriptors import WriterContext
    from xaicli.errors import UsageError
    from xaicli_plugins.writers.report import open_report

    with pytest.raises(UsageError, match="writers.report.folder: .* must be a folder inside the output folder"):
        open_report(WriterContext(tmp_path), folder)
