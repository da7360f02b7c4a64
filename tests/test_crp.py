"""CRP (method `crp`, xaicli.concepts.conditional): completeness, invariances, parameters, errors, CLI.

Parity with the masked-Zennit oracle is in test_crp_parity.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from xaicli.concepts.conditional import ConditionalLRP, channel_scores, shares
from xaicli.errors import UsageError
from xaicli.graph import from_module
from xaicli.lrp import LRP, Settings, composite
from xaicli.lrp.rules import Epsilon
from xaicli.model import InputSpec, Model
from xaicli.rng import BatchRNG
from xaicli.concepts.engines import parse_condition
from xaicli_plugins.methods.crp import crp, parse_concepts


class BiasFree(torch.nn.Module):
    """A small bias-free CNN with max pooling and a residual sum: LRP-ε conserves relevance exactly."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.conv3 = torch.nn.Conv2d(8, 12, 3, padding=1, bias=False)
        self.fc = torch.nn.Linear(12 * 4 * 4, 5, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.conv1(x))
        a = torch.relu(self.conv2(a)) + a
        a = torch.nn.functional.max_pool2d(a, 2)
        a = torch.nn.functional.max_pool2d(torch.relu(self.conv3(a)), 2)
        return self.fc(a.flatten(1))


def test_completeness_on_bias_free_epsilon_network() -> None:
    """All channels' conditional heatmaps sum to the unconditional LRP heatmap; shares sum to 1."""
    net = BiasFree().eval().double()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    graph = from_module(net, x)
    epsilon = composite("EpsilonPlus", Settings(epsilon=1e-12, stabilizer=1e-12)).override({"conv": Epsilon(1e-12)})
    target = torch.tensor([0, 1, 2, 3])
    full = LRP(graph, epsilon)(x, target)
    for layer, channels in (("conv3", 12), ("conv1", 8)):
        result = ConditionalLRP(graph, epsilon, layer)(x, target, lambda r: torch.arange(channels).expand(len(r), -1))
        total = result.relevance.sum(1)
        error = ((total - full.relevance).flatten(1).abs().amax(1) / full.relevance.flatten(1).abs().amax(1)).max()
        assert error <= 1e-5, (layer, error.item())
        share = shares(result.layer_relevance)
        torch.testing.assert_close(share.sum(1), torch.ones(4, dtype=share.dtype), rtol=0, atol=1e-9)
    # and the network conserves: the unconditional heatmap sums to the target logit
    torch.testing.assert_close(full.relevance.flatten(1).sum(1), full.logits.gather(1, target[:, None])[:, 0],
                               rtol=1e-9, atol=1e-12)


DEMO = Path(__file__).resolve().parents[1] / "demo"


def demo_model(channels_last: bool | None = None) -> Model:
    """The committed demo digits CNN (TorchScript) with its input spec."""
    spec = json.loads(json.dumps(__import__("train_digits").SPEC))
    module = torch.jit.load(str(DEMO / "digits.pt"))
    return Model("digits", InputSpec(size=tuple(spec["size"]), channels=1, mean=tuple(spec["mean"]),
                                     std=tuple(spec["std"])), torch.device("cpu"), module=module,
                 channels_last=channels_last)


@pytest.fixture(scope="module")
def digits_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """The 20 demo digits as a normalised batch, their classes from the folder names."""
    import train_digits
    from PIL import Image

    paths = sorted((DEMO / "images").rglob("*.png"))
    raw = np.stack([np.asarray(Image.open(p).convert("L"), dtype=np.float32) / 255.0 for p in paths])
    x = (torch.from_numpy(raw)[:, None] - train_digits.SPEC["mean"][0]) / train_digits.SPEC["std"][0]
    return x, torch.tensor([int(p.parent.name) for p in paths])


def _params(**over) -> dict:
    from xaicli_plugins.methods.crp import PARAMS

    params = {p.name: p.default for p in PARAMS}
    params.update(over)
    return params


def test_plugin_batch_size_chunk_and_layout_invariance(digits_batch) -> None:
    model = demo_model()
    x, target = digits_batch[0][:8], digits_batch[1][:8]
    rng = BatchRNG(list(range(8)))
    whole = crp(model, x, target, rng, **_params(concepts="top:5"))
    assert whole.relevance.shape == (8, 5, 1, 32, 32)
    assert whole.extras["concepts"].shape == (8, 5) and whole.extras["concept_relevance"].shape == (8, 5)
    # concepts are ordered by relevance, shares are their part of the layer's total
    share = whole.extras["concept_relevance"]
    assert torch.all(share[:, :-1] >= share[:, 1:])
    scale = whole.relevance.flatten(2).abs().amax(2, keepdim=True).unsqueeze(-1).unsqueeze(-1)
    for i in range(8):
        one = crp(model, x[i : i + 1], target[i : i + 1], rng[i : i + 1], **_params(concepts="top:5"))
        assert torch.equal(one.extras["concepts"][0], whole.extras["concepts"][i])
        assert ((one.relevance[0] - whole.relevance[i]).abs() / scale[i]).max() <= 1e-5
    chunked = crp(model, x, target, rng, **_params(concepts="top:5", max_batch=1))
    assert ((chunked.relevance - whole.relevance).abs() / scale).max() <= 1e-5
    nchw = crp(demo_model(channels_last=False), x, target, rng, **_params(concepts="top:5"))
    assert torch.equal(nchw.extras["concepts"], whole.extras["concepts"])
    assert ((nchw.relevance - whole.relevance).abs() / scale).max() <= 1e-4


