"""meaningful / extremal perturbation on the trained digits CNN: small masks that remove the class,
the area constraint, batch-size invariance, and the blur and shift helpers."""
from __future__ import annotations

import pytest
import torch

from xaicli.model import Model
from xaicli.rng import BatchRNG
from xaicli_plugins.methods.perturbation import (
    area_loss, extremal_perturbation, gaussian_blur, meaningful_perturbation, shift,
)


@pytest.fixture
def model(digits) -> Model:
    return Model("digits", digits.spec, torch.device("cpu"), module=digits.module)


def target_prob(module: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(x).softmax(1).gather(1, t[:, None])[:, 0]


def test_deletion_masks_are_small_and_remove_the_class(model, digits):
    """Measured on 16 digits with the defaults (8×8 mask, jitter 1) but 150 steps: 15/16 delete ≤ 20%
    of the area and at least halve p_t; the test asks for ≥ 80% of the inputs."""
    x, t = digits.x[:16], digits.y[:16]
    out = meaningful_perturbation(model, x, t, BatchRNG(range(16)), steps=150, max_batch=16)
    deleted = out.relevance[:, 0].flatten(1).mean(1)  # soft area of 1 − m
    before = target_prob(digits.module, x, t)
    ok = (deleted <= 0.2) & (out.extras["target_prob"] <= before / 2)
    assert ok.float().mean().item() >= 0.8, (deleted, out.extras["target_prob"])
    assert out.extras["mask"].shape == (16, 8, 8)
    assert ((out.extras["mask"] >= 0) & (out.extras["mask"] <= 1)).all()


def test_same_masks_for_batch_size_one_and_eight(model, digits):
    """100 steps: without padding chunks to whole row blocks, masks part ways (measured up to 5e-2)."""
    x, t, rng = digits.x[:8], digits.y[:8], BatchRNG(range(50, 58))
    batch = meaningful_perturbation(model, x, t, rng, steps=100, max_batch=3)
    for i in range(8):
        single = meaningful_perturbation(model, x[i : i + 1], t[i : i + 1], rng[i : i + 1], steps=100)
        assert (batch.relevance[i : i + 1] - single.relevance).abs().max().item() <= 1e-6, i


def test_extremal_preserve_mask_has_the_requested_area_and_keeps_the_class(model, digits):
    x, t = digits.x[:6], digits.y[:6]
    out = extremal_perturbation(model, x, t, BatchRNG(range(6)), area=0.3, steps=100, sigma=10.0)
    kept = out.extras["mask"].flatten(1)
    assert (kept.mean(1) - 0.3).abs().max() <= 0.05
    blurred_prob = target_prob(digits.module, gaussian_blur(x, 10.0), t)
    assert (out.extras["target_prob"] > blurred_prob).float().mean() >= 0.8


def test_area_loss_and_shift_helpers():
    region = torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]).view(2, 1, 2, 2)
    assert area_loss(region, 0.25).tolist() == [0.0, 0.25]  # second mask has one cell too many
    image = torch.arange(9.0).view(1, 1, 3, 3).repeat(2, 1, 1, 1)
    moved = shift(image, torch.tensor([[1, 0], [0, -1]]))
    assert moved[0, 0].tolist() == [[0, 1, 2], [0, 1, 2], [3, 4, 5]]
    assert moved[1, 0].tolist() == [[1, 2, 2], [4, 5, 5], [7, 8, 8]]
    constant = torch.full((1, 2, 9, 9), 3.0)
    assert torch.allclose(gaussian_blur(constant, 2.0), constant)
