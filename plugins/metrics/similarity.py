"""Row-wise similarities of batched maps: Pearson, Spearman (average ranks for ties, as scipy),
SSIM (skimage's defaults), and the histogram entropy eMPRT uses. All batched, no per-row loops."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .ordering import argsort_any


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of rows [B, N]; NaN where a row is constant (as scipy)."""
    a = a.double() - a.double().mean(-1, keepdim=True)
    b = b.double() - b.double().mean(-1, keepdim=True)
    denom = a.norm(dim=-1) * b.norm(dim=-1)
    corr = (a * b).sum(-1) / denom
    return torch.where(denom > 0, corr, torch.full_like(corr, float("nan"))).float()


def average_ranks(v: torch.Tensor) -> torch.Tensor:
    """Ranks 1..N of each row [B, N], ties sharing their average rank (scipy's rankdata 'average')."""
    B, N = v.shape
    order = argsort_any(v).to(v.device)
    values = v.gather(1, order)
    position = torch.arange(N, device=v.device).expand(B, N)
    starts = torch.ones_like(values, dtype=torch.bool)
    starts[:, 1:] = values[:, 1:] != values[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    first = torch.where(starts, position, 0).cummax(1).values  # where each tie group begins
    last = torch.where(ends, position, N).flip(1).cummin(1).values.flip(1)  # ... and ends
    sorted_ranks = (first + last).double() / 2 + 1
    return torch.empty_like(sorted_ranks).scatter_(1, order, sorted_ranks)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of rows [B, N] (scipy.stats.spearmanr per row)."""
    return pearson(average_ranks(a.flatten(1)), average_ranks(b.flatten(1)))


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 7) -> torch.Tensor:
    """Mean SSIM of maps [B, H, W] with skimage's defaults: uniform `window`² window, K1 0.01, K2 0.03,
    sample covariance, data range = max − min over both maps, mean over windows inside the image.
    (Quantus applies skimage to the flattened 1-D maps; we keep the image's two dimensions.)"""
    a, b = a.double()[:, None], b.double()[:, None]
    both = torch.cat([a, b], 1).flatten(1)
    span = (both.amax(1) - both.amin(1)).view(-1, 1, 1, 1)
    c1, c2 = (0.01 * span) ** 2, (0.03 * span) ** 2
    mean = lambda t: F.avg_pool2d(t, window, stride=1)  # noqa: E731
    norm = window**2 / (window**2 - 1)
    ua, ub = mean(a), mean(b)
    va = norm * (mean(a * a) - ua * ua)
    vb = norm * (mean(b * b) - ub * ub)
    cov = norm * (mean(a * b) - ua * ub)
    s = ((2 * ua * ub + c1) * (2 * cov + c2)) / ((ua**2 + ub**2 + c1) * (va + vb + c2))
    return s.flatten(1).mean(1).float()


def similarity(name: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Similarity of per-pixel maps [B, H, W] by name: spearman, pearson or ssim."""
    if name == "ssim":
        return ssim(a, b)
    if name == "pearson":
        return pearson(a.flatten(1), b.flatten(1))
    return spearman(a, b)


def histogram_entropy(r: torch.Tensor, bins: int) -> torch.Tensor:
    """Shannon entropy (nats) of the `bins`-bin histogram of each row [B, N] over its own [min, max]
    (numpy.histogram + scipy.stats.entropy, as Quantus' discrete_entropy)."""
    r = r.flatten(1).double()
    low, high = r.amin(1, keepdim=True), r.amax(1, keepdim=True)
    width = (high - low).clamp_min(1e-300)
    index = ((r - low) / width * bins).floor().clamp(0, bins - 1).long()
    counts = torch.zeros(r.shape[0], bins, dtype=torch.float64, device=r.device).scatter_add_(1, index, torch.ones_like(r))
    p = counts / counts.sum(1, keepdim=True)
    return -(p * torch.log(p.clamp_min(1e-300))).sum(1).float()
