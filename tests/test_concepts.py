"""`xai concepts` (xaicli.concepts): the atlas against brute force, shards, resume, the tag concept, PCX.

Fixture: 200 synthetic 16×16 RGB images of three classes — horizontal stripes, vertical stripes,
and faint diagonal stripes that 90 % of the time carry an artificial tag (a red 3×3 square at a
random place) — and a small CNN trained on them in a few seconds, saved as TorchScript.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xaicli.concepts.api import concepts
from xaicli.concepts.heaps import TopN
from xaicli.graph import from_module
from xaicli.lrp import LRP, Settings, composite
from xaicli.progress import Progress

SIZE, COUNT, LAYER, TOP = 16, 200, "conv2", 10
SPEC = {"size": [SIZE, SIZE], "channels": 3, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
        "interpolation": "bilinear", "crop_pct": 1.0}


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, padding=1)
        self.conv3 = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.fc = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.conv1(x))
        a = torch.nn.functional.max_pool2d(torch.relu(self.conv2(a)), 2)
        a = torch.relu(self.conv3(a))
        return self.fc(a.mean((2, 3)))


@dataclass
class Tagged:
    root: Path  # images in root/<class>/<index>.png
    model: Path
    module: torch.nn.Module
    paths: list[Path]
    labels: np.ndarray
    tagged: np.ndarray  # bool per image
    x: torch.Tensor


def _images(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    labels = np.arange(COUNT) % 3
    tagged = (labels == 2) & (rng.random(COUNT) < 0.9)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    images = np.empty((COUNT, SIZE, SIZE, 3))
    for i, label in enumerate(labels):
        phase = rng.uniform(0, 2 * np.pi)
        wave = {0: np.sin(yy * 1.2 + phase), 1: np.sin(xx * 1.2 + phase), 2: np.sin((xx + yy) * 0.9 + phase)}[label]
        amplitude = 0.12 if label == 2 else 0.3
        gray = 0.5 + amplitude * wave + rng.normal(0, 0.08, (SIZE, SIZE))
        images[i] = gray[..., None]
        if tagged[i]:
            y, x = rng.integers(0, SIZE - 3, 2)
            images[i, y : y + 3, x : x + 3] = (1.0, 0.0, 0.0)
    return np.clip(np.round(images * 255), 0, 255).astype(np.uint8), labels, tagged


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Tagged:
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tagged")
    images, labels, tagged = _images(rng)
    paths = []
    for i, (image, label) in enumerate(zip(images, labels)):
        path = root / "images" / str(label) / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
        paths.append(path)
    x = (torch.from_numpy(images).float().permute(0, 3, 1, 2) / 255 - 0.5) / 0.25
    net = Net()
    optimiser = torch.optim.Adam(net.parameters(), lr=0.01)
    y = torch.from_numpy(labels)
    for _ in range(40):
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        optimiser.step()
    net.eval().requires_grad_(False)
    assert (net(x).argmax(1) == y).float().mean() > 0.95
    model = root / "tagged.pt"
    torch.jit.save(torch.jit.trace(net, x[:2]), str(model), _extra_files={"xai.json": json.dumps(SPEC)})
    return Tagged(root / "images", model, net, paths, labels, tagged, x)


def _atlas(folder: Path) -> dict:
    return json.loads((folder / "atlas.json").read_text())["layers"][LAYER]["concepts"]


def _ranked(atlas: list[dict], kind: str) -> list[list[tuple[str, int]]]:
    return [[(e["path"], e["class"]) for e in concept[kind]] for concept in atlas]


class StopAfter(Progress):
    """Interrupts the run (as Ctrl-C would) after `batches` batches were written."""

    def __init__(self, batches: int):
        self.left = batches

    def start(self, total: int, skipped: int) -> None:
        self.total = total

    def advance(self, done: int, failed: int) -> None:
        self.left -= 1
        if self.left == 0:
            raise KeyboardInterrupt

    def message(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def one_pass(data: Tagged, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("one") / "atlas"
    result = concepts(data.model, [data.root], layers=[LAYER], output=out, top=TOP, references=False, batch_size=16)
    assert result.exit_code == 0 and result.inputs == COUNT
    return out


def test_top_n_equals_brute_force(data: Tagged, one_pass: Path) -> None:
    """Every input's channel relevances and activations computed at once (eager model) and sorted."""
    graph = from_module(data.module, data.x[:2])
    lrp = LRP(graph, composite("EpsilonPlusFlat", Settings()), record=[LAYER])
    result = lrp(data.x, data.module(data.x).argmax(1))
    relevance = result.recorded[LAYER].sum((2, 3)).double().numpy()
    activation = result.activations[LAYER].amax((2, 3)).double().numpy()
    names = [str(p.resolve()) for p in data.paths]
    atlas = _atlas(one_pass)
    assert len(atlas) == 16
    for kind, scores in (("relevance", relevance), ("activation", activation)):
        for c, concept in enumerate(atlas):
            order = sorted(range(COUNT), key=lambda i: (-scores[i, c], names[i]))[:TOP]
            assert [e["path"] for e in concept[kind]] == [names[i] for i in order], (kind, c)
            np.testing.assert_allclose([e["score"] for e in concept[kind]], scores[order, c], rtol=1e-4, atol=1e-6)
    stats = np.load(one_pass / "stats.npz")
    assert stats["count"].sum() == COUNT
    shares = relevance / relevance.sum(1, keepdims=True)
    predicted = result.logits.argmax(1).numpy()
    for row, label in enumerate(stats["classes"]):
        np.testing.assert_allclose(stats[f"mean:{LAYER}"][row], shares[predicted == label].mean(0), rtol=1e-4, atol=1e-5)


