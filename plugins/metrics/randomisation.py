"""Randomisation metrics: an explanation of a randomised model, or of another class, should differ.

MPRT (Adebayo et al. 2018), smooth MPRT and efficient MPRT (Hedström et al. 2024), random logit
(Sixt et al. 2020). Layers are randomised on a deep copy of the model (see layers.py): the modules
that own parameters, ordered from the output back for `top_down`; the copy is wrapped in a new
Model and re-explained through ctx.explain in chunks of at most `max_batch` inputs. Per-layer
similarities go to ctx.details as `<layer>` (reported as `mprt/<layer>`), as Binder et al. 2023 ask.
Relevance maps are channel-summed, per-input normalised and |R| by default (Quantus' MPRT defaults).
"""
from __future__ import annotations

from typing import Callable

import torch

from xaicli import Metric, Param, hookimpl
from xaicli.chunking import AUTO, MaxBatch
from xaicli.descriptors import MetricContext
from xaicli.model import Model

from .layers import randomise, torch_copy, weighted_layers
from .shared import abs_param, explain_rows, max_batch_param, normalise_param, pixel_map, row_rng
from .similarity import histogram_entropy, similarity as compare


def _layer_similarities(
    model: Model, ctx: MetricContext, explain: Callable[[Model], torch.Tensor], reference: torch.Tensor,
    similarity: str, order: str, seed: int, normalise: bool, abs: bool,
) -> torch.Tensor:
    """Cascading randomisation: after each layer, similarity of `explain(copy)` to `reference`: [B, layers]."""
    copy_model, module = torch_copy(model)
    layers = weighted_layers(module)
    if order == "top_down":
        layers = layers[::-1]
    scores = []
    for name, layer in layers:
        randomise(layer, seed)
        score = compare(similarity, reference, pixel_map(explain(copy_model)[:, None], normalise, abs))
        ctx.details[name] = score
        scores.append(score)
    return torch.stack(scores, 1)


def mprt(
    model: Model, x: torch.Tensor, target: torch.Tensor, relevance: torch.Tensor, ctx: MetricContext,
    similarity: str = "spearman", order: str = "top_down", seed: int = 42, normalise: bool = True,
    abs: bool = True, max_batch: MaxBatch = AUTO,
) -> torch.Tensor:
    """Model parameter randomisation test: layers randomised one more at a time (cascading), R
    re-explained after each; headline = mean similarity over layers (lower is better), per-layer
    similarities in ctx.details. Eager models are randomised exactly as Quantus' MPRT (same seed)."""
    B = len(x)
    reference = pixel_map(relevance, normalise, abs)

    def explain(copy_model: Model) -> torch.Tensor:
        return explain_rows(ctx, lambda start, stop: x[start:stop], B, 1, target, max_batch, copy_model, key="mprt")

    return _layer_similarities(model, ctx, explain, reference, similarity, order, seed, normalise, abs).mean(1)


def smooth_mprt(
    model: Model, x: torch.Tensor, target: torch.Tensor, relevance: torch.Tensor, ctx: MetricContext,
    samples: int = 10, noise: float = 0.1, similarity: str = "spearman", order: str = "bottom_up",
    seed: int = 42, normalise: bool = True, abs: bool = True, max_batch: MaxBatch = AUTO,
) -> torch.Tensor:
    """sMPRT: as MPRT, but every explanation (the original one too) is the mean over `samples` copies
    of x with Gaussian noise of std noise·(max − min of x), the last copy noise-free (Quantus' scheme).
    Quantus defaults to 50 samples; we default to 10 (cost: samples × layers re-explanations). The
    same noise draws (per input and copy) are used for every layer."""
    B, _, H, W = x.shape
    sigma = noise * (x.flatten(1).amax(1) - x.flatten(1).amin(1))

    def noisy(start: int, stop: int) -> torch.Tensor:
        rows = torch.arange(start, stop)
        b, j = rows // samples, rows % samples
        eps = row_rng(ctx.rng, b, j, "smooth").normal(x.shape[1:], device=x.device)
        keep = (j < samples - 1).to(x.device).view(-1, 1, 1, 1)
        return x[b.to(x.device)] + eps * sigma[b.to(x.device)].view(-1, 1, 1, 1) * keep

    def explain(copy_model: Model | None) -> torch.Tensor:
        maps = explain_rows(ctx, noisy, B * samples, samples, target, max_batch, copy_model, stream="smooth",
                            key="smooth_mprt")
        return maps.view(B, samples, H, W).mean(1)

    reference = pixel_map(explain(None)[:, None], normalise, abs)
    return _layer_similarities(model, ctx, explain, reference, similarity, order, seed, normalise, abs).mean(1)


