"""Robustness metrics: does R stay put when the input barely moves? (Yeh et al. 2019)

For n samples x' = x + u, u uniform in the L∞ ball of radius r (drawn from each input's own random
stream, per copy), sensitivity = ‖e(x') − e(x)‖ / ‖e(x)‖ (Frobenius norms over pixels, Quantus'
defaults: no normalisation, no abs). All B·n perturbed copies are re-explained in chunks of at most
`max_batch`, one ctx.explain call per chunk. Quantus draws one perturbation per step for the whole
batch and explains step by step; the statistic is the same.
"""
from __future__ import annotations

import torch

from xaicli import Metric, Param, hookimpl
from xaicli.chunking import AUTO, MaxBatch
from xaicli.descriptors import MetricContext
from xaicli.model import Model

from .shared import abs_param, explain_rows, max_batch_param, normalise_param, pixel_map, row_rng


def sensitivities(
    x: torch.Tensor, target: torch.Tensor, relevance: torch.Tensor, ctx: MetricContext,
    samples: int, radius: float, normalise: bool, abs: bool, max_batch: MaxBatch, key: str,
) -> torch.Tensor:
    """‖e(x') − e(x)‖ / ‖e(x)‖ for `samples` perturbed copies of every input: [B, samples]."""
    B = len(x)
    reference = pixel_map(relevance, normalise, abs).flatten(1)

    def perturbed(start: int, stop: int) -> torch.Tensor:
        rows = torch.arange(start, stop)
        rng = row_rng(ctx.rng, rows // samples, rows % samples, "ball")
        noise = (rng.uniform(x.shape[1:], device=x.device) * 2 - 1) * radius
        return x[(rows // samples).to(x.device)] + noise

    maps = explain_rows(ctx, perturbed, B * samples, samples, target, max_batch, key=key)
    again = pixel_map(maps[:, None], normalise, abs).flatten(1).view(B, samples, -1)
    return (again - reference[:, None]).norm(dim=-1) / reference.norm(dim=-1)[:, None]


def max_sensitivity(
    model: Model, x: torch.Tensor, target: torch.Tensor, relevance: torch.Tensor, ctx: MetricContext,
    samples: int = 10, radius: float = 0.2, normalise: bool = False, abs: bool = False,
    max_batch: MaxBatch = AUTO,
) -> torch.Tensor:
    """Max over the samples of the relative change of R (lower is better). Quantus' default is 200
    samples; we default to 10 (the cost is one re-explanation per sample)."""
    return sensitivities(x, target, relevance, ctx, samples, radius, normalise, abs, max_batch, "max_sensitivity").amax(1)


def avg_sensitivity(
    model: Model, x: torch.Tensor, target: torch.Tensor, relevance: torch.Tensor, ctx: MetricContext,
    samples: int = 10, radius: float = 0.2, normalise: bool = False, abs: bool = False,
    max_batch: MaxBatch = AUTO,
) -> torch.Tensor:
    """Mean over the samples of the relative change of R (lower is better); 10 samples by default
    (Quantus: 200)."""
    return sensitivities(x, target, relevance, ctx, samples, radius, normalise, abs, max_batch, "avg_sensitivity").mean(1)


@hookimpl
def xai_metrics() -> list[Metric]:
    params = (
        Param("samples", int, 10, "perturbed copies per input (one re-explanation each)", low=1, high=100_000),
        Param("radius", float, 0.2, "L∞ radius of the uniform noise, in normalised input units", low=0.0),
        normalise_param(False), abs_param(False), max_batch_param(),
    )
    return [
        Metric("max_sensitivity", "largest relative change of R under small input noise", "robustness",
               max_sensitivity, higher_is_better=False, params=params, needs_explain=True),
        Metric("avg_sensitivity", "mean relative change of R under small input noise", "robustness",
               avg_sensitivity, higher_is_better=False, params=params, needs_explain=True),
    ]
