"""Noisy linear imputation (Rong et al. 2022, ROAD): removed pixels take the values that make each one
the weighted mean of its 8 neighbours (weights 1/6 for edge, 1/12 for diagonal neighbours, as in the
ROAD reference and Quantus), plus Gaussian noise.

Quantus solves that sparse system per image with scipy's `spsolve`; here every image and channel
of a chunk is solved at once on the device by Jacobi-preconditioned conjugate gradients (the system
is symmetric positive definite), started from a coarse-to-fine fill so that large holes converge fast.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_KERNEL = torch.tensor([[1 / 12, 1 / 6, 1 / 12], [1 / 6, 0.0, 1 / 6], [1 / 12, 1 / 6, 1 / 12]], dtype=torch.float64)


def impute(x: torch.Tensor, removed: torch.Tensor, tol: float = 1e-6, max_iter: int = 1000) -> torch.Tensor:
    """x [N,C,H,W] with the pixels of `removed` [N,1,H,W] (bool) replaced by the linear imputation
    (no noise); solved in float64 to a relative residual `tol`."""
    N, C, H, W = x.shape
    kernel = _KERNEL.to(x.device)[None, None]

    def neighbours(v: torch.Tensor) -> torch.Tensor:
        return F.conv2d(v.reshape(-1, 1, H, W), kernel, padding=1).view(v.shape)

    m = removed.to(torch.float64).expand(N, C, H, W)
    known = x.to(torch.float64) * (1 - m)
    weight = neighbours(torch.ones(1, 1, H, W, dtype=torch.float64, device=x.device))  # in-frame neighbour weights

    def apply(v: torch.Tensor) -> torch.Tensor:
        return m * (weight * v - neighbours(m * v))

    b = m * neighbours(known)
    v = m * _coarse_fill(known, 1 - m)
    r = b - apply(v)
    z = r / weight
    p = z.clone()
    rz = (r * z).sum((2, 3), keepdim=True)
    b_norm = b.flatten(2).norm(dim=2).view(N, C, 1, 1).clamp_min(1e-30)
    for step in range(max_iter):
        if step % 8 == 0 and bool(((r.flatten(2).norm(dim=2).view(N, C, 1, 1) / b_norm) <= tol).all()):
            break
        ap = apply(p)
        denom = (p * ap).sum((2, 3), keepdim=True)
        alpha = torch.where(denom > 0, rz / denom.clamp_min(1e-300), torch.zeros_like(denom))
        v = v + alpha * p
        r = r - alpha * ap
        z = r / weight
        rz_next = (r * z).sum((2, 3), keepdim=True)
        beta = torch.where(rz > 0, rz_next / rz.clamp_min(1e-300), torch.zeros_like(rz))
        p = z + beta * p
        rz = rz_next
    return torch.where(removed, v.to(x.dtype), x)


def _coarse_fill(values: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """A smooth guess for the unknown pixels: known values averaged on ever coarser grids, brought back up."""
    if min(values.shape[-2:]) <= 2:
        total = (values * known).sum((2, 3), keepdim=True) / known.sum((2, 3), keepdim=True).clamp_min(1e-12)
        return torch.where(known > 0, values, total.expand_as(values))
    weight = F.avg_pool2d(known, 2, ceil_mode=True)
    coarse = F.avg_pool2d(values * known, 2, ceil_mode=True) / weight.clamp_min(1e-12)
    filled = _coarse_fill(coarse, (weight > 0).to(values.dtype))
    up = F.interpolate(filled, size=values.shape[-2:], mode="bilinear", align_corners=False)
    return torch.where(known > 0, values, up)