def efficient_mprt(
    model: Model, x: torch.Tensor, target: torch.Tensor, relevance: torch.Tensor, ctx: MetricContext,
    bins: int = 100, seed: int = 42, max_batch: MaxBatch = AUTO,
) -> torch.Tensor:
    """eMPRT: relative rise of the explanation's complexity when every layer is randomised,
    (H(R_random) − H(R)) / H(R), H the entropy of a `bins`-bin histogram of R (Quantus' defaults:
    raw R, 100 bins); higher is better. One re-explanation per input. ctx.details gets both entropies."""
    copy_model, module = torch_copy(model)
    for _, layer in weighted_layers(module):
        randomise(layer, seed)
    maps = explain_rows(ctx, lambda start, stop: x[start:stop], len(x), 1, target, max_batch, copy_model,
                        key="efficient_mprt")
    before = histogram_entropy(pixel_map(relevance).flatten(1), bins)
    after = histogram_entropy(maps.flatten(1), bins)
    ctx.details["entropy"] = before
    ctx.details["entropy_random"] = after
    return (after - before) / before


def random_logit(
    model: Model, x: torch.Tensor, target: torch.Tensor, relevance: torch.Tensor, ctx: MetricContext,
    similarity: str = "ssim", normalise: bool = True, abs: bool = False, max_batch: MaxBatch = AUTO,
) -> torch.Tensor:
    """Similarity of R to the explanation of a random other class (uniform over the other classes,
    from the input's own stream); lower is better. SSIM by default, as Quantus — computed on the 2-D
    map, where Quantus applies skimage's SSIM to the flattened 1-D map."""
    classes = model.predict(x[:1]).shape[1]
    if classes < 2:
        raise ValueError("random_logit needs a model with at least two classes")
    draw = ctx.rng.integers(classes - 1, (), device=x.device, stream="class")
    other = (target.to(x.device) + 1 + draw) % classes
    maps = explain_rows(ctx, lambda start, stop: x[start:stop], len(x), 1, other, max_batch, key="random_logit")
    return compare(similarity, pixel_map(relevance, normalise, abs), pixel_map(maps[:, None], normalise, abs))


SIMILARITIES = ("spearman", "pearson", "ssim")


@hookimpl
def xai_metrics() -> list[Metric]:
    def sim(default: str) -> Param:
        return Param("similarity", str, default, "similarity of relevance maps", choices=SIMILARITIES)

    def order(default: str) -> Param:
        return Param("order", str, default, "randomise from the output back (top_down) or from the input on (bottom_up)",
                     choices=("top_down", "bottom_up"))

    seed = Param("seed", int, 42, "seed of the layer re-initialisation (the same for every input)")
    return [
        Metric("mprt", "similarity of R after cascading layer randomisation (per layer in details)", "randomisation",
               mprt, higher_is_better=False, needs="gradient", needs_explain=True,
               params=(sim("spearman"), order("top_down"), seed, normalise_param(True), abs_param(True), max_batch_param())),
        Metric("smooth_mprt", "MPRT on noise-averaged explanations", "randomisation", smooth_mprt,
               higher_is_better=False, needs="gradient", needs_explain=True,
               params=(Param("samples", int, 10, "noisy copies averaged per explanation", low=1, high=100_000),
                       Param("noise", float, 0.1, "noise std as a share of the input's value range", low=0.0),
                       sim("spearman"), order("bottom_up"), seed, normalise_param(True), abs_param(True),
                       max_batch_param())),
        Metric("efficient_mprt", "relative rise of explanation entropy after full randomisation", "randomisation",
               efficient_mprt, higher_is_better=True, needs="gradient", needs_explain=True,
               params=(Param("bins", int, 100, "histogram bins of the entropy", low=2, high=100_000), seed, max_batch_param())),
        Metric("random_logit", "similarity of R to the explanation of a random other class", "randomisation",
               random_logit, higher_is_better=False, needs_explain=True,
               params=(sim("ssim"), normalise_param(True), abs_param(False), max_batch_param())),
    ]
