"""Image operations that plugins share, on model input [B,C,H,W] (or [C,H,W]) tensors.

Model input is normalised: x = (pixels − mean) / std per channel, pixels in [0, 1] (see
`InputSpec`). `normalise`/`denormalise` convert between the two spaces with the spec's statistics
in the tensor's dtype and on its device, the same operations for every caller, so that baselines
built by different plugins agree bit for bit. `gaussian_blur` is the batch-invariant blur that the
perturbation masks, the blur baselines of integrated gradients and LIME share.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .model import InputSpec


def _stats(spec: InputSpec, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The spec's mean and std as [C,1,1] tensors of `like`'s dtype and device (broadcast over a batch)."""
    mean = torch.tensor(spec.mean, dtype=like.dtype, device=like.device).view(-1, 1, 1)
    std = torch.tensor(spec.std, dtype=like.dtype, device=like.device).view(-1, 1, 1)
    return mean, std


def normalise(pixels: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """Model input of images with values in [0, 1]: (pixels − mean) / std per channel."""
    mean, std = _stats(spec, pixels)
    return (pixels - mean) / std


def denormalise(x: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """Images with values in [0, 1] (unclipped) of model input: x · std + mean per channel."""
    mean, std = _stats(spec, x)
    return x * std + mean


def normalised_value(spec: InputSpec, pixel: float) -> tuple[float, ...]:
    """The model-input value, per channel, of a pixel value in [0, 1] (e.g. 0: black, 1: white)."""
    return tuple((pixel - m) / s for m, s in zip(spec.mean, spec.std))


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [B,C,H,W] per channel (radius ⌈3σ⌉ capped by the image, reflected border).

    Written as two matrix products, K_H · x · K_Wᵀ, with the reflection folded into the matrices:
    every image goes through the same GEMM whatever the batch size, so results are batch-invariant.
    Per-channel affine maps such as input normalisation commute with it, so blurring normalised
    input blurs the image.
    """
    if sigma <= 0:
        return x.clone()
    _, _, H, W = x.shape
    radius = max(1, min(math.ceil(3 * sigma), H - 1, W - 1))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(x.dtype)
    return _blur_matrix(H, kernel, radius, x) @ x @ _blur_matrix(W, kernel, radius, x).T


def _blur_matrix(n: int, kernel: torch.Tensor, radius: int, like: torch.Tensor) -> torch.Tensor:
    """[n, n] matrix applying the 1-D kernel along one axis with a reflected border (`F.pad` "reflect")."""
    rows = torch.arange(n)[:, None] + torch.arange(-radius, radius + 1)[None]
    rows = rows.abs()  # reflect below 0: -k -> k
    rows = torch.where(rows > n - 1, 2 * (n - 1) - rows, rows)  # and above n-1
    matrix = torch.zeros(n, n, dtype=like.dtype)
    matrix.index_put_((torch.arange(n)[:, None].expand_as(rows), rows), kernel.expand_as(rows), accumulate=True)
    return matrix.to(like.device)
