"""saliency, gradient × input and occlusion against captum (exact / ≤ 1e-5)."""
from __future__ import annotations

import pytest
import torch
from captum.attr import InputXGradient, Occlusion, Saliency

from xaicli.model import InputSpec, Model
from xaicli.rng import BatchRNG
from xaicli_plugins.methods.gradient import gradient_x_input, saliency
from xaicli_plugins.methods.occlusion import occlusion


@pytest.fixture
def model(digits) -> Model:
    return Model("digits", digits.spec, torch.device("cpu"), module=digits.module)


def test_saliency_and_gradient_x_input_equal_captum(model, digits):
    x, t = digits.x[:8], digits.y[:8]
    rng = BatchRNG(range(8))
    assert torch.equal(saliency(model, x, t, rng, abs=True).relevance, Saliency(digits.module).attribute(x, target=t))
    assert torch.equal(
        saliency(model, x, t, rng).relevance, Saliency(digits.module).attribute(x, target=t, abs=False)
    )
    assert torch.equal(gradient_x_input(model, x, t, rng).relevance, InputXGradient(digits.module).attribute(x, target=t))


def test_kept_forward_serves_the_batch_gradients_with_one_forward(digits, counted):
    module = digits.module
    model = Model("digits", digits.spec, torch.device("cpu"), module=counted)
    x, t = digits.x[:8], digits.y[:8]
    rng = BatchRNG(range(8))
    logits = model.keep_forward(x)
    kept_saliency = saliency(model, x, t, rng).relevance
    kept_gxi = gradient_x_input(model, x, t, rng).relevance
    assert counted.sizes == [8]  # the kept forward only: both gradients came from its graph
    model.release()
    assert torch.equal(logits, module(x))
    assert torch.equal(kept_saliency, Saliency(module).attribute(x, target=t, abs=False))
    assert torch.equal(kept_gxi, InputXGradient(module).attribute(x, target=t))
    saliency(model, x, t, rng)  # released: a fresh forward and backward
    assert counted.sizes == [8, 8]


@pytest.mark.parametrize("window,stride,baseline", [(8, 4, 0.0), (5, 3, -1.0), ([6, 4], [3, 2], 0.5)])
def test_occlusion_matches_captum(model, digits, window, stride, baseline):
    x, t = digits.x[:4], digits.y[:4]
    ours = occlusion(model, x, t, BatchRNG(range(4)), window=window, stride=stride, baseline=baseline, max_batch=13)
    w = (window, window) if isinstance(window, int) else tuple(window)
    s = (stride, stride) if isinstance(stride, int) else tuple(stride)
    ref = Occlusion(digits.module).attribute(x, target=t, sliding_window_shapes=(1, *w), strides=(1, *s), baselines=baseline)
    assert (ours.relevance - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def test_occlusion_is_chunked_by_max_batch(digits, counted):
    """All occluded copies go through the model in chunks of at most max_batch, not one per window."""
    sizes = counted.sizes
    counting = Model("digits", digits.spec, torch.device("cpu"), forward_fn=counted)
    occlusion(counting, digits.x[:3], digits.y[:3], BatchRNG(range(3)), window=8, stride=4, max_batch=50)
    windows = 3 * 7 * 7
    assert max(sizes) <= 50
    assert sum(sizes) == windows + 3  # every window once, plus the unoccluded reference
    assert len(sizes) == 1 + -(-windows // 50)


def test_occlusion_rejects_window_larger_than_input(model, digits):
    with pytest.raises(ValueError, match="larger than the input"):
        occlusion(model, digits.x[:1], digits.y[:1], BatchRNG([0]), window=40)
