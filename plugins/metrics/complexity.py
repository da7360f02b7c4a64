"""Complexity metrics: how concentrated is R? Pure array arithmetic on channel-summed relevance.

Sparseness (Gini index) and complexity (entropy) follow Quantus 0.6 exactly (abs and per-input
max normalisation on by default); MST-C is our reading of Mesgari et al. 2026 (see its docstring).
"""
from __future__ import annotations

import math

import torch

from xaicli import Metric, Param, hookimpl
from xaicli.descriptors import MetricContext
from xaicli.model import Model

from .ordering import order as rank_order, sort_values
from .shared import abs_param, normalise_param, pixel_map


def sparseness(model: Model, x: torch.Tensor, target: torch.Tensor, relevance: torch.Tensor, ctx: MetricContext,
               normalise: bool = True, abs: bool = True) -> torch.Tensor:
    """Chalasani et al. 2020: Gini index of R (+1e-7, as Quantus) over pixels; 1 = all relevance on one
    pixel, 0 = uniform; higher is better."""
    r = pixel_map(relevance, normalise, abs).flatten(1).double() + 1e-7
    n = r.shape[1]
    r = sort_values(r).to(r.device)
    i = torch.arange(1, n + 1, device=r.device, dtype=r.dtype)
    return (((2 * i - n - 1) * r).sum(1) / (n * r.sum(1))).float()


def complexity(model: Model, x: torch.Tensor, target: torch.Tensor, relevance: torch.Tensor, ctx: MetricContext,
               normalise: bool = True, abs: bool = True) -> torch.Tensor:
    """Bhatt et al. 2020: Shannon entropy (nats) of R/Σ|R| over pixels (log(p + 1e-12), as Quantus);
    lower is better."""
    r = pixel_map(relevance, normalise, abs).flatten(1).double()
    p = r / r.abs().sum(1, keepdim=True)
    return (-(p * torch.log(p + 1e-12)).sum(1)).float()


def mst_compactness(model: Model, x: torch.Tensor, target: torch.Tensor, relevance: torch.Tensor, ctx: MetricContext,
                    fraction: float = 0.05, gap: float = 2.0) -> torch.Tensor:
    """MST-C, structural compactness (Mesgari et al. 2026), as we read it — no reference code exists:

    1. salient points: the k = max(2, round(fraction·H·W)) pixels of largest |Σ_c R| (ties by index);
    2. the Euclidean minimum spanning tree over their (row, col) coordinates (Prim's algorithm, run
       for all inputs of the batch at once), k − 1 edges of lengths ℓ_e in pixels;
    3. cohesion C = (k − 1) / Σ ℓ_e ∈ (0, 1]: 1 when every edge joins 4-neighbours (one solid region);
    4. edges longer than `gap` pixels separate clusters; clusters = 1 + #long edges, and the cluster
       term K = 1 − #long / (k − 1) ∈ [0, 1] (1: one cluster, 0: every point isolated);
    5. MST-C = C · K ∈ [0, 1]; higher is better (few, cohesive clusters).

    ctx.details gets `clusters` (number of clusters) and `length` (Σ ℓ_e / (k − 1), ≥ 1).
    """
    r = pixel_map(relevance).abs().flatten(1)
    B, N = r.shape
    W = relevance.shape[-1]
    k = max(2, min(N, round(fraction * N)))
    top = rank_order(r)[:, :k].to(r.device)
    points = torch.stack([top // W, top % W], -1).float()
    edges = torch.cat([_mst_edges(part) for part in points.split(_MST_CHUNK)]).double()
    long = (edges > gap).sum(1).double()
    total = edges.sum(1)
    score = (k - 1) / total * (1 - long / (k - 1))
    ctx.details["clusters"] = (1 + long).float()
    ctx.details["length"] = (total / (k - 1)).float()
    return score.float()


_MST_CHUNK = 8  # inputs per Prim run: bounds the k×k distance matrices in memory


def _mst_edges(points: torch.Tensor) -> torch.Tensor:
    """Edge lengths [B, k−1] of the Euclidean MST of each point set [B, k, 2] (Prim, batched)."""
    B, k, _ = points.shape
    dist = torch.cdist(points, points)
    rows = torch.arange(B, device=points.device)
    inside = torch.zeros(B, k, dtype=torch.bool, device=points.device)
    inside[:, 0] = True
    best = dist[:, 0].masked_fill(inside, math.inf)
    edges = torch.empty(B, k - 1, dtype=points.dtype, device=points.device)
    for step in range(k - 1):
        nearest = best.argmin(1)
        edges[:, step] = best[rows, nearest]
        inside[rows, nearest] = True
        best = torch.minimum(best, dist[rows, nearest]).masked_fill(inside, math.inf)
    return edges


@hookimpl
def xai_metrics() -> list[Metric]:
    common = (normalise_param(True), abs_param(True))
    return [
        Metric("sparseness", "Gini index of |R|", "complexity", sparseness, higher_is_better=True, params=common),
        Metric("complexity", "entropy of |R| / Σ|R|", "complexity", complexity, higher_is_better=False, params=common),
        Metric("mst_compactness", "minimum-spanning-tree compactness of the most relevant pixels", "complexity",
               mst_compactness, higher_is_better=True,
               params=(Param("fraction", float, 0.05, "share of pixels taken as salient points", low=0.0, high=1.0),
                       Param("gap", float, 2.0, "edges longer than this (pixels) separate clusters", low=0.0))),
    ]