def test_two_shards_merge_to_the_one_pass_atlas(data: Tagged, one_pass: Path, tmp_path: Path) -> None:
    first = concepts(data.model, [data.root / "0", data.root / "1"], layers=[LAYER], output=tmp_path / "a", top=TOP,
                     references=False)
    second = concepts(data.model, [data.root / "2"], layers=[LAYER], output=tmp_path / "b", top=TOP, references=False)
    assert first.inputs + second.inputs == COUNT
    merged = concepts(data.model, [], output=tmp_path / "merged", top=TOP, references=False,
                      merge=[tmp_path / "a", tmp_path / "b"])
    assert merged.inputs == COUNT
    for kind in ("relevance", "activation"):
        assert _ranked(_atlas(tmp_path / "merged"), kind) == _ranked(_atlas(one_pass), kind)
    ours, theirs = np.load(tmp_path / "merged" / "stats.npz"), np.load(one_pass / "stats.npz")
    assert np.array_equal(ours["count"], theirs["count"])
    np.testing.assert_allclose(ours[f"mean:{LAYER}"], theirs[f"mean:{LAYER}"], rtol=1e-6, atol=1e-7)


def test_interrupted_run_resumes(data: Tagged, one_pass: Path, tmp_path: Path) -> None:
    out = tmp_path / "resumed"
    stopped = concepts(data.model, [data.root], layers=[LAYER], output=out, top=TOP, references=False, batch_size=16,
                       progress=StopAfter(3))
    assert stopped.exit_code == 130 and not (out / "atlas.json").exists()
    written = len(list((out / "arrays").rglob("*.npz")))
    assert 0 < written < COUNT
    resumed = concepts(data.model, [data.root], layers=[LAYER], output=out, top=TOP, references=False, batch_size=16)
    assert resumed.exit_code == 0
    assert resumed.run.manifest["counts"]["skipped"] == written
    for kind in ("relevance", "activation"):
        assert _ranked(_atlas(out), kind) == _ranked(_atlas(one_pass), kind)


def test_tag_concept_and_prototype_outliers(data: Tagged, tmp_path: Path) -> None:
    """The concept most relevant to the tagged class has tagged references; PCX flags its untagged inputs."""
    targets = tmp_path / "targets.csv"
    with targets.open("w", newline="") as fh:
        table = csv.writer(fh)
        table.writerow(["path", "target"])
        table.writerows([(p.relative_to(data.root).as_posix(), int(c)) for p, c in zip(data.paths, data.labels)])
    out = tmp_path / "pcx"
    result = concepts(data.model, [data.root], layers=[LAYER], output=out, top=TOP, prototypes=1, target=str(targets))
    assert result.exit_code == 0
    stats = np.load(out / "stats.npz")
    means = stats[f"mean:{LAYER}"][list(stats["classes"]).index(2)]
    concept = int(np.argmax(means))
    tagged = {str(p.resolve()) for p, t in zip(data.paths, data.tagged) if t}
    references = _atlas(out)[concept]["relevance"]
    share = np.mean([e["path"] in tagged for e in references])
    assert share >= 0.8, (concept, share)
    assert (out / _atlas(out)[concept]["reference"]).is_file()
    with (out / "outliers.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["class"] == "2"]
    untagged = {str(p.resolve()) for p, c, t in zip(data.paths, data.labels, data.tagged) if c == 2 and not t}
    lowest = {r["path"] for r in rows[: len(untagged)]}
    assert len(lowest & untagged) >= 0.8 * len(untagged), (sorted(lowest), sorted(untagged))
    prototypes = json.loads((out / "prototypes.json").read_text())
    assert prototypes["classes"]["2"]["count"] == int((data.labels == 2).sum())


def test_topn_merge_is_order_free() -> None:
    rng = np.random.default_rng(1)
    scores, names = rng.normal(size=(40, 3)), [f"x{i:02d}" for i in range(40)]
    whole = TopN.empty(3, 5).update(scores, names, np.zeros(40))
    halves = TopN.empty(3, 5).update(scores[25:], names[25:], np.zeros(15)).merge(
        TopN.empty(3, 5).update(scores[:25], names[:25], np.zeros(25)))
    again = halves.merge(halves)  # an input seen twice counts once
    for c in range(3):
        assert whole.entries(c) == halves.entries(c) == again.entries(c)
