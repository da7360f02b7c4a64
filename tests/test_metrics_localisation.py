"""Localisation metrics on a model trained here to find digits pasted at random positions on noise:
gradient × input must beat a random and an inverted attribution on every metric."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from xaicli.descriptors import MetricContext
from xaicli.model import InputSpec, Model
from xaicli.params import resolve
from xaicli.registry import default_registry
from xaicli.rng import BatchRNG
from xaicli_plugins.methods.gradient import gradient_x_input

SIZE, DIGIT = 40, 16


def pasted_digits(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits (16×16) on N(0, 0.3²) noise at random positions: inputs [n,1,40,40], labels, box masks."""
    from sklearn.datasets import load_digits

    data = load_digits()
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randint(len(data.target), (n,), generator=gen)
    digits = torch.from_numpy(data.images / 16.0).float()[pick][:, None]
    digits = nn.functional.interpolate(digits, size=(DIGIT, DIGIT), mode="bilinear", align_corners=False)
    x = 0.3 * torch.randn(n, 1, SIZE, SIZE, generator=gen)
    masks = torch.zeros(n, 1, SIZE, SIZE, dtype=torch.bool)
    top, left = torch.randint(SIZE - DIGIT + 1, (2, n), generator=gen)
    for i in range(n):  # building the dataset, not a metric
        t, l = int(top[i]), int(left[i])
        x[i, :, t : t + DIGIT, l : l + DIGIT] += 2 * digits[i]
        masks[i, :, t : t + DIGIT, l : l + DIGIT] = True
    return x, torch.from_numpy(data.target).long()[pick], masks


@pytest.fixture(scope="module")
def located() -> tuple[Model, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x, y, _ = pasted_digits(1500, seed=1)
    net = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(5):
        for idx in torch.randperm(len(y)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    net.eval()
    test_x, test_y, masks = pasted_digits(48, seed=2)
    with torch.no_grad():
        assert (net(test_x).argmax(1) == test_y).float().mean() > 0.75
    return Model("pasted", InputSpec(size=(SIZE, SIZE), channels=1, mean=(0.0,), std=(1.0,)), torch.device("cpu"), module=net), test_x, test_y, masks


@pytest.mark.parametrize("name,params", [
    ("pointing_game", {"abs": True}),
    ("relevance_mass_accuracy", {"abs": True}),
    ("relevance_rank_accuracy", {"abs": True}),
    ("top_k_intersection", {"k": 100, "abs": True}),
    ("attribution_localisation", {}),
    ("auc", {"abs": True}),
])
def test_gradient_x_input_localises_better_than_random_and_inverted(located, name, params):
    """Signed gradient × input puts both signs on the digit, so the metrics read |R| (as Quantus'
    AttributionLocalisation does by default); `inverted` reverses the importance order of |R|."""
    model, x, y, masks = located
    good = gradient_x_input(model, x, y, BatchRNG(range(len(x)))).relevance.abs()
    inverted = good.flatten(1).amax(1).view(-1, 1, 1, 1) - good
    candidates = {"gradient_x_input": good, "random": torch.randn(good.shape, generator=torch.Generator().manual_seed(3)),
                  "inverted": inverted}
    metric = default_registry().metric(name)
    means = {}
    for label, relevance in candidates.items():
        ctx = MetricContext(explain=None, masks=masks, rng=BatchRNG(range(len(x))))
        means[label] = float(np.nanmean(metric.score(model, x, y, relevance, ctx, **resolve(metric.params, params)).numpy()))
    assert means["gradient_x_input"] > means["random"] + 0.3, means
    assert means["gradient_x_input"] > means["inverted"] + 0.3, means
