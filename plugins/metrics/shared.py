"""What every metric family shares: relevance maps, baselines, batched scoring of perturbed copies,
re-explanation in chunks, curve areas, and the parameters declared the same way everywhere.

Conventions (all metrics):
- Relevance [B,C,H,W] is summed over channels to one value per pixel ([B,H,W]), as Quantus users
  pass channel-summed attributions; perturbations then act on whole pixels (every channel).
- `normalise` divides each input's map by its own max |R| (Quantus' `normalise_by_max` divides by
  the max over the whole batch, which makes a score depend on the other inputs of its batch);
  `abs` then takes |R| — the order Quantus uses.
- Perturbed copies are built lazily and evaluated in chunks of at most `max_batch` images (or of
  a size chosen against free memory: `auto`, see xaicli.chunking), keyed by the metric's name.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from xaicli import Param
from xaicli.chunking import AUTO, MaxBatch, chunked, predict_rows
from xaicli.chunking import max_batch_param as _max_batch_param
from xaicli.descriptors import MetricContext
from xaicli.model import Model, gather_target
from xaicli.rng import BatchRNG, derive_seed

BASELINES = ("black", "white", "mean", "zero")


def max_batch_param(default: MaxBatch = AUTO) -> Param:
    return _max_batch_param("perturbed or re-explained images", default)


def softmax_param(default: bool) -> Param:
    return Param("softmax", bool, default, "score the softmax probability of the target instead of its logit")


def normalise_param(default: bool) -> Param:
    return Param("normalise", bool, default, "divide each relevance map by its max |R| (per input)")


def abs_param(default: bool) -> Param:
    return Param("abs", bool, default, "use |R| (after normalising)")


BASELINE = Param(
    "baseline", (str, float), "black",
    "value removed pixels get: black (min of the input), white (max), mean, zero, or a number (normalised input space)",
)


def pixel_map(relevance: torch.Tensor, normalise: bool = False, abs: bool = False) -> torch.Tensor:
    """Per-pixel relevance [B,H,W]: channel sum, then per-input max-|R| normalisation, then |R|."""
    r = relevance.float().sum(1)
    if normalise:
        peak = r.abs().flatten(1).amax(1).view(-1, 1, 1)
        r = torch.where(peak > 0, r / peak.clamp_min(torch.finfo(r.dtype).tiny), r)
    return r.abs() if abs else r


def baseline_values(x: torch.Tensor, baseline: str | float) -> torch.Tensor:
    """[B,1,1,1] fill value per input, taken over all channels and pixels (Quantus' convention)."""
    flat = x.flatten(1)
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        value = torch.full((len(x),), float(baseline), device=x.device, dtype=x.dtype)
    elif baseline == "black":
        value = flat.amin(1)
    elif baseline == "white":
        value = flat.amax(1)
    elif baseline == "mean":
        value = flat.mean(1)
    elif baseline == "zero":
        value = torch.zeros(len(x), device=x.device, dtype=x.dtype)
    else:
        raise ValueError(f"unknown baseline {baseline!r}; use one of {', '.join(BASELINES)} or a number")
    return value.view(-1, 1, 1, 1)


def target_scores(model: Model, x: torch.Tensor, target: torch.Tensor, softmax: bool, max_batch: MaxBatch
                  ) -> torch.Tensor:
    """f_t(x) (logit or probability) for a batch, in chunks: [B]."""
    return _pick(predict_rows(model, x, max_batch), target, softmax)


def stream_scores(
    model: Model, make: Callable[[int, int], torch.Tensor], total: int, target: torch.Tensor,
    softmax: bool, max_batch: MaxBatch, key: str,
) -> torch.Tensor:
    """f_t of `total` perturbed copies built by `make(start, stop)`; target[i] is row i's class."""

    @torch.no_grad()
    def scores(start: int, stop: int) -> torch.Tensor:
        return _pick(model(make(start, stop)), target[start:stop], softmax)

    parts = chunked(scores, total, max_batch, key=key, device=model.device)
    return torch.cat(parts) if parts else torch.zeros(0, device=target.device)


def _pick(logits: torch.Tensor, target: torch.Tensor, softmax: bool) -> torch.Tensor:
    if softmax:
        logits = logits.float().softmax(-1)
    return gather_target(logits, target).float()


def curve_area(curve: torch.Tensor) -> torch.Tensor:
    """Trapezoid area of curves [B, n] over an x axis scaled to [0, 1] (= Quantus' `calculate_auc` / (n − 1)),
    so scores do not grow with the number of steps. A single point is its own area."""
    n = curve.shape[1]
    if n == 1:
        return curve[:, 0]
    return torch.trapezoid(curve, dx=1.0 / (n - 1), dim=1)


def row_rng(rng: BatchRNG, inputs: torch.Tensor, copies: torch.Tensor, stream: str) -> BatchRNG:
    """Random streams for perturbed copies: row i is copy `copies[i]` of input `inputs[i]`, so draws
    depend only on the input's seed and the copy number, never on chunking."""
    return BatchRNG([derive_seed(rng.seeds[b], stream, c) for b, c in zip(inputs.tolist(), copies.tolist())])


def explain_rows(
    ctx: MetricContext, make: Callable[[int, int], torch.Tensor], total: int, copies: int, target: torch.Tensor,
    max_batch: MaxBatch, model: Model | None = None, stream: str = "reexplain", *, key: str,
) -> torch.Tensor:
    """Re-explain `total` = B × copies inputs (row j is copy j % copies of input j // copies) in chunks of
    at most `max_batch`, one `ctx.explain` call per chunk; returns per-pixel maps [total, H, W]."""
    explain = ctx.explain
    if explain is None:
        raise ValueError("this metric re-explains inputs, but no explain function was given")

    def maps(start: int, stop: int) -> torch.Tensor:
        rows = torch.arange(start, stop)
        rng = row_rng(ctx.rng, rows // copies, rows % copies, stream)
        relevance = explain(make(start, stop), target[rows // copies].to(target.device), model, rng)
        return relevance.detach().float().sum(1)

    return torch.cat(chunked(maps, total, max_batch, key=key, device=target.device))


def padding(size: int, patch: int) -> tuple[int, int]:
    """Padding before and after a side so that it divides into patches (Quantus' split: floor, ceil)."""
    extra = (-size) % patch
    return extra // 2, extra - extra // 2


def patch_sums(r: torch.Tensor, patch: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Sum of a per-pixel map [B,H,W] over a grid of patch×patch squares (zero-padded): [B, nh*nw], (nh, nw)."""
    B, H, W = r.shape
    (top, bottom), (left, right) = padding(H, patch), padding(W, patch)
    padded = torch.nn.functional.pad(r, (left, right, top, bottom))
    nh, nw = padded.shape[1] // patch, padded.shape[2] // patch
    sums = padded.view(B, nh, patch, nw, patch).sum((2, 4)).flatten(1)
    return sums, (nh, nw)


def patch_pixels(selected: torch.Tensor, grid: tuple[int, int], patch: int, size: tuple[int, int]) -> torch.Tensor:
    """Patch selections [m, nh*nw] as pixel masks [m, 1, H, W] (padding cropped)."""
    nh, nw = grid
    H, W = size
    top, left = padding(H, patch)[0], padding(W, patch)[0]
    full = selected.view(-1, nh, nw).repeat_interleave(patch, 1).repeat_interleave(patch, 2)
    return full[:, None, top : top + H, left : left + W]


def steps_for(n_pixels: int, steps: int) -> tuple[int, int]:
    """(pixels per step, number of steps) for at most `steps` equal steps over `n_pixels`."""
    per_step = math.ceil(n_pixels / min(steps, n_pixels))
    return per_step, math.ceil(n_pixels / per_step)
