"""Learned perturbation masks: meaningful perturbation (Fong & Vedaldi 2017) and extremal
perturbation (Fong, Patrick & Vedaldi 2019), optimised for the whole batch at once.

A low-resolution keep-mask m ∈ [0,1]^{h×w} (`mask_size`) is upsampled bilinearly to the input and
blends the input with its Gaussian blur (`sigma`): Φ(x, m) = m ⊙ x + (1 − m) ⊙ blur(x). The
relevant region r is 1 − m in the `delete` game (what must be removed to lose the class) and m in
the `preserve` game (what must be kept to retain it); the relevance is r upsampled and broadcast
to the C channels. One Adam optimiser updates the [B,1,h,w] mask tensor; the images go through the
model in chunks of at most `max_batch` and their (independent) losses' gradients are accumulated
before each step, so results do not depend on the batch size. The initial mask (0.5 ± 0.05) and the jitter
shifts (up to `jitter` pixels, replicate border, applied to x and blur(x) alike) come from the
per-input random streams. The optimisation is chaotic (a rounding difference flips a ReLU or max-pool
winner, and the masks part ways), so batch-size invariance needs bit-identical logits per image:
CPU GEMM kernels compute rows in blocks of 8 and the remainder rows with other kernels, so every
chunk is padded to a multiple of `ROWS` rows (copies of its last image, their outputs unused).

- meaningful_perturbation: loss = λ₁·mean|r| + λ₂·TV_β(m) + s, with s = p_t(Φ) (delete) or
  −p_t(Φ) (preserve), p_t the softmax probability of the target as in the paper. λ's weight
  means over mask cells (not sums), so they do not depend on `mask_size`. The mask is clipped to
  [0,1] after each step, as in the paper. Defaults: σ = 10 px, 300 Adam steps at lr 0.1, β = 3
  as in the paper; λ₁ = 1, λ₂ = 0.2 measured on the digits CNN (the paper's λ₁ = 1e-4 on a sum
  over 28×28 cells, ≈ 0.08 here, leaves ~50% of a confident model's input deleted).
- extremal_perturbation: fixed `area` a of r, enforced by the ranking loss of the paper:
  λ_area·mean((sort(r) − ref_a)²) with ref_a the sorted vector holding a·n ones; the score is the
  target logit, as TorchRay's default reward: loss = ±f_t(Φ) + area loss (+ λ₂·TV_β).
No reference library ships these methods (TorchRay is unmaintained), so there is no parity test.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from xaicli import Attribution, Method, Param, hookimpl
from xaicli.chunking import AUTO, ROWS, MaxBatch, chunked, max_batch_param, predict_rows
from xaicli.imaging import gaussian_blur
from xaicli.model import Model
from xaicli.rng import BatchRNG


def shift(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Each image of [B,C,H,W] translated by its own integer (dy, dx) of offsets [B,2], replicating the border."""
    _, _, H, W = x.shape
    rows = (torch.arange(H, device=x.device)[None] - offsets[:, :1]).clamp(0, H - 1)
    cols = (torch.arange(W, device=x.device)[None] - offsets[:, 1:]).clamp(0, W - 1)
    batch = torch.arange(len(x), device=x.device)[:, None, None]
    return x[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def total_variation(m: torch.Tensor, beta: float) -> torch.Tensor:
    """TV_β of masks [B,1,h,w]: mean |∂m|^β over vertical plus horizontal neighbours, per mask [B]."""
    dy = (m[:, :, 1:] - m[:, :, :-1]).abs().pow(beta).flatten(1).mean(1)
    dx = (m[:, :, :, 1:] - m[:, :, :, :-1]).abs().pow(beta).flatten(1).mean(1)
    return dy + dx


def area_loss(region: torch.Tensor, area: float) -> torch.Tensor:
    """Fong et al. 2019's area constraint per mask [B]: mean((sort(r) − ref_a)²), ref_a = a·n trailing ones."""
    flat = region.flatten(1)
    n = flat.shape[1]
    ones = round(area * n)
    ref = torch.cat([flat.new_zeros(n - ones), flat.new_ones(ones)])
    return (flat.sort(dim=1).values - ref).pow(2).mean(1)


def padded_logits(model: Model, x: torch.Tensor) -> torch.Tensor:
    """model(x) with x padded to a multiple of ROWS rows, so each row's logits do not depend on len(x)."""
    n = len(x)
    extra = -n % ROWS
    if not extra:
        return model(x)
    return model(torch.cat([x, x[-1:].expand(extra, *x.shape[1:])]))[:n]


def _mask_size(value: int | list[int] | None, H: int, W: int) -> tuple[int, int]:
    """`mask_size` as (h, w); None means input/8 (28 at 224), at least 8 (or the input size)."""
    if value is None:
        return min(H, max(8, round(H / 8))), min(W, max(8, round(W / 8)))
    if isinstance(value, int):
        return value, value
    return int(value[0]), int(value[1])


def _score(logits: torch.Tensor, target: torch.Tensor, use_prob: bool) -> torch.Tensor:
    picked = logits.log_softmax(1) if use_prob else logits
    value = picked.gather(1, target.view(-1, 1)).squeeze(1)
    return value.exp() if use_prob else value


def _optimise(
    model: Model, x: torch.Tensor, target: torch.Tensor, rng: BatchRNG, *, game: str, sigma: float,
    mask_size: int | list[int] | None, steps: int, lr: float, jitter: int | None, tv: float, tv_beta: float,
    max_batch: MaxBatch, use_prob: bool, penalty: Callable[[torch.Tensor], torch.Tensor], key: str,
) -> Attribution:
    """Adam over one [B,1,h,w] keep-mask; the score is p_t (`use_prob`) or f_t, `penalty(r)` [B] the area term."""
    B, C, H, W = x.shape
    h, w = _mask_size(mask_size, H, W)
    target = target.to(x.device)
    blurred = gaussian_blur(x, sigma)
    jitter = round(max(H, W) / 56) if jitter is None else jitter
    sign = 1.0 if game == "delete" else -1.0
    mask = (0.5 + 0.1 * (rng.uniform((1, h, w), x.device, stream="init") - 0.5)).requires_grad_(True)
    shifts = rng.integers(2 * jitter + 1, (steps, 2), x.device, stream="jitter") - jitter
    optimiser = torch.optim.Adam([mask], lr=lr)

    def accumulate(step: int, start: int, stop: int) -> None:
        """Add the gradient of images [start, stop)'s losses to mask.grad (backward allocates before it adds)."""
        with torch.enable_grad():
            m = mask[start:stop]
            up = F.interpolate(m, size=(H, W), mode="bilinear", align_corners=False)
            offsets = shifts[start:stop, step]
            blend = up * shift(x[start:stop], offsets) + (1 - up) * shift(blurred[start:stop], offsets)
            score = _score(padded_logits(model, blend), target[start:stop], use_prob)
            region = 1 - m if game == "delete" else m
            loss = sign * score + tv * total_variation(m, tv_beta) + penalty(region)
            loss.sum().backward()

    for step in range(steps):
        optimiser.zero_grad()
        chunked(lambda start, stop: accumulate(step, start, stop), B, max_batch, key=key, device=x.device)
        optimiser.step()
        with torch.no_grad():
            mask.clamp_(0, 1)
    return _result(model, x, target, blurred, mask.detach(), game, max_batch)


def _result(
    model: Model, x: torch.Tensor, target: torch.Tensor, blurred: torch.Tensor, mask: torch.Tensor, game: str,
    max_batch: MaxBatch,
) -> Attribution:
    """Relevance from the final mask, with the mask itself and the target probability it leaves."""
    B, C, H, W = x.shape
    up = F.interpolate(mask, size=(H, W), mode="bilinear", align_corners=False)
    logits = predict_rows(model, up * x + (1 - up) * blurred, max_batch)
    region = 1 - up if game == "delete" else up
    return Attribution(
        region.expand(B, C, H, W).contiguous(),
        {"mask": mask[:, 0], "target_prob": _score(logits, target, True)},
    )


def meaningful_perturbation(
    model: Model, x: torch.Tensor, target: torch.Tensor, rng: BatchRNG, game: str = "delete", sigma: float = 10.0,
    mask_size: int | list[int] | None = None, steps: int = 300, lr: float = 0.1, l1: float = 1.0, tv: float = 0.2,
    tv_beta: float = 3.0, jitter: int | None = None, max_batch: MaxBatch = AUTO,
) -> Attribution:
    """The smallest smooth region whose blurring removes (delete) or alone keeps (preserve) the class."""
    return _optimise(
        model, x, target, rng, game=game, sigma=sigma, mask_size=mask_size, steps=steps, lr=lr, jitter=jitter,
        tv=tv, tv_beta=tv_beta, max_batch=max_batch, use_prob=True, key="meaningful_perturbation",
        penalty=lambda region: l1 * region.abs().flatten(1).mean(1),
    )


def extremal_perturbation(
    model: Model, x: torch.Tensor, target: torch.Tensor, rng: BatchRNG, game: str = "preserve", area: float = 0.1,
    sigma: float = 10.0, mask_size: int | list[int] | None = None, steps: int = 300, lr: float = 0.05,
    area_weight: float = 300.0, tv: float = 0.0, tv_beta: float = 3.0, jitter: int | None = 0,
    max_batch: MaxBatch = AUTO,
) -> Attribution:
    """The region of fixed `area` that best keeps (preserve) or removes (delete) the target logit."""
    return _optimise(
        model, x, target, rng, game=game, sigma=sigma, mask_size=mask_size, steps=steps, lr=lr, jitter=jitter,
        tv=tv, tv_beta=tv_beta, max_batch=max_batch, use_prob=False, key="extremal_perturbation",
        penalty=lambda region: area_weight * area_loss(region, area),
    )


def _shared(game: str, lr: float, jitter: int | None, tv: float) -> tuple[Param, ...]:
    return (
        Param("game", str, game, "delete: find what must be blurred away to lose the class; preserve: what must "
              "be kept", choices=("delete", "preserve")),
        Param("sigma", float, 10.0, "σ in pixels of the Gaussian blur that perturbs the input", low=0),
        Param("mask_size", (int, list), None, "mask resolution n or [h, w], upsampled bilinearly "
              "(default input/8, ≥ 8)", low=1, high=4096, length=2),
        Param("steps", int, 300, "Adam steps", low=1, high=100_000),
        Param("lr", float, lr, "Adam learning rate", low=0),
        Param("tv", float, tv, "λ₂: weight of the total-variation term (smooth masks)", low=0),
        Param("tv_beta", float, 3.0, "β of TV_β", low=1),
        Param("jitter", int, jitter, "largest random shift in pixels of the input at each step, against adversarial "
              "masks (default input/56: 4 px at 224, as in the paper)", low=0, high=4096),
        max_batch_param("images per forward/backward pass"),
    )


@hookimpl
def xai_methods() -> list[Method]:
    return [
        Method(
            "meaningful_perturbation",
            "learned blur mask with L1 and TV regularisers (Fong & Vedaldi 2017)",
            meaningful_perturbation,
            (*_shared("delete", 0.1, None, 0.2),
             Param("l1", float, 1.0, "λ₁: weight of the mean mask area term", low=0)),
        ),
        Method(
            "extremal_perturbation",
            "learned blur mask of fixed area (Fong et al. 2019)",
            extremal_perturbation,
            (
                *_shared("preserve", 0.05, 0, 0.0),
                Param("area", float, 0.1, "fraction of the input the relevant region covers", low=0, high=1),
                Param("area_weight", float, 300.0, "weight of the sorted-mask area constraint", low=0),
            ),
        ),
    ]
