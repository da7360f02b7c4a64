"""lime: agreement with captum's Lime (same segments, samples, kernel, ridge), exact surrogate fits,
forward-only ONNX models, batch-size invariance and chunked evaluation."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from captum._utils.models.linear_model import SkLearnRidge
from captum.attr import Lime
from sklearn.linear_model import Lasso, Ridge

from xaicli.model import Model
from xaicli.rng import BatchRNG
from xaicli_plugins.methods.lime import fit_linear, lime


@pytest.fixture
def model(digits) -> Model:
    return Model("digits", digits.spec, torch.device("cpu"), module=digits.module)


def lime_kernel(original, perturbed, interpretable, **kwargs) -> torch.Tensor:
    """Our (and the lime package's) weight: cosine distance of the binary sample to all-ones, width 0.25."""
    distance = 1 - (interpretable.float().sum() / interpretable.numel()).sqrt()
    return torch.exp(-distance**2 / (2 * 0.25**2))


def test_segment_coefficients_agree_with_captum_lime(model, digits):
    """Captum gets our slic segments as feature_mask, our kernel and Ridge(alpha=1); measured r ≥ 0.97."""
    x, t = digits.x[:3], digits.y[:3]
    ours = lime(model, x, t, BatchRNG(range(3)), segments=25, compactness=0.1, samples=1000)
    torch.manual_seed(0)
    reference = Lime(digits.module, interpretable_model=SkLearnRidge(alpha=1.0), similarity_func=lime_kernel)
    for i in range(3):
        k = int(ours.extras["n_segments"][i])
        assert k >= 12
        mask = ours.extras["segments"][i].long()[None, None]
        ref = reference.attribute(x[i : i + 1], target=int(t[i]), feature_mask=mask, baselines=0.0, n_samples=1000,
                                  perturbations_per_eval=250, return_input_shape=False)[0]
        r = np.corrcoef(ours.extras["coefficients"][i, :k].numpy(), ref.numpy())[0, 1]
        assert r >= 0.9, (i, r)


def test_surrogate_fits_equal_sklearn_weighted_ridge_and_lasso():
    gen = torch.Generator().manual_seed(0)
    z = (torch.rand(2, 400, 12, generator=gen) < 0.5).float()
    z[1, :, 9:] = 0  # second input has 9 segments, padded to 12
    truth = torch.randn(2, 12, generator=gen)
    y = (z * truth[:, None]).sum(-1) + 0.3 * torch.randn(2, 400, generator=gen) + 2.0
    w = torch.rand(2, 400, generator=gen)
    counts = torch.tensor([12, 9])
    fits = (("ridge", 1.0, Ridge(alpha=1.0)), ("lasso", 0.02, Lasso(alpha=0.02, tol=1e-12, max_iter=100000)))
    for regression, alpha, sk in fits:
        coef, intercept = fit_linear(z, y, w, counts, regression, alpha)
        for i, k in enumerate(counts.tolist()):
            sk.fit(z[i, :, :k].double().numpy(), y[i].double().numpy(), sample_weight=w[i].double().numpy())
            assert np.abs(coef[i, :k].numpy() - sk.coef_).max() < 1e-5, regression
            assert abs(intercept[i].item() - sk.intercept_) < 1e-5, regression
            assert (coef[i, k:] == 0).all()


def test_forward_only_onnx_model_gives_the_eager_result(model, digits):
    session = ort.InferenceSession(str(digits.onnx), providers=["CPUExecutionProvider"])
    onnx_model = Model("digits-onnx", digits.spec, torch.device("cpu"),
                       forward_fn=lambda x: torch.from_numpy(session.run(None, {"input": x.numpy()})[0]))
    x, t, rng = digits.x[:2], digits.y[:2], BatchRNG([3, 4])
    eager = lime(model, x, t, rng, segmentation="grid", segments=16, samples=200)
    onnx = lime(onnx_model, x, t, rng, segmentation="grid", segments=16, samples=200)
    assert torch.allclose(eager.relevance, onnx.relevance, atol=1e-4)


def test_same_result_for_batch_size_one_and_eight(model, digits):
    x, t, rng = digits.x[:8], digits.y[:8], BatchRNG(range(100, 108))
    batch = lime(model, x, t, rng, compactness=0.1, segments=20, samples=200, baseline="blur", sigma=2.0)
    single = lime(model, x[:1], t[:1], rng[0:1], compactness=0.1, segments=20, samples=200, baseline="blur", sigma=2.0)
    assert (batch.relevance[:1] - single.relevance).abs().max().item() <= 1e-6


def test_grid_segments_paint_coefficients_and_masked_copies_are_chunked(digits, counted):
    sizes = counted.sizes
    counting = Model("digits", digits.spec, torch.device("cpu"), forward_fn=counted)
    x, t = digits.x[:3], digits.y[:3]
    out = lime(counting, x, t, BatchRNG(range(3)), segmentation="grid", segments=16, samples=100, max_batch=64,
               baseline="zeros", regression="lasso")
    assert max(sizes) <= 64 and sum(sizes) == 300
    segments = out.extras["segments"]
    assert segments.dtype == torch.int32 and segments.shape == (3, 32, 32)
    assert torch.equal(segments[0, :8, :8], torch.zeros(8, 8, dtype=torch.int32))
    assert torch.equal(segments[0, 24:, 24:], torch.full((8, 8), 15, dtype=torch.int32))
    assert out.extras["n_segments"].tolist() == [16, 16, 16]
    painted = out.extras["coefficients"].gather(1, segments.flatten(1).long()).view(3, 1, 32, 32)
    assert torch.equal(out.relevance, painted)


@pytest.mark.parametrize("segmentation", ["slic", "quickshift"])
def test_colour_photo_segmentations_label_every_pixel(segmentation):
    """scikit-image segments the de-normalised RGB photo; labels are 0..k−1 and the map paints them."""
    from skimage import data

    from xaicli.model import InputSpec

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 5, stride=4), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 31 * 31, 5)).eval()
    spec = InputSpec(size=(128, 128))
    photo = torch.from_numpy(data.astronaut()[::4, ::4].copy()).permute(2, 0, 1)[None].float() / 255
    x = (photo - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    out = lime(Model("tiny", spec, torch.device("cpu"), module=net), x, torch.tensor([2]), BatchRNG([0]),
               segmentation=segmentation, segments=30, samples=64)
    labels, k = out.extras["segments"][0].long(), int(out.extras["n_segments"][0])
    assert 5 <= k <= 80 and torch.equal(labels.unique(), torch.arange(k))
    assert torch.equal(out.relevance[0, 1], out.extras["coefficients"][0][labels])
