"""`xai analyze`: SpRAy finds a Clever Hans, writes the analysis folder, reuses its cache, and fails clearly."""
from __future__ import annotations

import csv
import json
import os
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from xaicli import Analysis, AnalysisOutput, Param, hookimpl
from xaicli.cli import app
from xaicli.registry import create_registry

SIZE = 32
SPEC = {"size": [SIZE, SIZE], "channels": 1, "mean": [0.5], "std": [0.5], "interpolation": "bilinear", "crop_pct": 1.0}
TAG_SHARE = 0.7  # share of class-0 training images with the corner tag


def cli(*args: object) -> tuple[int, str]:
    """(exit code, output) of `xai ARGS`; an exception escaping the CLI fails the test."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"xai {args} raised {result.exception!r}") from result.exception
    return result.exit_code, result.output


def picture(cls: int, tagged: bool, rng: np.random.Generator) -> np.ndarray:
    """A 32x32 image in [0, 1]: class 0 a faint horizontal bar, 1 a vertical bar, 2 a ring; pixel
    noise; `tagged` adds a bright 5x5 patch in the top-left corner (the Clever-Hans cue)."""
    img = rng.normal(0.1, 0.05, (SIZE, SIZE))
    dy, dx = 0, 0  # no jitter: the untagged classes are one strategy each, varied by noise only
    if cls == 0:
        img[15 + dy:18 + dy, 8 + dx:24 + dx] += 0.35
    elif cls == 1:
        img[8 + dy:24 + dy, 15 + dx:18 + dx] += 0.8
    else:
        img[10 + dy:22 + dy, 10 + dx:22 + dx] += 0.8
        img[13 + dy:19 + dy, 13 + dx:19 + dx] -= 0.8
    if tagged:
        img[1:6, 1:6] = 1.0
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def model_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 3),
    )


@pytest.fixture(scope="module")
def clever_hans(tmp_path_factory) -> types.SimpleNamespace:
    """A CNN trained (seeded, a few seconds) on images where 70 % of class 0 carry a corner tag;
    `xai explain -m lrp` over held-out images: class 0 two-thirds tagged, classes 1 and 2 untagged."""
    folder = tmp_path_factory.mktemp("cleverhans")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    xs, ys = [], []
    for cls in range(3):
        for i in range(200):
            xs.append(picture(cls, cls == 0 and i < TAG_SHARE * 200, rng))
            ys.append(cls)
    x = (torch.from_numpy(np.stack(xs))[:, None] - 0.5) / 0.5
    y = torch.tensor(ys)
    net = model_net()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        for idx in torch.randperm(len(y), generator=gen).split(32):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    net.eval()
    model = folder / "model.pt"
    import json as _json

    torch.jit.save(torch.jit.trace(net, torch.zeros(1, 1, SIZE, SIZE)), str(model),
                   _extra_files={"xai.json": _json.dumps(SPEC)})
    images, labels = folder / "images", [("input", "label")]
    for cls, tagged, count in ((0, True, 24), (0, False, 12), (1, False, 30), (2, False, 30)):
        for i in range(count):
            name = f"c{cls}/{'tag' if tagged else 'plain'}_{i:02d}.png"
            (images / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((picture(cls, tagged, rng) * 255).round().astype(np.uint8), mode="L").save(images / name)
            labels.append((name, str(cls)))
    with open(folder / "labels.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(labels)
    run = folder / "run"
    code, output = cli("explain", model, images, "-m", "lrp", "-o", run, "--quiet", "--device", "cpu",
                       "--set", "writers.npz.inputs=false")
    assert code == 0, output
    return types.SimpleNamespace(run=run, labels=folder / "labels.csv", model=model, images=images)


def group(document: dict, method: str, cls: int) -> dict:
    return next(g for g in document["groups"] if g["method"] == method and g["class"] == cls)


def test_spray_finds_the_clever_hans(clever_hans, tmp_path):
    out = tmp_path / "analysis"
    code, output = cli("analyze", clever_hans.run, "-o", out, "--labels", clever_hans.labels, "--quiet")
    assert code == 0, output
    document = json.loads((out / "analysis.json").read_text())
    tagged_class = group(document, "lrp", 0)
    assert tagged_class["class_source"] == "label"
    assert tagged_class["eigengap"] > 1, tagged_class["eigenvalues"][:6]
    assert group(document, "lrp", 1)["eigengap"] == 1, group(document, "lrp", 1)["eigenvalues"][:6]
    suggested = tagged_class["suggested"]
    assert suggested == f"kmeans-{tagged_class['eigengap']}"
    labels = np.array(tagged_class["clusterings"][suggested]["labels"])
    is_tagged = np.array(["/tag_" in name for name in tagged_class["inputs"]])
    assert is_tagged.sum() == 24
    cluster = np.bincount(labels[is_tagged]).argmax()
    members = labels == cluster
    purity = is_tagged[members].mean()
    assert purity >= 0.9, (purity, labels, is_tagged)
    assert is_tagged[members].sum() >= 0.9 * is_tagged.sum()  # the tagged images are in that one cluster


def test_analysis_folder_is_consistent(clever_hans, tmp_path):
    out = tmp_path / "analysis"
    code, output = cli("analyze", clever_hans.run, "-o", out, "--quiet", "--set", "analysis.clusters=[2,3]")
    assert code == 0, output
    document = json.loads((out / "analysis.json").read_text())
    assert document["version"] == 1 and document["run_dir"] == str(clever_hans.run)
    assert document["settings"]["neighbors"] == 10 and document["settings"]["size"] == 32
    assert document["settings"]["clusters"] == [2, 3]
    with open(out / "clusters.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["input", "class", "method", "clustering", "cluster"]
    total = 0
    for g in document["groups"]:
        n = len(g["inputs"])
        assert g["class_source"] == "target"
        assert set(g["clusterings"]) == {"kmeans-2", "kmeans-3", "agglomerative-2", "agglomerative-3", "dbscan", "hdbscan"}
        assert len(g["views"]["tsne"]) == n and len(g["eigenvalues"]) == min(32, n - 1)
        assert g["eigenvalues"] == sorted(g["eigenvalues"]) and abs(g["eigenvalues"][0]) < 1e-6
        for name, c in g["clusterings"].items():
            labels = c["labels"]
            assert len(labels) == n
            sizes = {str(k): labels.count(k) for k in set(labels) if k >= 0}
            assert c["sizes"] == sizes
            for k, proto in c["prototypes"].items():
                assert labels[g["inputs"].index(proto)] == int(k)  # a prototype is a member
                assert (out / c["means"][k]).is_file()
            got = [int(r["cluster"]) for r in rows if r["method"] == g["method"] and int(r["class"]) == g["class"]
                   and r["clustering"] == name]
            assert got == labels
        total += n * len(g["clusterings"])
        for stem in g["stems"]:  # every row names an npz of the run
            assert (clever_hans.run / "arrays" / "lrp" / f"{stem}.npz").is_file()
    assert total == len(rows)
    mean = Image.open(next((out / "means").glob("*.png")))
    assert mean.size == (64, 64) and mean.mode == "RGB"


def test_h5_has_virelays_analysis_layout(clever_hans, tmp_path):
    import h5py

    out = tmp_path / "analysis"
    assert cli("analyze", clever_hans.run, "-o", out, "--quiet", "--set", "analysis.clusters=[2]")[0] == 0
    document = json.loads((out / "analysis.json").read_text())
    with h5py.File(out / "analysis.h5", "r") as h5:
        assert sorted(h5) == [f"{g['class']:08d}" for g in document["groups"]]
        for g in document["groups"]:
            cat = h5[f"{g['class']:08d}"]
            n = len(g["inputs"])
            assert cat["index"].dtype == np.uint32 and cat["index"].shape == (n,)
            spectral = cat["embedding"]["spectral"]
            assert spectral.shape == (n, len(g["eigenvalues"])) and spectral.dtype == np.float32
            np.testing.assert_allclose(spectral.attrs["eigenvalue"][::-1], g["eigenvalues"], atol=1e-6)
            assert cat["embedding"]["tsne"].shape == (n, 2)
            assert cat["embedding"]["tsne"].attrs["embedding"] == "spectral"
            np.testing.assert_array_equal(cat["cluster"]["kmeans-2"][()], g["clusterings"]["kmeans-2"]["labels"])
            assert cat["cluster"]["kmeans-2"].attrs["k"] == 2
            assert set(cat["cluster"]) == set(g["clusterings"])
            assert cat.attrs["class_source"] == "target"


def test_rerun_with_other_clusterings_reuses_the_embedding(clever_hans, tmp_path, monkeypatch):
    from xaicli.analysis import spectral

    out = tmp_path / "analysis"
    assert cli("analyze", clever_hans.run, "-o", out, "--quiet", "--set", "analysis.clusters=[2]")[0] == 0
    cached = sorted((out / "cache").glob("spectral-*.npz"))
    assert cached
    stamps = {p: p.stat().st_mtime_ns for p in cached}
    calls = []
    monkeypatch.setattr(spectral, "embed", lambda *a, **k: calls.append(1) or (_ for _ in ()).throw(AssertionError))
    code, output = cli("analyze", clever_hans.run, "-o", out, "--quiet", "--set", "analysis.clusters=[2,4]",
                       "--set", "analysis.dbscan_eps=0.3")
    assert code == 0, output
    assert calls == []
    assert {p: p.stat().st_mtime_ns for p in cached} == stamps
    document = json.loads((out / "analysis.json").read_text())
    assert all(g["cache"] == {"spectral": "reused", "tsne": "reused"} for g in document["groups"])
    assert "kmeans-4" in document["groups"][0]["clusterings"]
    monkeypatch.undo()
    # another neighbour count changes the graph: computed again
    code, _ = cli("analyze", clever_hans.run, "-o", out, "--quiet", "--set", "analysis.neighbors=5",
                  "--set", "analysis.tsne=false")
    assert code == 0
    document = json.loads((out / "analysis.json").read_text())
    assert all(g["cache"] == {"spectral": "computed"} for g in document["groups"])
    assert all("tsne" not in g["views"] for g in document["groups"])


def synthetic_run(folder: Path, n: int = 24) -> Path:
    """A run folder with arrays/saliency/*.npz of two classes, as the npz writer lays them out."""
    rng = np.random.default_rng(0)
    arrays = folder / "arrays" / "saliency"
    (arrays / "sub").mkdir(parents=True)
    for i in range(n):
        relevance = rng.normal(0, 1, (3, 16, 16)).astype(np.float32)
        np.savez(arrays / ("sub" if i % 2 else "") / f"im{i:02d}.npz", relevance=relevance, target=np.int64(i % 2))
    return folder


def test_a_corrupt_npz_is_named_and_skipped(tmp_path):
    run = synthetic_run(tmp_path / "run")
    (run / "arrays" / "saliency" / "broken.npz").write_bytes(b"PK\x03\x04 not really a zip")
    np.savez(run / "arrays" / "saliency" / "alien.npz", something=np.zeros(3))
    code, output = cli("analyze", run, "--set", "analysis.tsne=false")
    assert code == 1, output
    assert "broken.npz: not an npz archive" in output
    assert "alien.npz: no 'relevance' or 'target' array" in output
    assert "Traceback" not in output
    document = json.loads((run / "analysis" / "analysis.json").read_text())
    assert sorted(s["path"].rsplit("/", 1)[-1] for s in document["skipped"]) == ["alien.npz", "broken.npz"]
    assert sum(len(g["inputs"]) for g in document["groups"]) == 24
    assert {"sub/im01", "im00"} <= {i for g in document["groups"] for i in g["inputs"]}


def test_usage_errors_exit_2_with_a_clear_message(tmp_path):
    (tmp_path / "empty").mkdir()
    code, output = cli("analyze", tmp_path / "empty")
    assert code == 2 and "has no arrays/ folder" in output and "Traceback" not in output
    code, output = cli("analyze", tmp_path / "missing")
    assert code == 2 and "does not exist" in output
    run = synthetic_run(tmp_path / "run")
    code, output = cli("analyze", run, "-m", "lrp")
    assert code == 2 and "no arrays/lrp/" in output and "saliency" in output
    code, output = cli("analyze", run, "--set", "analysis.neighbours=3")
    assert code == 2 and "analysis.neighbours: unknown parameter (did you mean 'neighbors'?)" in output
    code, output = cli("analyze", run, "--set", "methods.x=1")
    assert code == 2 and "analysis.KEY=VALUE" in output
    code, output = cli("analyze", run, "--classes", "a,b")
    assert code == 2 and "--classes" in output
    (tmp_path / "labels.csv").write_text("path,target\nim00.png,1\n")
    code, output = cli("analyze", run, "--labels", tmp_path / "labels.csv")
    assert code == 2 and "columns input,label" in output
    code, output = cli("analyze", run, "--set", "analysis.min_group=100")
    assert code == 2 and "nothing to analyse" in output and "min_group" in output


def test_an_analysis_plugin_runs_through_the_hook(tmp_path, monkeypatch):
    """A third-party analysis (here: PCA + a sign split) registered through pluggy runs per group."""
    seen = []

    def pca_split(group, *, components: int, **common):
        seen.append((group.method, group.cls, group.heatmaps.shape))
        centred = group.heatmaps - group.heatmaps.mean(axis=0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        embedding = centred @ vt[:components].T
        return AnalysisOutput(embeddings={"pca": embedding}, clusterings={"sign": (embedding[:, 0] > 0).astype(int)},
                              suggested="sign")

    plugin = types.ModuleType("pca_plugin")
    plugin.xai_analyses = hookimpl(lambda: [Analysis("pca-split", "PCA, split by the first component's sign",
                                                     pca_split, (Param("components", int, 2, "PCA components"),))])
    registry = create_registry(extra=[plugin])
    assert registry.origins[("analysis", "pca-split")].module == "pca_plugin"
    import xaicli.analysis.pipeline

    monkeypatch.setattr(xaicli.analysis.pipeline, "default_registry", lambda: registry)
    run = synthetic_run(tmp_path / "run")
    code, output = cli("analyze", run, "--analysis", "pca-split", "--set", "analysis.components=3",
                       "--set", "analysis.size=16", "--quiet")
    assert code == 0, output
    assert sorted(seen) == [("saliency", 0, (12, 256)), ("saliency", 1, (12, 256))]
    document = json.loads((run / "analysis" / "analysis.json").read_text())
    assert document["settings"]["analysis"] == "pca-split" and document["settings"]["components"] == 3
    assert all(g["suggested"] == "sign" and g["eigenvalues"] == [] for g in document["groups"])
    import h5py

    with h5py.File(run / "analysis" / "analysis.h5") as h5:
        assert h5["00000000"]["embedding"]["pca"].shape == (12, 3)
    code, output = cli("plugins", "show", "spray")
    assert code == 0 and "neighbors" in output and "eigenvalues" in output


def test_pooling_is_an_area_mean_and_normalised():
    from xaicli.analysis.heatmaps import pool

    relevance = np.zeros((3, 64, 64), dtype=np.float32)
    relevance[:, :2, :2] = 1.0  # one pooled pixel's area, summed over 3 channels: mean 3
    relevance[0, 10, 10] = -6.0  # a quarter of another pooled pixel: mean -1.5
    row = pool(relevance, (32, 32), normalise="none").reshape(32, 32)
    assert row[0, 0] == pytest.approx(3.0) and row[5, 5] == pytest.approx(-1.5) and row.sum() == pytest.approx(1.5)
    scaled = pool(relevance, (32, 32)).reshape(32, 32)
    assert scaled[0, 0] == pytest.approx(1.0) and scaled[5, 5] == pytest.approx(-0.5)
    odd = pool(np.ones((1, 50, 70), dtype=np.float32), (32, 32), normalise="none")
    np.testing.assert_allclose(odd, 1.0, rtol=1e-6)
    assert not pool(np.zeros((1, 8, 8)), (4, 4)).any()  # an all-zero map stays zero
