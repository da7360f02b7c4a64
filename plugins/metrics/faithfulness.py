"""Faithfulness metrics: does removing what R calls relevant change the model's output?

Pixel flipping, region perturbation, selectivity, faithfulness correlation and ROAD, after Quantus 0.6
(names and defaults), batched: every perturbed copy of every input of a batch goes through the model
in chunks of at most `max_batch` images. Relevance is summed over channels and pixels are removed
in all channels at once (see shared.py). Curves are summarised by their trapezoid area over an x axis
scaled to [0, 1], i.e. Quantus' `calculate_auc(curve) / (len(curve) - 1)`, so that scores do not
depend on the number of steps. Pixel flipping and region perturbation also report their curves, point
by point, as details `<metric>/curve_<k>` (what the HTML report plots).
"""
from __future__ import annotations

import math

from typing import Sequence

import torch

from xaicli import Metric, Param, hookimpl
from xaicli.chunking import AUTO, MaxBatch, chunked
from xaicli.descriptors import MetricContext
from xaicli.model import Model

from .imputation import impute
from .ordering import ranks
from .shared import (
    BASELINE, abs_param, baseline_values, curve_area, max_batch_param, normalise_param,
    patch_pixels, patch_sums, pixel_map, row_rng, softmax_param, stream_scores, steps_for, target_scores,
)
from .similarity import pearson


def pixel_flipping(
    model: Model, x: torch.Tensor, target: torch.Tensor, relevance: torch.Tensor, ctx: MetricContext,
    steps: int = 32, baseline: str | float = "black", softmax: bool = True, normalise: bool = True,
    abs: bool = False, max_batch: MaxBatch = AUTO, features_per_step: int | None = None,
) -> torch.Tensor:
    """Bach et al. 2015: set pixels to `baseline` in order of decreasing R, ceil(H·W/steps) pixels per
    step, cumulatively; score = area under f_t after each step (lower is better).
    `features_per_step` (pixels, as Quantus' `features_in_step` is checked) replaces `steps` when set:
    3136 at 224×224 is 16 steps.

    Quantus' PixelFlipping sorts C×H×W features and flips `features_in_step` of them per step (its
    check is against H×W): with channel-broadcast attributions our `steps` equals Quantus with
    `features_in_step = C · ceil(H·W/steps)`, which the tests verify on 1- and 3-channel inputs.
    """
    B, _, H, W = x.shape
    if features_per_step:
        steps = math.ceil(H * W / features_per_step)
    per_step, n = steps_for(H * W, steps)
    rank = ranks(pixel_map(relevance, normalise, abs).flatten(1))
    base = baseline_values(x, baseline)

    def flipped(start: int, stop: int) -> torch.Tensor:
        rows = torch.arange(start, stop, device=x.device)
        b, step = rows // n, rows % n + 1
        gone = (rank[b] < (step * per_step)[:, None]).view(-1, 1, H, W)
        return torch.where(gone, base[b], x[b])

    curve = stream_scores(model, flipped, B * n, target.repeat_interleave(n), softmax, max_batch, "pixel_flipping").view(B, n)
    keep_curve(ctx, curve)
    return curve_area(curve)


def _patch_curve(
    model: Model, x: torch.Tensor, target: torch.Tensor, relevance: torch.Tensor, patch_size: int,
    regions: int, descending: bool, baseline: str | float, softmax: bool, normalise: bool, abs: bool,
    max_batch: MaxBatch, key: str,
) -> torch.Tensor:
    """f_t after removing the first 1..regions patches in order of patch relevance: [B, regions']."""
    B, _, H, W = x.shape
    sums, grid = patch_sums(pixel_map(relevance, normalise, abs), patch_size)
    rank = ranks(sums, descending)
    n = min(regions, sums.shape[1]) if regions > 0 else sums.shape[1]
    base = baseline_values(x, baseline)

    def removed(start: int, stop: int) -> torch.Tensor:
        rows = torch.arange(start, stop, device=x.device)
        b, step = rows // n, rows % n + 1
        gone = patch_pixels(rank[b] < step[:, None], grid, patch_size, (H, W))
        return torch.where(gone, base[b], x[b])

    return stream_scores(model, removed, B * n, target.repeat_interleave(n), softmax, max_batch, key).view(B, n)


