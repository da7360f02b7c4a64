"""integrated_gradients against captum's IntegratedGradients (every integration rule, ≤ 1e-4 relative)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from captum.attr import IntegratedGradients
from PIL import Image

from xaicli.errors import UsageError
from xaicli.model import InputSpec, Model
from xaicli.rng import BatchRNG
from xaicli_plugins.methods.integrated_gradients import INTEGRATIONS, integrated_gradients
from xaicli_plugins.methods.perturbation import gaussian_blur


@pytest.fixture
def model(digits) -> Model:
    return Model("digits", digits.spec, torch.device("cpu"), module=digits.module)


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("integration", INTEGRATIONS)
def test_matches_captum_for_every_integration_rule(model, digits, integration):
    x, t = digits.x[:4], digits.y[:4]
    ours = integrated_gradients(model, x, t, BatchRNG(range(4)), baseline="mean", steps=16, integration=integration,
                                max_batch=24)
    ref, delta = IntegratedGradients(digits.module).attribute(
        x, baselines=torch.zeros_like(x), target=t, n_steps=16, method=integration, return_convergence_delta=True
    )
    assert relative_error(ours.relevance, ref) <= 1e-4
    scale = ref.abs().sum(dim=(1, 2, 3)).max().item()
    assert torch.allclose(ours.extras["completeness_gap"], delta.float(), atol=1e-4 * scale)


@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_captum_on_random_resnet_with_black_and_blur_baselines(channels_last):
    """Captum runs our Model, so both feed the module the same layout: on a random-init resnet the
    path crosses ReLU kinks where NCHW/NHWC rounding alone moves the blur result by ~4e-3."""
    torch.manual_seed(0)
    module = torchvision.models.resnet18(weights=None, num_classes=7).eval()
    model = Model("resnet18", InputSpec(size=(64, 64)), torch.device("cpu"), module=module, channels_last=channels_last)
    reference = IntegratedGradients(model)  # captum takes any callable
    x, t = torch.randn(2, 3, 64, 64), torch.tensor([1, 5])
    black = ((0 - torch.tensor(model.spec.mean)) / torch.tensor(model.spec.std)).view(1, 3, 1, 1).expand_as(x)
    for name, base in (("zeros", black), ("blur", gaussian_blur(x, 3.0))):
        ours = integrated_gradients(model, x, t, BatchRNG([0, 1]), baseline=name, sigma=3.0, steps=8, max_batch=5)
        ref = reference.attribute(x, baselines=base, target=t, n_steps=8)
        assert relative_error(ours.relevance, ref) <= 1e-4, name


def test_gausslegendre_completeness_gap_is_small_and_logits_are_reported(model, digits):
    x, t = digits.x[:6], digits.y[:6]
    out = integrated_gradients(model, x, t, BatchRNG(range(6)), steps=64)
    black = torch.full_like(x, -0.25 / 0.35)
    f_x = digits.module(x).gather(1, t[:, None])[:, 0].detach()
    f_b = digits.module(black).gather(1, t[:, None])[:, 0].detach()
    assert torch.allclose(out.extras["baseline_logit"], f_b, atol=1e-5)
    gap = out.relevance.sum(dim=(1, 2, 3)) - (f_x - f_b)
    assert torch.allclose(out.extras["completeness_gap"], gap, atol=1e-4)
    assert (gap.abs() / (f_x - f_b).abs()).max() < 0.05  # 64 Gauss–Legendre nodes integrate the path closely


def test_uniform_baseline_comes_from_each_inputs_stream(model, digits):
    x, t = digits.x[:3], digits.y[:3]
    rng = BatchRNG([11, 12, 13])
    both = integrated_gradients(model, x, t, rng, baseline="uniform", steps=4)
    last = integrated_gradients(model, x[2:], t[2:], rng[2:], baseline="uniform", steps=4)
    assert torch.allclose(both.relevance[2:], last.relevance, atol=1e-6)
    noise = (rng[[0]].uniform((1, 32, 32), stream="baseline") - 0.25) / 0.35
    expected = digits.module(noise)[0, t[0]].item()
    assert both.extras["baseline_logit"][0].item() == pytest.approx(expected, abs=1e-5)


def test_image_file_baseline_is_preprocessed_with_the_model_spec(model, digits, tmp_path):
    path = tmp_path / "base.png"
    Image.fromarray(digits.raw[5]).save(path)
    x, t = digits.x[:2], digits.y[:2]
    out = integrated_gradients(model, x, t, BatchRNG([0, 1]), baseline=str(path), steps=4)
    base = torch.from_numpy(digits.raw[5].astype(np.float32) / 255)[None, None].expand(2, 1, 32, 32)
    base = (base - 0.25) / 0.35
    ref = IntegratedGradients(digits.module).attribute(x, baselines=base, target=t, n_steps=4)
    assert relative_error(out.relevance, ref) <= 1e-4
    with pytest.raises(UsageError, match="zeros, mean, blur, uniform or an image file"):
        integrated_gradients(model, x, t, BatchRNG([0, 1]), baseline=str(tmp_path / "missing.png"))


def test_interpolated_images_are_chunked_by_max_batch(digits, counted):
    sizes = counted.sizes
    model = Model("digits", digits.spec, torch.device("cpu"), module=counted)
    integrated_gradients(model, digits.x[:3], digits.y[:3], BatchRNG(range(3)), steps=10, max_batch=7)
    assert sizes[:-1] == [7, 7, 7, 7, 2] and sizes[-1] == 6  # 30 path points, then f(x) and f(x̄) together
