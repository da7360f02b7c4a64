"""One failure, one method: a graph that cannot be built fails only the methods that need it, and a
method that fails on an input leaves the other methods' outputs of that input (and a rerun retries
only the failed method there, leaving every written file as it was)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from torch import nn

import xaicli

XAI = [sys.executable, "-m", "xaicli.cli"]
FLAGS = ["--input-size", "16", "--mean", "0.5", "--std", "0.25", "-q"]
PREPROCESS = {"size": 16, "mean": [0.5], "std": [0.25]}
NAMES = ["a.png", "b.png", "bright.png", "d.png"]


def xai(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*XAI, *map(str, args)], capture_output=True, text=True, env=env)


def errors(out: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]


def stems(out: Path, kind: str, method: str) -> list[str]:
    return sorted(p.stem for p in (out / kind / method).glob("*")) if (out / kind / method).is_dir() else []


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four 16x16 RGB images: three of seeded noise and a white one (the flaky method's bad input)."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name in NAMES:
        pixels = np.full((16, 16, 3), 255, np.uint8) if name == "bright.png" else rng.integers(0, 256, (16, 16, 3), np.uint8)
        Image.fromarray(pixels).save(folder / name)
    return folder


@pytest.fixture(scope="module")
def hardmax_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A conv net whose features are gated by Hardmax (onnxruntime runs it; xai's converter does not)."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "conv_w"),
             numpy_helper.from_array(rng.normal(0, 0.3, (3, 4)).astype(np.float32), "fc_w"),
             numpy_helper.from_array(np.zeros(3, np.float32), "fc_b")]
    n = helper.make_node
    nodes = [n("Conv", ["x", "conv_w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             n("Relu", ["c"], ["r"], name="relu"),
             n("Hardmax", ["r"], ["h"], name="winner_gate", axis=1),
             n("Mul", ["r", "h"], ["g"], name="gate"),
             n("GlobalAveragePool", ["g"], ["p"], name="pool"),
             n("Flatten", ["p"], ["f"], name="flatten", axis=1),
             n("Gemm", ["f", "fc_w", "fc_b"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "hardmax", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 16, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])], inits)
    path = tmp_path_factory.mktemp("onnx") / "hardmax.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_unsupported_onnx_op_fails_only_the_graph_methods(images, hardmax_onnx, tmp_path):
    out = tmp_path / "out"
    done = xai("explain", hardmax_onnx, images, "-m", "lrp", "-m", "integrated_gradients", "-m", "occlusion",
               "--set", "methods.integrated_gradients.steps=4", "--set", "methods.occlusion.window=8", "-o", out, *FLAGS)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    # occlusion needs forward passes only: every input has its files
    assert stems(out, "arrays", "occlusion") == stems(out, "heatmaps", "occlusion") == [Path(n).stem for n in NAMES]
    # on an ONNX file input gradients, like LRP, go through the converted graph: both are skipped, with the op named
    assert not (out / "arrays" / "lrp").exists() and not (out / "arrays" / "integrated_gradients").exists()
    found = errors(out)
    assert sorted((e["input"], e["stage"]) for e in found) == sorted(
        (name, f"explain ({m})") for name in NAMES for m in ("lrp", "integrated_gradients"))
    assert all("Hardmax" in e["cause"] and "winner_gate" in e["cause"] for e in found)
    run = json.loads((out / "run.json").read_text())
    assert set(run["skipped"]) == {"lrp", "integrated_gradients"}
    assert run["skipped"]["lrp"]["method"] == "lrp" and "Hardmax" in run["skipped"]["lrp"]["cause"]
    assert set(run["recipe"]["methods"]) == {"lrp", "integrated_gradients", "occlusion"}  # the recipe as asked
    assert run["counts"] == {"done": 0, "skipped": 0, "failed": len(NAMES)}  # each input lacks two outputs
    # the CLI says once per method why it was skipped
    assert [line for line in done.stderr.splitlines() if line.startswith("skipped:")] == [
        f"skipped: {run['skipped'][m]['cause']}" for m in ("lrp", "integrated_gradients")]


def test_unsupported_onnx_op_with_only_graph_methods_stops_up_front(images, hardmax_onnx, tmp_path):
    refused = xai("explain", hardmax_onnx, images, "-m", "lrp", "-m", "integrated_gradients", "-o", tmp_path / "out", *FLAGS)
    assert refused.returncode == 2
    assert "Hardmax" in refused.stderr and "winner_gate" in refused.stderr and "Traceback" not in refused.stderr
    assert not list((tmp_path / "out").rglob("*.npz"))


class Branchy(nn.Module):
    """A CNN whose forward branches on a data-dependent value: torch.export cannot trace it (no
    graph: no LRP), autograd differentiates it (integrated gradients run)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        if h.mean() > 0:
            h = h * 2
        return self.fc(h.mean((2, 3)))


