"""Occlusion (Zeiler & Fergus 2014): the drop of the target logit when a window is covered.

Conventions match captum's Occlusion with a window spanning all channels: windows start at
multiples of `stride` and are clipped at the border; a pixel's relevance is the mean, over the
windows covering it, of f_t(x) − f_t(x with the window set to `baseline`). `baseline` is a value
in model-input (normalised) space, so the default 0 paints the dataset mean colour.
Forward-only: runs on ONNX models through onnxruntime.
"""
from __future__ import annotations

import math

import torch

from xaicli import Attribution, Method, Param, hookimpl
from xaicli.chunking import AUTO, MaxBatch, chunked, max_batch_param, predict_rows
from xaicli.model import Model, gather_target
from xaicli.rng import BatchRNG


def _pair(value: int | list[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def window_masks(size: int, window: int, stride: int, device: torch.device) -> torch.Tensor:
    """[n, size] 0/1 rows: window k covers [k*stride, k*stride + window) clipped to the size."""
    count = math.ceil(max(size - window, 0) / stride) + 1
    starts = torch.arange(count, device=device)[:, None] * stride
    pos = torch.arange(size, device=device)[None, :]
    return ((pos >= starts) & (pos < starts + window)).float()


def occlusion(
    model: Model, x: torch.Tensor, target: torch.Tensor, rng: BatchRNG,
    window: int | list[int] = 16, stride: int | list[int] = 8, baseline: float = 0.0, max_batch: MaxBatch = AUTO,
) -> Attribution:
    B, C, H, W = x.shape
    (wh, ww), (sh, sw) = _pair(window), _pair(stride)
    if wh > H or ww > W:
        raise ValueError(f"occlusion window {wh}×{ww} is larger than the input {H}×{W}")
    rows, cols = window_masks(H, wh, sh, x.device), window_masks(W, ww, sw, x.device)
    n_rows, n_cols = len(rows), len(cols)
    per_image = n_rows * n_cols
    target = target.to(x.device)

    def occluded(start: int, stop: int) -> torch.Tensor:
        flat = torch.arange(start, stop, device=x.device)
        image, window_index = flat // per_image, flat % per_image
        mask = rows[window_index // n_cols][:, :, None] * cols[window_index % n_cols][:, None, :]
        mask = mask[:, None]  # [n, 1, H, W]
        return x[image] * (1 - mask) + baseline * mask

    @torch.no_grad()
    def drops(start: int, stop: int) -> torch.Tensor:
        images = torch.arange(start, stop, device=x.device) // per_image
        return reference[images] - gather_target(model(occluded(start, stop)), target[images])

    reference = gather_target(predict_rows(model, x, max_batch), target)
    drop = torch.cat(chunked(drops, B * per_image, max_batch, key="occlusion", device=x.device)).view(B, n_rows, n_cols)
    total = torch.einsum("bij,iy,jx->byx", drop, rows, cols)
    count = torch.outer(rows.sum(0), cols.sum(0))
    relevance = (total / count)[:, None].expand(B, C, H, W).contiguous()
    return Attribution(relevance)


@hookimpl
def xai_methods() -> list[Method]:
    return [
        Method(
            "occlusion",
            "logit drop when a sliding window is covered (model-agnostic)",
            occlusion,
            (
                Param("window", (int, list), 16, "window size in pixels: n or [h, w]", low=1, high=4096, length=2),
                Param("stride", (int, list), 8, "step between windows: n or [h, w]", low=1, high=4096, length=2),
                Param("baseline", float, 0.0, "value the window is filled with, in normalised model-input space"),
                max_batch_param("occluded images per forward pass"),
            ),
            needs="forward",
        )
    ]