def region_perturbation(
    model: Model, x: torch.Tensor, target: torch.Tensor, relevance: torch.Tensor, ctx: MetricContext,
    patch_size: int = 8, order: str = "morf", regions: int = 100, baseline: str | float = "black",
    softmax: bool = True, normalise: bool = True, abs: bool = False, max_batch: MaxBatch = AUTO,
) -> torch.Tensor:
    """Samek et al. 2017: remove non-overlapping patch_size² patches (grid padded as Quantus does) in
    order of their summed R — most relevant first (`morf`) or least relevant first (`lerf`) — for
    `regions` steps; the curve is f_t(x) − f_t(x after k patches), as Quantus returns it.

    Score = area of that curve for MoRF (higher is better: relevant patches matter) and minus the
    area for LeRF (irrelevant patches should not matter), so higher is better for both orders;
    Quantus' own AUC of the curve is |score| × (regions − 1).
    """
    curve = _patch_curve(model, x, target, relevance, patch_size, regions, order == "morf", baseline,
                         softmax, normalise, abs, max_batch, "region_perturbation")
    drop = target_scores(model, x, target, softmax, max_batch)[:, None] - curve
    keep_curve(ctx, drop)
    area = curve_area(drop)
    return area if order == "morf" else -area


def selectivity(
    model: Model, x: torch.Tensor, target: torch.Tensor, relevance: torch.Tensor, ctx: MetricContext,
    patch_size: int = 8, baseline: str | float = "black", softmax: bool = True, normalise: bool = True,
    abs: bool = False, max_batch: MaxBatch = AUTO,
) -> torch.Tensor:
    """Montavon et al. 2018: remove every patch, most relevant first; score = area under f_t after each
    removal (lower is better). Same patch grid and baseline as Quantus' Selectivity."""
    curve = _patch_curve(model, x, target, relevance, patch_size, 0, True, baseline, softmax, normalise, abs, max_batch,
                         "selectivity")
    return curve_area(curve)