def test_plugin_listed_channels_and_max_mode(digits_batch) -> None:
    model = demo_model()
    x, target = digits_batch[0][::5], digits_batch[1][::5]
    rng = BatchRNG(list(range(4)))
    listed = crp(model, x, target, rng, **_params(concepts=[5, 1]))
    assert listed.extras["concepts"].tolist() == [[5, 1]] * 4
    top = crp(model, x, target, rng, **_params(concepts="top:64"))
    for i in range(4):  # the listed channel's heatmap is the same as in a top:K run
        k = top.extras["concepts"][i].tolist().index(5)
        torch.testing.assert_close(listed.relevance[i, 0], top.relevance[i, k], rtol=1e-5, atol=1e-7)
    # all 64 channels: shares sum to 1
    torch.testing.assert_close(top.extras["concept_relevance"].double().sum(1), torch.ones(4, dtype=torch.float64),
                               rtol=0, atol=1e-5)
    peak = crp(model, x, target, rng, **_params(concepts="top:3", mode="max"))
    layer = ConditionalLRP(model.graph(), composite("EpsilonPlusFlat"), None).layer
    recorded = LRP(model.graph(), composite("EpsilonPlusFlat"), record=[layer])(x, target).recorded[layer]
    expected = torch.sort(channel_scores(recorded, "max"), dim=1, descending=True, stable=True).indices[:, :3]
    assert torch.equal(peak.extras["concepts"], expected)
    by_sum = torch.sort(channel_scores(recorded, "relevance"), dim=1, descending=True, stable=True).indices[:, :3]
    assert torch.equal(top.extras["concepts"][:, :3], by_sum)


def test_errors_name_the_parameter() -> None:
    from xaicli_plugins.methods.crp import check

    model = demo_model()
    with pytest.raises(UsageError, match=r"crp: layer: no layer 'conv22'.*(did you mean|layers include)"):
        check(model, _params(layer="conv22"))
    with pytest.raises(UsageError, match="must lie above"):
        check(model, _params(layer="8", condition="0:1"))
    with pytest.raises(UsageError, match="out of range"):
        check(model, _params(concepts=[1, 999]))
    with pytest.raises(UsageError, match="top:K"):
        parse_concepts("top:x")
    with pytest.raises(UsageError, match="LAYER:CHANNEL"):
        parse_condition("features.28")
    assert parse_concepts("3, 7") == (2, [3, 7]) and parse_condition("a.b:4") == ("a.b", 4)


def test_cli_writes_concept_arrays_and_grid(tmp_path) -> None:
    from PIL import Image

    import xaicli

    out = tmp_path / "out"
    result = xaicli.explain(DEMO / "digits.pt", DEMO / "images", methods={"crp": {"concepts": "top:4"}}, output=out,
                            batch_size=8)
    assert result.exit_code == 0, result.errors
    arrays = sorted((out / "arrays" / "crp").rglob("*.npz"))
    assert arrays
    with np.load(arrays[0]) as data:
        assert data["relevance"].shape == (4, 1, 32, 32)
        assert data["concepts"].shape == (4,) and data["concept_relevance"].shape == (4,)
        assert data["concept_relevance"][0] >= data["concept_relevance"][-1]
    picture = np.asarray(Image.open(sorted((out / "heatmaps" / "crp").rglob("*.png"))[0]))
    assert picture.shape[0] >= 2 * 64 and picture.shape[1] >= 2 * 64  # a 2×2 grid of enlarged tiles


def test_onnx_and_torchscript_give_the_same_concepts(tmp_path) -> None:
    """Through the graph, an ONNX model explains like its TorchScript twin (demo digits, both committed)."""
    import xaicli

    found = {}
    for name in ("digits.pt", "digits.onnx"):
        out = tmp_path / name
        result = xaicli.explain(DEMO / name, DEMO / "images" / "3", methods={"crp": {"concepts": "top:3"}}, output=out)
        assert result.exit_code == 0, result.errors
        found[name] = [dict(np.load(p)) for p in sorted((out / "arrays" / "crp").rglob("*.npz"))]
    for ts, onnx in zip(found["digits.pt"], found["digits.onnx"]):
        assert np.array_equal(ts["concepts"], onnx["concepts"])
        scale = np.abs(ts["relevance"]).max()
        assert np.abs(ts["relevance"] - onnx["relevance"]).max() <= 1e-5 * scale
