"""How fast a large report opens: a synthetic run of N inputs × 2 methods (tests/test_report.py's
`synthetic_run`), `build_report` on it, then headless Chromium (the OS package) opening index.html
from file:// R times in a fresh tab; prints the build time, the report's size and the median
DOMContentLoaded and load times. The target is DOMContentLoaded < 2 s at 10,000 inputs.

    .venv/bin/python bench/bench_report.py                  # 10,000 inputs, 5 page loads
    .venv/bin/python bench/bench_report.py --inputs 50000 --rounds 3
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_report import CHROMEDRIVER, CHROMIUM, synthetic_run  # noqa: E402

from xaicli.report import build_report  # noqa: E402


def chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--no-first-run", "--window-size=1400,1000"):
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tempfile.mkdtemp(prefix='xai-bench-chromium-')}")
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        names = [f"class{i % 10}/img{i:05d}" for i in range(args.inputs)]
        run = synthetic_run(Path(tmp) / "run", names)
        t0 = time.perf_counter()
        index = build_report(run)
        built = time.perf_counter() - t0
        files = [p for p in index.parent.rglob("*") if p.is_file()]
        size = sum(p.stat().st_size for p in files)
        driver = chromium()
        try:
            dcl, load = [], []
            for _ in range(args.rounds):
                driver.get("about:blank")
                driver.get(index.resolve().as_uri())
                timing = driver.execute_script(
                    "const t = performance.getEntriesByType('navigation')[0];"
                    "return [t.domContentLoadedEventEnd, t.loadEventEnd];")
                dcl.append(timing[0])
                load.append(timing[1])
        finally:
            driver.quit()
    print(f"{args.inputs} inputs × 2 methods: built in {built:.1f} s, {size / 2**20:.1f} MiB in {len(files)} files")
    print(f"DOMContentLoaded median {statistics.median(dcl):.0f} ms (min {min(dcl):.0f}), "
          f"load median {statistics.median(load):.0f} ms over {args.rounds} rounds; target < 2000 ms")


if __name__ == "__main__":
    main()
