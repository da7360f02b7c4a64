"""Localisation metrics: does R fall on the ground-truth mask s (ctx.masks [B,1,H,W])?

Pointing game, relevance mass accuracy, relevance rank accuracy, top-k intersection, attribution
localisation and AUC, with Quantus 0.6's definitions and defaults, on channel-summed relevance.
An input whose mask is empty scores NaN (as in Quantus). Pure array arithmetic: no forward passes.
"""
from __future__ import annotations

import torch

from xaicli import Metric, Param, hookimpl
from xaicli.descriptors import MetricContext
from xaicli.model import Model

from .ordering import sort_values, top_mask
from .shared import abs_param, normalise_param, pixel_map


def _prepare(relevance: torch.Tensor, ctx: MetricContext, normalise: bool, abs: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-pixel relevance [B, N] as float64, mask [B, N] bool), checking the mask's shape."""
    if ctx.masks is None:
        raise ValueError("this metric needs ground-truth masks")
    r = pixel_map(relevance, normalise, abs).flatten(1).double()
    s = ctx.masks.to(r.device).bool().flatten(1)
    if s.shape != r.shape:
        raise ValueError(f"mask of {tuple(ctx.masks.shape[-2:])} pixels does not match relevance of {tuple(relevance.shape[-2:])}")
    return r, s


def _nan_where_empty(score: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return torch.where(s.any(1), score, torch.full_like(score, float("nan"))).float()


def pointing_game(model: Model, x: torch.Tensor, target: torch.Tensor, relevance: torch.Tensor, ctx: MetricContext,
                  weighted: bool = False, normalise: bool = True, abs: bool = False) -> torch.Tensor:
    """Zhang et al. 2018: 1 if a pixel holding the maximum of R lies in the mask, else 0 (every tied
    maximum counts, as Quantus). `weighted` scales hits by 1 − |s|/N."""
    r, s = _prepare(relevance, ctx, normalise, abs)
    hit = (s & (r == r.amax(1, keepdim=True))).any(1).double()
    if weighted:
        hit = hit * (1 - s.sum(1) / s.shape[1])
    return _nan_where_empty(hit, s)


def relevance_mass_accuracy(model: Model, x: torch.Tensor, target: torch.Tensor, relevance: torch.Tensor,
                            ctx: MetricContext, positive: bool = False, normalise: bool = True,
                            abs: bool = False) -> torch.Tensor:
    """Arras et al. 2022: Σ_s R / Σ R. Quantus uses R as given; `positive` keeps R⁺ only (the paper's form)."""
    r, s = _prepare(relevance, ctx, normalise, abs)
    if positive:
        r = r.clamp_min(0)
    return _nan_where_empty((r * s).sum(1) / r.sum(1), s)


def relevance_rank_accuracy(model: Model, x: torch.Tensor, target: torch.Tensor, relevance: torch.Tensor,
                            ctx: MetricContext, normalise: bool = True, abs: bool = False) -> torch.Tensor:
    """Arras et al. 2022: share of the |s| highest-R pixels that lie in the mask (ties by index)."""
    r, s = _prepare(relevance, ctx, normalise, abs)
    size = s.sum(1)
    return _nan_where_empty((top_mask(r, size) & s).sum(1) / size.clamp_min(1), s)


def top_k_intersection(model: Model, x: torch.Tensor, target: torch.Tensor, relevance: torch.Tensor,
                       ctx: MetricContext, k: int = 1000, concept_influence: bool = False,
                       normalise: bool = True, abs: bool = False) -> torch.Tensor:
    """Theiner et al. 2021: share of the k highest-R pixels inside the mask; `concept_influence`
    divides by the mask's share of the image."""
    r, s = _prepare(relevance, ctx, normalise, abs)
    if k > r.shape[1]:
        raise ValueError(f"k={k} is larger than the {r.shape[1]} pixels of the input")
    share = (top_mask(r, torch.full((len(r),), k)) & s).sum(1) / k
    if concept_influence:
        share = share * s.shape[1] / s.sum(1).clamp_min(1)
    return _nan_where_empty(share.double(), s)


def attribution_localisation(model: Model, x: torch.Tensor, target: torch.Tensor, relevance: torch.Tensor,
                             ctx: MetricContext, weighted: bool = False, positive: bool = False,
                             normalise: bool = True, abs: bool = True) -> torch.Tensor:
    """Kohlbrenner et al. 2020: Σ_s R / (Σ R + 1e-9); NaN when that exceeds 1 (negative R outside),
    `weighted` multiplies by |s|/N. Quantus' ratio uses x_batch[2:].size (a slice of the batch) as N;
    we use the pixel count."""
    r, s = _prepare(relevance, ctx, normalise, abs)
    if positive:
        r = r.clamp_min(0)
    ratio = (r * s).sum(1) / (r.sum(1) + 1e-9)
    ratio = torch.where(ratio > 1, torch.full_like(ratio, float("nan")), ratio)
    if weighted:
        ratio = ratio * s.sum(1) / s.shape[1]
    return _nan_where_empty(ratio, s)


def auc(model: Model, x: torch.Tensor, target: torch.Tensor, relevance: torch.Tensor, ctx: MetricContext,
        normalise: bool = True, abs: bool = False) -> torch.Tensor:
    """Fawcett 2006: ROC AUC of R as a detector of mask pixels (sklearn's roc_auc, ties counted half):
    the Mann–Whitney U of mask pixels against the others, counted by binary search in the sorted
    relevance of the pixels outside the mask. NaN when the mask is empty or covers everything."""
    r, s = _prepare(relevance, ctx, normalise, abs)
    outside = sort_values(torch.where(s, torch.full_like(r, float("inf")), r)).to(r.device).contiguous()
    below = torch.searchsorted(outside, r, side="left")
    equal = torch.searchsorted(outside, r, side="right") - below
    pos = s.sum(1).double()
    neg = s.shape[1] - pos
    score = ((below + 0.5 * equal) * s).sum(1) / (pos * neg)
    return torch.where(neg > 0, _nan_where_empty(score, s).double(), torch.full_like(score, float("nan"))).float()


@hookimpl
def xai_metrics() -> list[Metric]:
    def metric(name: str, description: str, score, *params: Param, normalise: bool = True, abs: bool = False) -> Metric:
        return Metric(name, description, "localisation", score, higher_is_better=True,
                      params=(*params, normalise_param(normalise), abs_param(abs)), needs_masks=True)

    return [
        metric("pointing_game", "the maximum of R lies in the mask", pointing_game,
               Param("weighted", bool, False, "weight hits by 1 − mask share")),
        metric("relevance_mass_accuracy", "share of relevance inside the mask", relevance_mass_accuracy,
               Param("positive", bool, False, "use positive relevance only")),
        metric("relevance_rank_accuracy", "share of the |mask| most relevant pixels inside the mask",
               relevance_rank_accuracy),
        metric("top_k_intersection", "share of the k most relevant pixels inside the mask", top_k_intersection,
               Param("k", int, 1000, "number of top pixels", low=1, high=4096 * 4096),
               Param("concept_influence", bool, False, "divide by the mask's share of the image")),
        metric("attribution_localisation", "relevance inside the mask over total relevance",
               attribution_localisation, Param("weighted", bool, False, "multiply by the mask's share of the image"),
               Param("positive", bool, False, "use positive relevance only"), abs=True),
        metric("auc", "ROC AUC of relevance as a detector of mask pixels", auc),
    ]