def faithfulness_correlation(
    model: Model, x: torch.Tensor, target: torch.Tensor, relevance: torch.Tensor, ctx: MetricContext,
    runs: int = 100, subset_size: int = 224, baseline: str | float = "black", softmax: bool = False,
    normalise: bool = True, abs: bool = False, max_batch: MaxBatch = AUTO,
) -> torch.Tensor:
    """Bhatt et al. 2020: Pearson correlation, over `runs` random subsets S of `subset_size` pixels
    (drawn from the input's own random stream), between Σ_S R and f_t(x) − f_t(x with S at baseline);
    higher is better. Quantus draws its subsets over C×H×W features; ours are pixels (all channels)."""
    B, _, H, W = x.shape
    r = pixel_map(relevance, normalise, abs).flatten(1)

    def subsets(start: int, stop: int) -> torch.Tensor:
        """Subset j of input b: the top `subset_size` of uniform draws from (b, j)'s own stream."""
        part = torch.arange(start, stop)
        return row_rng(ctx.rng, part // runs, part % runs, "subsets").uniform((H * W,)).topk(subset_size, dim=1).indices

    picks = torch.cat(chunked(subsets, B * runs, max_batch, key="faithfulness_correlation:subsets", device="cpu"))
    picks = picks.to(x.device)
    base = baseline_values(x, baseline)

    def removed(start: int, stop: int) -> torch.Tensor:
        b = torch.arange(start, stop, device=x.device) // runs
        gone = torch.zeros(stop - start, H * W, dtype=torch.bool, device=x.device).scatter_(1, picks[start:stop], True)
        return torch.where(gone.view(-1, 1, H, W), base[b], x[b])

    after = stream_scores(model, removed, B * runs, target.repeat_interleave(runs), softmax, max_batch,
                          "faithfulness_correlation").view(B, runs)
    drop = target_scores(model, x, target, softmax, max_batch)[:, None] - after
    mass = r.gather(1, picks.view(B, -1)).view(B, runs, subset_size).sum(-1)
    return pearson(mass, drop)


def road(
    model: Model, x: torch.Tensor, target: torch.Tensor, relevance: torch.Tensor, ctx: MetricContext,
    percentages: Sequence[float] = tuple(range(1, 100, 2)), noise: float = 0.01, normalise: bool = True,
    abs: bool = False, max_batch: MaxBatch = AUTO,
) -> torch.Tensor:
    """Rong et al. 2022 (MoRF): for each percentage p, replace the top p % pixels by noisy linear
    imputation and check whether the model still predicts the target; score = the fraction of
    percentages at which it does (lower is better). Its mean over inputs equals the mean of Quantus'
    per-percentage accuracies. Quantus orders C×H×W features but imputes H×W pixel indices (correct
    for one channel only); we order and impute whole pixels. Noise comes from the input's stream."""
    B, C, H, W = x.shape
    rank = ranks(pixel_map(relevance, normalise, abs).flatten(1))
    counts = torch.tensor([int(H * W * p / 100) for p in percentages], device=x.device)
    n = len(percentages)

    def imputed(start: int, stop: int) -> torch.Tensor:
        rows = torch.arange(start, stop, device=x.device)
        b, level = rows // n, rows % n
        gone = (rank[b] < counts[level][:, None]).view(-1, 1, H, W)
        rng = row_rng(ctx.rng, b.cpu(), level.cpu(), "road")
        jitter = noise * rng.normal((C, H, W), device=x.device)
        return torch.where(gone, impute(x[b], gone, tol=1e-5) + jitter, x[b])

    @torch.no_grad()
    def kept(start: int, stop: int) -> torch.Tensor:
        rows = torch.arange(start, stop, device=x.device)
        return model(imputed(start, stop)).argmax(1) == target.to(x.device)[rows // n]

    return torch.cat(chunked(kept, B * n, max_batch, key="road", device=x.device)).view(B, n).float().mean(1)


def keep_curve(ctx: MetricContext, curve: torch.Tensor) -> None:
    """Each point of the curves [B, n] as a detail `curve_<k>` (x = k / (n - 1) of the removal):
    summary.json gets the mean curve per method (what the report plots); metrics.csv keeps scores only."""
    width = len(str(curve.shape[1] - 1))
    for k in range(curve.shape[1]):
        ctx.details[f"curve_{k:0{width}d}"] = curve[:, k]


def _common(softmax: bool, normalise: bool = True, abs: bool = False) -> tuple[Param, ...]:
    return (BASELINE, softmax_param(softmax), normalise_param(normalise), abs_param(abs), max_batch_param())


@hookimpl
def xai_metrics() -> list[Metric]:
    patch = Param("patch_size", int, 8, "side of the square patches, in pixels", low=1, high=4096)
    return [
        Metric("pixel_flipping", "area under f_t as pixels are removed, most relevant first", "faithfulness",
               pixel_flipping, higher_is_better=False,
               params=(Param("steps", int, 32, "number of removal steps (pixels per step = ceil(H·W/steps))", low=1,
                             high=100_000),
                       Param("features_per_step", int, None, "pixels removed per step; replaces `steps` when set", low=1),
                       *_common(True))),
        Metric("region_perturbation", "area of the f_t drop as patches are removed (MoRF or LeRF)", "faithfulness",
               region_perturbation, higher_is_better=True,
               params=(patch, Param("order", str, "morf", "morf: most relevant first; lerf: least relevant first "
                                    "(score negated so higher stays better)", choices=("morf", "lerf")),
                       Param("regions", int, 100, "number of patches removed (steps)", low=1, high=100_000), *_common(True))),
        Metric("selectivity", "area under f_t as all patches are removed, most relevant first", "faithfulness",
               selectivity, higher_is_better=False, params=(patch, *_common(True))),
        Metric("faithfulness_correlation", "correlation of subset relevance with the output drop", "faithfulness",
               faithfulness_correlation, higher_is_better=True,
               params=(Param("runs", int, 100, "number of random subsets", low=2, high=100_000),
                       Param("subset_size", int, 224, "pixels per subset", low=1, high=4096 * 4096), *_common(False))),
        Metric("road", "share of removal levels (noisy linear imputation) at which the prediction survives",
               "faithfulness", road, higher_is_better=False,
               params=(Param("percentages", list, list(range(1, 100, 2)), "percentages of pixels removed",
                             item=float, low=0, high=100),
                       Param("noise", float, 0.01, "std of the noise added to imputed pixels", low=0.0),
                       normalise_param(True), abs_param(False), max_batch_param())),
    ]
