"""SpRAy at scale: `xai analyze`'s spray analysis against CoRelAy's default pipeline, time and peak memory.

    .venv/bin/python bench/bench_analyze.py [--sizes 10000 100000] [--corelay-max 10000] [--cli 10000]

Data: synthetic pooled 32x32 heatmaps (five strategies, a blob at one of five places, plus noise),
seeded. Each measurement runs in a fresh subprocess and reports its wall and CPU seconds and its
peak resident memory (ru_maxrss), imports included:
- `xai spray full`: everything `xai analyze` computes per group (k-NN graph, 32 eigenvectors,
  eigengap, k-means and Ward for k = 2..10, DBSCAN, HDBSCAN, t-SNE), without file I/O;
- `xai spray core`: graph + embedding + k-means k=2 (what CoRelAy's default pipeline computes);
- `corelay default`: `SpectralClustering()` with its defaults (dense SciPyPDist, SparseKNN(10),
  SymmetricNormalLaplacian, EigenDecomposition(32), KMeans(2)); skipped above --corelay-max, where its
  N x N distance matrix (8 N^2 bytes; 80 GB at 100,000) does not fit;
- `xai analyze (CLI)` with --cli N: the whole command on N npz files (reading, all outputs).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DATA = """
import numpy as np
def heatmaps(n, seed=0):
    rng = np.random.default_rng(seed)
    rows = rng.normal(0.0, 0.15, (n, 32, 32)).astype(np.float32)
    places = ((2, 2), (16, 20), (24, 6), (4, 24), (20, 12))
    for s, (y, x) in enumerate(places):
        rows[s::len(places), y:y + 8, x:x + 8] += 1.0
    rows = rows.reshape(n, -1)
    rows /= np.abs(rows).max(axis=1, keepdims=True)
    return rows
"""

FOOTER = """
import resource, time, json
print(json.dumps({"wall": time.perf_counter() - T0, "cpu": time.process_time(),
                  "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **EXTRA}))
"""

OURS = """
import time; T0 = time.perf_counter()
import numpy as np, sys
sys.path.insert(0, {root!r})
from xaicli.descriptors import AnalysisGroup
from xaicli_plugins.analyses.spray import PARAMS, spray
from xaicli.analysis import clustering, spectral
from sklearn.metrics import adjusted_rand_score
rows = heatmaps({n})
truth = np.arange({n}) % 5
EXTRA = {{}}
if {full}:
    params = {{p.name: p.default for p in PARAMS}}
    group = AnalysisGroup("bench", 0, "target", [str(i) for i in range({n})], rows, (32, 32), 0,
                          cached=lambda name, settings, compute: compute())
    out = spray(group, **params)
    EXTRA = {{"eigengap": out.eigengap, "ari_suggested": adjusted_rand_score(out.clusterings[out.suggested], truth)}}
else:
    values, vectors = spectral.embed(spectral.knn_affinity(rows, 10, 4), 32, 0)
    labels = clustering.kmeans(vectors[:, :2], 2, 0, 10)
    EXTRA = {{"eigengap": spectral.eigengap(values)}}
"""

CORELAY = """
import time; T0 = time.perf_counter()
import numpy as np
from corelay.pipeline.spectral import SpectralClustering
np.random.seed(0)
rows = heatmaps({n})
eigenvalues, embedding, labels = None, None, None
(eigenvalues, embedding), labels = SpectralClustering()(rows)
EXTRA = {{}}
"""

CLI = """
import time, subprocess, sys, resource, json
sys.path.insert(0, {root!r})
from pathlib import Path
rows = heatmaps({n})
arrays = Path({folder!r}) / "arrays" / "lrp"
arrays.mkdir(parents=True, exist_ok=True)
for i, row in enumerate(rows):
    np.savez(arrays / f"{{i:06d}}.npz", relevance=row.reshape(1, 32, 32), target=np.int64(0))
T0 = time.perf_counter()
done = subprocess.run([sys.executable, "-m", "xaicli.cli", "analyze", {folder!r}, "--quiet"], cwd={root!r})
wall = time.perf_counter() - T0
use = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({{"wall": wall, "cpu": use.ru_utime + use.ru_stime, "rss_mib": use.ru_maxrss / 1024, "rc": done.returncode}}))
"""


def measure(script: str) -> dict:
    """Run `script` in a fresh interpreter; its last stdout line is a JSON record."""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def show(name: str, n: int, record: dict) -> None:
    if "error" in record:
        print(f"{name:<22} N={n:>7,}  failed: {record['error']}")
        return
    extra = "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                      if k not in ("wall", "cpu", "rss_mib"))
    print(f"{name:<22} N={n:>7,}  wall {record['wall']:8.1f} s  cpu {record['cpu']:8.1f} s  "
          f"peak {record['rss_mib']:7.0f} MiB  {extra}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--corelay-max", type=int, default=10_000)
    parser.add_argument("--cli", type=int, nargs="*", default=[10_000], help="also time the CLI on N npz files")
    args = parser.parse_args()
    for n in args.sizes:
        show("xai spray core", n, measure(DATA + OURS.format(root=str(ROOT), n=n, full=False) + FOOTER))
        show("xai spray full", n, measure(DATA + OURS.format(root=str(ROOT), n=n, full=True) + FOOTER))
        if n <= args.corelay_max:
            show("corelay default", n, measure(DATA + CORELAY.format(n=n) + FOOTER))
        else:
            print(f"{'corelay default':<22} N={n:>7,}  skipped: its dense distance matrix needs "
                  f"{8 * n * n / 2**30:,.0f} GiB")
    for n in args.cli or []:
        with tempfile.TemporaryDirectory(prefix="xai-bench-analyze-") as folder:
            show("xai analyze (CLI)", n, measure(DATA + textwrap.dedent(CLI.format(root=str(ROOT), n=n, folder=folder))))


if __name__ == "__main__":
    main()
