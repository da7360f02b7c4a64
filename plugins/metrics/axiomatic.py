"""Axiomatic metrics: properties an attribution should have by construction.

Completeness (Sundararajan et al. 2017), non-sensitivity (Nguyen & Martínez 2020) and input
invariance (Kindermans et al. 2017), after Quantus 0.6. Quantus reports completeness and input
invariance as exact booleans; we report the completeness gap itself and keep input invariance a
0/1 score with its tolerance, adding the deviation to ctx.details.
"""
from __future__ import annotations

import torch

from xaicli import Metric, Param, hookimpl
from xaicli.chunking import AUTO, MaxBatch
from xaicli.descriptors import MetricContext
from xaicli.model import Model

from .layers import shifted
from .shared import (
    BASELINE, abs_param, baseline_values, explain_rows, max_batch_param, normalise_param, patch_pixels,
    patch_sums, pixel_map, softmax_param, stream_scores, target_scores,
)


def completeness(
    model: Model, x: torch.Tensor, target: torch.Tensor, relevance: torch.Tensor, ctx: MetricContext,
    baseline: str | float = "black", softmax: bool = False, max_batch: MaxBatch = AUTO,
) -> torch.Tensor:
    """|Σ R − (f_t(x) − f_t(x̄))| with x̄ the whole input at `baseline`; lower is better. Quantus
    normalises R by default, which breaks the equation: we never normalise (use baseline `zero` to
    match integrated gradients with a zero baseline)."""
    reference = baseline_values(x, baseline).expand_as(x)
    both = target_scores(model, torch.cat([x, reference]), torch.cat([target, target]), softmax, max_batch)
    gain = both[: len(x)] - both[len(x):]
    return (relevance.double().flatten(1).sum(1) - gain.double()).abs().float()


def non_sensitivity(
    model: Model, x: torch.Tensor, target: torch.Tensor, relevance: torch.Tensor, ctx: MetricContext,
    patch_size: int = 8, eps: float = 1e-5, baseline: str | float = "black", softmax: bool = True,
    normalise: bool = True, abs: bool = True, max_batch: MaxBatch = AUTO,
) -> torch.Tensor:
    """Share of patch_size² patches where 'R is ~0' (Σ_patch R < eps) and 'the output ignores it'
    (|f_t(x) − f_t(x with the patch at baseline)| < eps) disagree; lower is better. Each patch is
    removed on its own (B × patches forwards). With patch_size 1 this is Quantus' NonSensitivity
    (features_in_step 1, one channel) divided by the number of pixels; we default to 8 × 8 patches
    because single pixels cost H·W forwards per input."""
    B, _, H, W = x.shape
    sums, grid = patch_sums(pixel_map(relevance, normalise, abs), patch_size)
    n = sums.shape[1]
    base = baseline_values(x, baseline)

    def removed(start: int, stop: int) -> torch.Tensor:
        rows = torch.arange(start, stop, device=x.device)
        b = rows // n
        alone = torch.zeros(len(rows), n, dtype=torch.bool, device=x.device).scatter_(1, (rows % n)[:, None], True)
        return torch.where(patch_pixels(alone, grid, patch_size, (H, W)), base[b], x[b])

    after = stream_scores(model, removed, B * n, target.repeat_interleave(n), softmax, max_batch,
                          "non_sensitivity").view(B, n)
    ignored = (after - target_scores(model, x, target, softmax, max_batch)[:, None]).abs() < eps
    return (ignored ^ (sums < eps)).float().mean(1)


def input_invariance(
    model: Model, x: torch.Tensor, target: torch.Tensor, relevance: torch.Tensor, ctx: MetricContext,
    shift: float = -1.0, atol: float = 1e-4, rtol: float = 1e-5, max_batch: MaxBatch = AUTO,
) -> torch.Tensor:
    """1 if explaining x + shift with a model that absorbs the shift (f'(x + shift) = f(x)) gives R
    again (|R − R'| ≤ atol + rtol·|R'| everywhere, numpy.isclose as Quantus), else 0; higher is better.
    The shift is absorbed by an explicit offset in front of the model, which is exact everywhere —
    Quantus folds it into the first layer's bias, inexact at zero-padded borders.
    ctx.details gets `deviation` = max |R − R'| / max |R|."""
    moved = shifted(model, shift)
    again = explain_rows(ctx, lambda start, stop: x[start:stop] + shift, len(x), 1, target, max_batch, moved,
                         key="input_invariance")
    before = pixel_map(relevance)
    gap = (again - before).abs().flatten(1)
    ctx.details["deviation"] = gap.amax(1) / before.abs().flatten(1).amax(1).clamp_min(1e-30)
    return (gap <= atol + rtol * again.abs().flatten(1)).all(1).float()


@hookimpl
def xai_metrics() -> list[Metric]:
    return [
        Metric("completeness", "gap between Σ R and f_t(x) − f_t(baseline)", "axiomatic", completeness,
               higher_is_better=False, params=(BASELINE, softmax_param(False), max_batch_param())),
        Metric("non_sensitivity", "share of patches where zero relevance and no output effect disagree", "axiomatic",
               non_sensitivity, higher_is_better=False,
               params=(Param("patch_size", int, 8, "side of the patches removed one at a time", low=1, high=4096),
                       Param("eps", float, 1e-5, "threshold for 'no relevance' and 'no effect'", low=0.0),
                       BASELINE, softmax_param(True), normalise_param(True), abs_param(True), max_batch_param())),
        Metric("input_invariance", "R unchanged when a constant input shift is absorbed by the model", "axiomatic",
               input_invariance, higher_is_better=True, needs_explain=True,
               params=(Param("shift", float, -1.0, "constant added to the input"),
                       Param("atol", float, 1e-4, "absolute tolerance"), Param("rtol", float, 1e-5, "relative tolerance"),
                       max_batch_param())),
    ]
