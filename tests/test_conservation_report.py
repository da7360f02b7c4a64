"""The conservation report: run.json's `stats` hold, per LRP output, the mean and max over inputs of
|Σ R − f_t(x)| / |f_t(x)| for the input relevance and for each recorded layer (methods report
per-input statistics through `Attribution.stats`; the run aggregates them across batches)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import xaicli
from xaicli.model import InputSpec, Model
from xaicli.rng import BatchRNG
from xaicli_plugins.methods.lrp import conservation, lrp

from noise import noise_images

PREPROCESS = {"size": 16, "mean": [0.5], "std": [0.25]}
SPEC = InputSpec(size=(16, 16), mean=(0.5,) * 3, std=(0.25,) * 3)


class Net(nn.Module):
    """conv-relu-conv-relu-maxpool-linear; `bias` adds positive biases (which absorb relevance).
    The classifier is scaled so that logits are O(1), as a trained model's are (a random net's logits
    near 0 would make the epsilon stabiliser's share, ε/|f_t|, the dominant relative error)."""

    def __init__(self, bias: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=bias)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=bias)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 8 * 8, 4, bias=bias)
        with torch.no_grad():
            self.fc.weight.mul_(30)
            if bias:
                for layer in (self.conv1, self.conv2, self.fc):
                    layer.bias.uniform_(0.1, 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(torch.relu(self.conv2(torch.relu(self.conv1(x))))).flatten(1))


def net(bias: bool) -> Net:
    torch.manual_seed(0)
    return Net(bias).eval()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return noise_images(tmp_path_factory.mktemp("images"), 5, 16)


@pytest.fixture(scope="module")
def runs(images: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    """One run per network (with and without biases): lrp recording conv2 and pool, plus IG; batches of 2."""
    found = {}
    for bias in (False, True):
        out = tmp_path_factory.mktemp(f"bias{int(bias)}")
        result = xaicli.explain(net(bias), images, output=out, preprocess=PREPROCESS, batch_size=2,
                                methods={"lrp": {"record_layers": ["conv2", "pool"]}, "integrated_gradients": {"steps": 4}})
        assert result.exit_code == 0, result.errors
        found[bias] = out
    return found


def test_bias_free_cnn_conserves_relevance_in_the_report(runs):
    stats = json.loads((runs[False] / "run.json").read_text())["stats"]
    assert set(stats) == {"lrp"}  # integrated gradients reports no statistic
    errors = {k: v for k, v in stats["lrp"].items() if k.startswith("conservation_error")}  # shares: test_lrp_report
    assert set(errors) == {"conservation_error", "conservation_error:conv2", "conservation_error:pool"}
    for entry in errors.values():
        assert entry["inputs"] == 5  # accumulated over three batches
        assert 0 <= entry["mean"] <= entry["max"] < 1e-5


def test_biases_absorb_relevance_and_the_report_shows_it(runs):
    stats = json.loads((runs[True] / "run.json").read_text())["stats"]["lrp"]
    assert stats["conservation_error"]["mean"] > 1e-2
    assert stats["conservation_error:pool"]["mean"] > 1e-3


def test_reported_mean_is_the_mean_of_the_written_arrays(runs):
    """Recomputed from the npz files (relevance and logit per input), the report's numbers agree."""
    errors = []
    for path in sorted((runs[True] / "arrays" / "lrp").glob("*.npz")):
        with np.load(path) as npz:
            logit = float(npz["logit"])
            errors.append(abs(npz["relevance"].astype(np.float64).sum() - logit) / abs(logit))
    stats = json.loads((runs[True] / "run.json").read_text())["stats"]["lrp"]["conservation_error"]
    assert len(errors) == 5
    assert stats["mean"] == pytest.approx(np.mean(errors), rel=1e-5)
    assert stats["max"] == pytest.approx(np.max(errors), rel=1e-5)


def test_conservation_per_input_and_zero_logit():
    relevance = torch.tensor([[[[1.0, 1.0]]], [[[0.5, 0.0]]], [[[3.0, 0.0]]]])
    logits = torch.tensor([[2.0, 9.0], [1.0, -1.0], [0.0, 5.0]])
    found = conservation(relevance, {"layer": relevance * 2}, logits, torch.tensor([0, 1, 0]))
    assert torch.allclose(found["conservation_error"][:2], torch.tensor([0.0, 1.5], dtype=torch.float64))
    assert torch.isnan(found["conservation_error"][2])  # no relative error of a zero logit: left out of the mean
    assert torch.allclose(found["conservation_error:layer"][:2], torch.tensor([1.0, 2.0], dtype=torch.float64))


def test_lrp_attribution_carries_the_statistics():
    model = Model("net", SPEC, torch.device("cpu"), module=net(False))
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    attribution = lrp(model, x, torch.tensor([0, 1]), BatchRNG([0, 1]), record_layers=["conv1"])
    assert {k for k in attribution.stats if k.startswith("conservation")} == {"conservation_error",
                                                                              "conservation_error:conv1"}
    assert attribution.stats["conservation_error"].shape == (2,)
    assert "conservation_error" not in attribution.extras  # run-level numbers, not written per input
