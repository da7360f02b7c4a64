"""Metric building blocks and properties checked against hand-computed values and references
(scipy, skimage, numpy), batching invariance, and model copies that leave the user's model alone."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import entropy, spearmanr
from skimage.metrics import structural_similarity

from xaicli.descriptors import MetricContext
from xaicli.model import InputSpec, Model
from xaicli.params import resolve
from xaicli.registry import default_registry
from xaicli.rng import BatchRNG
from xaicli_plugins.methods.gradient import gradient_x_input, saliency
from xaicli_plugins.metrics.layers import shifted
from xaicli_plugins.metrics.similarity import histogram_entropy, ssim, spearman

FAMILIES = {"faithfulness", "robustness", "localisation", "complexity", "randomisation", "axiomatic"}


def run(name: str, model: Model, x, y, relevance, method=saliency, masks=None, seeds=None, **params):
    """Score like the run loop: returns (scores, ctx.details)."""
    metric = default_registry().metric(name)
    rng = BatchRNG(seeds if seeds is not None else range(len(x)))
    explain = lambda xx, t, m=None, r=None: method(m or model, xx, t, r).relevance  # noqa: E731
    ctx = MetricContext(explain=explain, masks=masks, rng=rng)
    return metric.score(model, x, y, relevance, ctx, **resolve(metric.params, params)), ctx.details


@pytest.fixture(scope="module")
def model(digits) -> Model:
    return Model("digits", digits.spec, torch.device("cpu"), module=digits.module)


def linear_model(weight: torch.Tensor) -> Model:
    """f(x) = W · flatten(x), no bias: gradients are constant and completeness is exact."""
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)).eval()
    with torch.no_grad():
        net[1].weight.copy_(weight)
    return Model("linear", InputSpec(size=(8, 8), channels=1, mean=(0.0,), std=(1.0,)), torch.device("cpu"), module=net)


def test_every_metric_declares_family_direction_and_documented_params():
    metrics = default_registry().plugins["metric"]
    assert {"pixel_flipping", "region_perturbation", "faithfulness_correlation", "road", "selectivity",
            "max_sensitivity", "avg_sensitivity", "pointing_game", "relevance_mass_accuracy",
            "relevance_rank_accuracy", "top_k_intersection", "attribution_localisation", "auc", "sparseness",
            "complexity", "mst_compactness", "mprt", "smooth_mprt", "efficient_mprt", "random_logit",
            "completeness", "non_sensitivity", "input_invariance"} <= set(metrics)
    for metric in metrics.values():
        assert metric.family in FAMILIES and isinstance(metric.higher_is_better, bool)
        assert all(p.doc for p in metric.params)
        assert metric.needs_masks == (metric.family == "localisation")
        if metric.family in ("faithfulness", "robustness", "randomisation") or metric.needs_explain:
            assert "max_batch" in {p.name for p in metric.params}, metric.name


def test_similarities_match_scipy_and_skimage():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 16, 16, generator=gen).cumsum(1)
    b = a + 2 * torch.randn(3, 16, 16, generator=gen)
    b[0, :4] = 0.0  # ties
    a[1, :2] = 1.0
    rho = [spearmanr(a[i].flatten(), b[i].flatten())[0] for i in range(3)]
    assert np.allclose(spearman(a, b).numpy(), rho, atol=1e-6)
    ref = [structural_similarity(a[i].double().numpy(), b[i].double().numpy(),
                                 data_range=float(torch.cat([a[i], b[i]]).max() - torch.cat([a[i], b[i]]).min()))
           for i in range(3)]
    assert np.allclose(ssim(a, b).numpy(), ref, atol=1e-6)
    values = a.flatten(1)
    expected = [entropy(np.histogram(v.numpy(), bins=20)[0]) for v in values]
    assert np.allclose(histogram_entropy(values, 20).numpy(), expected, atol=1e-5)


def salient(points: list[tuple[int, int]]) -> torch.Tensor:
    r = torch.zeros(1, 1, 20, 20)
    for i, (row, col) in enumerate(points):
        r[0, 0, row, col] = 1.0 + 0.01 * i
    return r


def test_mst_compactness_hand_computed():
    x, y = torch.zeros(1, 1, 20, 20), torch.zeros(1, dtype=torch.long)
    m = linear_model(torch.zeros(2, 400))
    block = [(r, c) for r in range(5, 9) for c in range(5, 9)]  # 16 points, fraction 0.04 of 400
    score, details = run("mst_compactness", m, x, y, salient(block), fraction=0.04)
    assert score.item() == pytest.approx(1.0) and details["clusters"].item() == 1
    two = [(r, c) for r in (2, 3) for c in range(4)] + [(r, c) for r in (2, 3) for c in range(14, 18)]
    score, details = run("mst_compactness", m, x, y, salient(two), fraction=0.04)
    # 14 unit edges inside the two 2×4 blocks and one gap of 11 pixels (column 3 -> 14)
    assert details["clusters"].item() == 2 and details["length"].item() == pytest.approx(25 / 15)
    assert score.item() == pytest.approx(15 / 25 * (1 - 1 / 15))
    grid = [(r, c) for r in range(0, 20, 5) for c in range(0, 20, 5)]
    score, details = run("mst_compactness", m, x, y, salient(grid), fraction=0.04)
    assert score.item() == 0.0 and details["clusters"].item() == 16


def test_completeness_is_exact_for_gradient_x_input_on_a_linear_model():
    gen = torch.Generator().manual_seed(1)
    m = linear_model(torch.randn(3, 64, generator=gen))
    x, y = torch.randn(4, 1, 8, 8, generator=gen), torch.tensor([0, 1, 2, 0])
    relevance = gradient_x_input(m, x, y, None).relevance
    gap, _ = run("completeness", m, x, y, relevance, baseline="zero")
    assert gap.max().item() < 1e-5
    gap, _ = run("completeness", m, x, y, relevance + 0.01)  # 64 pixels × 0.01, black baseline
    assert gap.min().item() > 0.0


def test_sensitivity_zero_for_constant_gradients_positive_otherwise():
    gen = torch.Generator().manual_seed(2)
    m = linear_model(torch.randn(3, 64, generator=gen))
    x, y = torch.randn(4, 1, 8, 8, generator=gen), torch.tensor([0, 1, 2, 0])
    flat, _ = run("max_sensitivity", m, x, y, saliency(m, x, y, None).relevance, samples=3)
    assert flat.abs().max().item() < 1e-6
    moving, _ = run("avg_sensitivity", m, x, y, gradient_x_input(m, x, y, None).relevance, method=gradient_x_input, samples=3)
    assert (moving > 0.01).all()


def test_non_sensitivity_counts_disagreeing_patches():
    weight = torch.zeros(2, 8, 8)
    weight[0, :, :4] = 1.0  # class 0 reads the left half only
    m = linear_model(weight.view(2, 64))
    x, y = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(4)) + 1.0, torch.tensor([0, 0])
    left = gradient_x_input(m, x, y, None).relevance  # zero on the right half, which the model ignores
    score, _ = run("non_sensitivity", m, x, y, left, patch_size=2, softmax=False)
    assert score.tolist() == [0.0, 0.0]
    score, _ = run("non_sensitivity", m, x, y, left.flip(-1), patch_size=2, softmax=False)  # relevance on the ignored half
    assert score.tolist() == [1.0, 1.0]


def test_input_invariance_saliency_yes_gradient_x_input_no(model, digits):
    x, y = digits.x[:4], digits.y[:4]
    assert torch.allclose(shifted(model, -1.0)(x - 1.0), model(x), atol=1e-5)
    yes, details = run("input_invariance", model, x, y, saliency(model, x, y, None).relevance)
    assert yes.tolist() == [1.0] * 4 and details["deviation"].max().item() < 1e-4
    no, details = run("input_invariance", model, x, y, gradient_x_input(model, x, y, None).relevance, method=gradient_x_input)
    assert no.tolist() == [0.0] * 4 and (details["deviation"] > 0.01).all()


def test_scores_do_not_depend_on_chunking_or_batch_composition(model, digits):
    """Chunks of 3 or 64 and a batch of 4 or 8 give each input the same score (per-input streams)."""
    x, y = digits.x[:8], digits.y[:8]
    relevance = gradient_x_input(model, x, y, None).relevance
    seeds = [11 * i for i in range(8)]
    for name, params in [("pixel_flipping", {"steps": 8}), ("faithfulness_correlation", {"runs": 6}),
                         ("max_sensitivity", {"samples": 2}), ("road", {"percentages": [20, 60]})]:
        small, _ = run(name, model, x, y, relevance, method=gradient_x_input, seeds=seeds, max_batch=3, **params)
        large, _ = run(name, model, x, y, relevance, method=gradient_x_input, seeds=seeds, max_batch=64, **params)
        half, _ = run(name, model, x[4:], y[4:], relevance[4:], method=gradient_x_input, seeds=seeds[4:], **params)
        assert torch.allclose(small, large, atol=1e-5), name
        assert torch.allclose(half, large[4:], atol=1e-5), name


def test_perturbed_copies_go_through_the_model_in_bounded_chunks(digits, counted):
    sizes = counted.sizes
    counting = Model("digits", digits.spec, torch.device("cpu"), forward_fn=counted)
    x, y = digits.x[:5], digits.y[:5]
    relevance = torch.randn(5, 1, 32, 32, generator=torch.Generator().manual_seed(5))
    run("pixel_flipping", counting, x, y, relevance, steps=10, max_batch=16)
    assert max(sizes) <= 16 and sum(sizes) == 5 * 10 and len(sizes) == math.ceil(50 / 16)


def test_region_perturbation_lerf_is_negated_area():
    gen = torch.Generator().manual_seed(3)
    m = linear_model(torch.randn(2, 64, generator=gen))
    x, y = torch.randn(2, 1, 8, 8, generator=gen), torch.tensor([0, 1])
    relevance = gradient_x_input(m, x, y, None).relevance
    morf, _ = run("region_perturbation", m, x, y, relevance, patch_size=2, regions=16, softmax=False)
    lerf, _ = run("region_perturbation", m, x, y, relevance, patch_size=2, regions=16, softmax=False, order="lerf")
    # removing every patch in either order ends at the same point; MoRF drops earlier, so its area is larger
    assert (morf > 0).all() and (morf > -lerf).all()


def test_randomisation_copies_never_touch_the_users_model(model, digits):
    x, y = digits.x[:4], digits.y[:4]
    before = {k: v.clone() for k, v in digits.module.state_dict().items()}
    relevance = saliency(model, x, y, None).relevance
    for name, params in (("mprt", {}), ("smooth_mprt", {"samples": 2}), ("efficient_mprt", {})):
        run(name, model, x, y, relevance, **params)
    assert all(torch.equal(before[k], v) for k, v in digits.module.state_dict().items())
    scripted = torch.jit.load(str(digits.torchscript))
    script_model = Model("ts", digits.spec, torch.device("cpu"), module=scripted)
    reference = scripted(x).detach()
    scores, details = run("mprt", script_model, x, y, relevance)
    assert list(details) == ["13", "9", "8", "5", "4", "1", "0"]  # TorchScript layers, output first
    assert torch.equal(scripted(x), reference) and scores.abs().max() < 0.9


def test_smooth_mprt_with_one_sample_is_mprt(model, digits):
    x, y = digits.x[:4], digits.y[:4]
    relevance = saliency(model, x, y, None).relevance
    smooth, smooth_layers = run("smooth_mprt", model, x, y, relevance, samples=1, order="top_down")
    plain, plain_layers = run("mprt", model, x, y, relevance)
    assert torch.allclose(smooth, plain, atol=1e-6) and list(smooth_layers) == list(plain_layers)


def test_random_logit_explains_another_class(model, digits):
    x, y = digits.x[:8], digits.y[:8]
    asked = []
    method = lambda m, xx, t, r: (asked.append(t.clone()), saliency(m, xx, t, r))[1]  # noqa: E731
    scores, _ = run("random_logit", model, x, y, saliency(model, x, y, None).relevance, method=method)
    other = torch.cat(asked)
    assert (other != y).all() and ((other >= 0) & (other < 10)).all() and scores.shape == (8,)
    same, _ = run("random_logit", model, x, y, saliency(model, x, y, None).relevance, method=method)
    assert torch.equal(same, scores)  # the class is drawn from the input's stream
