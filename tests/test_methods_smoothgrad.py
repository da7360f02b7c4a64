"""smoothgrad / vargrad: the documented noise streams, composition with other methods, batch-size
invariance and chunking."""
from __future__ import annotations

import pytest
import torch

from xaicli.errors import UsageError
from xaicli.model import Model
from xaicli.rng import BatchRNG
from xaicli_plugins.methods.gradient import saliency
from xaicli_plugins.methods.integrated_gradients import integrated_gradients
from xaicli_plugins.methods.smoothgrad import smoothgrad, vargrad


@pytest.fixture
def model(digits) -> Model:
    return Model("digits", digits.spec, torch.device("cpu"), module=digits.module)


def test_mean_and_variance_of_saliency_over_the_documented_noise(model, digits):
    """Copy k of input i is x_i + σ_i·ε with ε from stream noise/k, σ_i = noise·(max − min of x_i)."""
    x, t, rng = digits.x[:3], digits.y[:3], BatchRNG([7, 8, 9])
    sigma = 0.2 * (x.flatten(1).amax(1) - x.flatten(1).amin(1)).view(-1, 1, 1, 1)
    grads = torch.stack([
        saliency(model, x + sigma * rng.normal((1, 32, 32), stream=f"noise/{k}"), t, rng).relevance for k in range(5)
    ])
    mean = smoothgrad(model, x, t, rng, samples=5, noise=0.2, max_batch=4).relevance
    var = vargrad(model, x, t, rng, samples=5, noise=0.2, max_batch=4).relevance
    assert torch.allclose(mean, grads.mean(0), atol=1e-6)
    assert torch.allclose(var, grads.var(0, unbiased=False), atol=1e-6)
    assert var.abs().max() > 1e-4


def test_without_noise_it_is_the_base_method(model, digits):
    x, t, rng = digits.x[:4], digits.y[:4], BatchRNG(range(4))
    plain = saliency(model, x, t, rng, abs=True).relevance
    smooth = smoothgrad(model, x, t, rng, samples=3, noise=0.0, base_params={"abs": True}).relevance
    assert torch.allclose(smooth, plain, atol=1e-6)
    assert vargrad(model, x, t, rng, samples=3, noise=0.0).relevance.abs().max() <= 1e-10


def test_batch_size_invariant_with_a_stochastic_base(model, digits):
    """Integrated gradients with a uniform-noise baseline draws from the child streams smoothgrad hands it."""
    x, t, rng = digits.x[:8], digits.y[:8], BatchRNG(range(20, 28))
    params = {"base": "integrated_gradients", "base_params": {"baseline": "uniform", "steps": 4}, "samples": 6}
    batch = smoothgrad(model, x, t, rng, max_batch=16, **params).relevance
    single = smoothgrad(model, x[:1], t[:1], rng[0:1], max_batch=5, **params).relevance
    assert (batch[:1] - single).abs().max().item() <= 1e-6
    ig = integrated_gradients(model, x[:1], t[:1], rng[0:1], baseline="uniform", steps=4).relevance
    assert not torch.allclose(single, ig, atol=1e-3)  # the noise and the baselines really vary


def test_noisy_copies_are_chunked_and_unknown_base_is_reported(digits, counted):
    sizes = counted.sizes
    model = Model("digits", digits.spec, torch.device("cpu"), module=counted)
    smoothgrad(model, digits.x[:3], digits.y[:3], BatchRNG(range(3)), samples=10, max_batch=8)
    assert sizes == [8, 8, 8, 6]
    with pytest.raises(UsageError, match="unknown method 'salency'.*saliency"):
        smoothgrad(model, digits.x[:1], digits.y[:1], BatchRNG([0]), base="salency")
    with pytest.raises(UsageError, match=r"base_params.steps: must be >= 1; got 0 \(of base method integrated_grad"):
        smoothgrad(model, digits.x[:1], digits.y[:1], BatchRNG([0]), base="integrated_gradients",
                   base_params={"steps": 0})