def test_export_failure_keeps_integrated_gradients(images, tmp_path):
    torch.manual_seed(0)
    result = xaicli.explain(Branchy(), images, methods={"lrp": {}, "integrated_gradients": {"steps": 4}},
                            output=tmp_path / "out", preprocess=PREPROCESS)
    assert result.exit_code == 1
    out = tmp_path / "out"
    assert stems(out, "arrays", "integrated_gradients") == [Path(n).stem for n in NAMES]
    assert not (out / "arrays" / "lrp").exists()
    found = errors(out)
    assert [e["stage"] for e in found] == ["explain (lrp)"] * len(NAMES)
    assert all("cannot be built" in e["cause"] or "torch.export" in e["cause"] for e in found)
    assert "lrp" in result.manifest["skipped"] and "integrated_gradients" not in result.manifest["skipped"]


FLAKY = '''
"""A third-party method that fails on bright inputs while XAI_FLAKY_FAIL is set."""
import os

from xaicli import Attribution, Method, hookimpl


def flaky(model, x, target, rng):
    if os.environ.get("XAI_FLAKY_FAIL") and bool((x.flatten(1).mean(1) > 1.5).any()):
        raise RuntimeError("flaky refuses bright inputs")
    return Attribution(x.abs() * (1 + target.view(-1, 1, 1, 1)))


@hookimpl
def xai_methods():
    return [Method("flaky", "fails on bright inputs when XAI_FLAKY_FAIL is set", flaky, needs="forward")]
'''


@pytest.fixture(scope="module")
def flaky_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plugin distribution (module + dist-info with its entry point) on a folder for PYTHONPATH."""
    site = tmp_path_factory.mktemp("site")
    (site / "xai_flaky.py").write_text(FLAKY)
    info = site / "xai_flaky-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: xai-flaky\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[xaicli]\nflaky = xai_flaky\n")
    return site


@pytest.fixture(scope="module")
def small_torchscript(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    path = tmp_path_factory.mktemp("ts") / "small.pt"
    torch.jit.save(torch.jit.trace(module.eval(), torch.zeros(1, 3, 16, 16)), str(path))
    return path


def snapshot(out: Path) -> dict[str, tuple[bytes, int]]:
    return {p.relative_to(out).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for kind in ("arrays", "heatmaps") for p in (out / kind).rglob("*") if p.is_file()}


def test_method_failing_on_one_input_keeps_the_others_and_rerun_retries_only_it(images, flaky_site, small_torchscript,
                                                                                 tmp_path):
    out = tmp_path / "out"
    args = ["explain", small_torchscript, images, "-m", "flaky", "-m", "saliency", "-o", out, *FLAGS]
    env = {**os.environ, "PYTHONPATH": str(flaky_site)}
    first = xai(*args, env={**env, "XAI_FLAKY_FAIL": "1"})
    assert first.returncode == 1, first.stderr
    assert "Traceback" not in first.stderr
    everything = [Path(n).stem for n in NAMES]
    assert stems(out, "arrays", "saliency") == stems(out, "heatmaps", "saliency") == everything
    assert stems(out, "arrays", "flaky") == stems(out, "heatmaps", "flaky") == [s for s in everything if s != "bright"]
    found = errors(out)
    assert [(e["input"], e["stage"]) for e in found] == [("bright.png", "explain (flaky)")]
    assert "flaky refuses bright inputs" in found[0]["cause"]
    assert json.loads((out / "run.json").read_text())["counts"] == {"done": 3, "skipped": 0, "failed": 1}
    before = snapshot(out)

    second = xai(*args, env=env)
    assert second.returncode == 0, second.stderr
    assert "Traceback" not in second.stderr
    after = snapshot(out)
    assert set(after) - set(before) == {"arrays/flaky/bright.npz", "heatmaps/flaky/bright.png"}
    assert all(after[name] == before[name] for name in before)  # same bytes, same mtime: not rewritten
    assert errors(out) == []
    assert json.loads((out / "run.json").read_text())["counts"] == {"done": 1, "skipped": 3, "failed": 0}
    with np.load(out / "arrays" / "flaky" / "bright.npz") as npz, np.load(out / "arrays" / "saliency" / "bright.npz") as ref:
        assert int(npz["target"]) == int(ref["target"])  # the retried method explains the same target
        assert npz["relevance"].shape == ref["relevance"].shape
