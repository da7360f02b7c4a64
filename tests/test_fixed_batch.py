"""A model that pins its batch size when traced: torch.export cannot keep the batch free, so its graph is
exported at batch 2 and every graph consumer runs it in padded chunks (xaicli.graph.batch). Explanations
must equal those of the same model written with a free batch, at batch sizes above, below and off the
chunk size, and a run must finish."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import xaicli
from xaicli.graph.batch import fixed_batch
from xaicli.model import InputSpec, model_from_module
from xaicli.params import resolve
from xaicli.registry import create_registry

SPEC = InputSpec(size=(8, 8), crop_pct=1.0).override(mean=0.5, std=0.5)


class Net(nn.Module):
    """conv -> token attention -> head; `pin` reads the batch as a Python int, which torch.export specialises."""

    def __init__(self, pin: bool):
        super().__init__()
        self.pin = pin
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        batch = int(y.shape[0]) if self.pin else y.shape[0]
        tokens = y.reshape(batch, 8, -1).transpose(1, 2)
        tokens = tokens + self.attn(tokens, tokens, tokens, need_weights=False)[0]
        return self.head(tokens.mean(1))


@pytest.fixture(scope="module")
def nets() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    pinned = Net(pin=True).eval()
    free = Net(pin=False).eval()
    free.load_state_dict(pinned.state_dict())
    return pinned, free


def explain(method: str, model, x: torch.Tensor, target: torch.Tensor, **given):
    plugin = create_registry().method(method)
    return plugin.explain(model, x, target, None, **resolve(plugin.params, given))


def close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    scale = want.double().abs().max().clamp_min(1e-12)
    error = ((got.double() - want.double()).abs().max() / scale).item()
    assert got.shape == want.shape and error <= 1e-5, f"{what}: shapes {tuple(got.shape)} {tuple(want.shape)}, error {error:.2g}"


def test_a_pinned_batch_gives_a_graph_of_fixed_batch(nets, capsys):
    pinned, free = nets
    graph = model_from_module(pinned, torch.device("cpu"), SPEC).graph()
    assert fixed_batch(graph) == 2
    assert "pins its batch size" in capsys.readouterr().err
    assert fixed_batch(model_from_module(free, torch.device("cpu"), SPEC).graph()) is None


@pytest.mark.parametrize("batch", [1, 3, 5])
def test_explanations_of_a_fixed_batch_graph_equal_the_free_ones(nets, batch):
    models = [model_from_module(net, torch.device("cpu"), SPEC) for net in nets]
    x = torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(batch))
    target = torch.arange(batch) % 5
    got, want = (explain("lrp", m, x, target, record_layers="conv") for m in models)
    close(got.relevance, want.relevance, "lrp")
    close(got.extras["relevance:conv"], want.extras["relevance:conv"], "lrp relevance:conv")
    assert set(got.stats) == set(want.stats)
    for key in got.stats:  # shares of the logit, from flows summed over the batch: padding adds nothing
        assert torch.allclose(got.stats[key].double(), want.stats[key].double(), atol=1e-5), key
    got, want = (explain("gradcam", m, x, target) for m in models)
    close(got.relevance, want.relevance, "gradcam")
    got, want = (explain("crp", m, x, target, layer="conv", concepts="top:3") for m in models)
    close(got.relevance, want.relevance, "crp")
    assert torch.equal(got.extras["concepts"], want.extras["concepts"])


def test_a_run_with_a_fixed_batch_graph_matches_the_free_model(nets, tmp_path):
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(tmp_path / f"img{i}.png")
    methods = ["lrp", "gradcam", "integrated_gradients"]
    results = [xaicli.explain(net, tmp_path, methods=methods, output=tmp_path / name, batch_size=3,
                              preprocess={"size": 8, "mean": 0.5, "std": 0.5, "crop_pct": 1.0})
               for net, name in zip(nets, ("pinned", "free"))]
    assert [r.exit_code for r in results] == [0, 0]
    for method in methods:
        for i in range(5):
            got, want = (np.load(tmp_path / name / "arrays" / method / f"img{i}.npz")["relevance"]
                         for name in ("pinned", "free"))
            close(torch.from_numpy(got), torch.from_numpy(want), f"{method} img{i}")
