"""LIME for images (Ribeiro et al. 2016): a weighted linear surrogate over superpixels, fitted for
the whole batch at once in torch. Forward-only: runs on ONNX models through onnxruntime.

- Segmentation of the de-normalised image: `slic` (scikit-image, `segments` clusters,
  `compactness`), `quickshift` (scikit-image with the lime package's settings kernel_size=4,
  max_dist=200, ratio=0.2; `segments` unused) or `grid` (about `segments` equal cells, vectorised).
- `samples` binary masks per input (default 1000, the lime package's; captum's 50 is too few for
  stable coefficients), each segment kept with p = 0.5 (captum and lime); the first sample is the
  unmasked input, as in the lime package (captum omits it). Masks come from the input's stream.
- Off segments take the `baseline` image: `mean` (0 in normalised space), `zeros` (black) or `blur`
  (Gaussian of `sigma` pixels). (The lime package's default paints each segment's mean colour.)
- The target *logit* is explained, like every xai method (the lime package explains probabilities).
- Sample weights exp(−d²/(2·w²)) with d the cosine distance of the binary mask to the all-ones
  mask and w = `kernel_width` (0.25): exactly the lime package's sqrt(exp(−d²/w²)) (REFERENCE.md's
  exp(−d²/σ²) with σ = √2·w); captum's exp kernel has the same form but on model inputs.
- Weighted ridge with an unpenalised intercept (`alpha` default 1.0, as lime's Ridge(alpha=1)),
  in closed form by a batched solve; or weighted lasso (sklearn's objective
  (1/2Σw)·Σ w·r² + α‖β‖₁, `alpha` default 0.01 as captum's default SkLearnLasso) by batched FISTA.
Relevance paints each segment with its coefficient, broadcast over channels. Extras: `segments`
[B,H,W] int32, `coefficients` [B, max segments] (zero-padded), `n_segments` [B], `intercept` [B].
"""
from __future__ import annotations

import numpy as np
import torch

from xaicli import Attribution, Method, Param, hookimpl
from xaicli.chunking import AUTO, MaxBatch, max_batch_param, predict_rows
from xaicli.imaging import denormalise, gaussian_blur, normalise
from xaicli.model import Model
from xaicli.rng import BatchRNG

LASSO_ITERATIONS = 500


def grid_segments(B: int, H: int, W: int, n: int, device: torch.device) -> torch.Tensor:
    """[B,H,W] labels of a rows × cols grid with rows·cols ≈ n cells of near-equal size."""
    rows = max(1, min(H, round((n * H / W) ** 0.5)))
    cols = max(1, min(W, round(n / rows)))
    r = torch.arange(H, device=device) * rows // H
    c = torch.arange(W, device=device) * cols // W
    return (r[:, None] * cols + c[None, :]).expand(B, H, W).contiguous()


def image_segments(images: np.ndarray, segmentation: str, n: int, compactness: float) -> np.ndarray:
    """[B,H,W] labels 0..k−1 of images [B,H,W,C] in [0, 1] by scikit-image (one call per image)."""
    from skimage.segmentation import quickshift, slic

    labels = []
    for image in images:
        gray = image.shape[-1] == 1
        if segmentation == "slic":
            seg = slic(image[..., 0] if gray else image, n_segments=n, compactness=compactness, start_label=0,
                       channel_axis=None if gray else -1)
        else:
            rgb = np.repeat(image, 3, axis=-1) if gray else image
            seg = quickshift(rgb.astype(np.float64), kernel_size=4, max_dist=200, ratio=0.2)
        labels.append(np.unique(seg, return_inverse=True)[1].reshape(seg.shape))
    return np.stack(labels)


def segment(model: Model, x: torch.Tensor, segmentation: str, n: int, compactness: float) -> torch.Tensor:
    """[B,H,W] int64 segment labels of the de-normalised inputs."""
    B, C, H, W = x.shape
    if segmentation == "grid":
        return grid_segments(B, H, W, n, x.device)
    images = denormalise(x, model.spec).clamp(0, 1).permute(0, 2, 3, 1).double().cpu().numpy()
    return torch.from_numpy(image_segments(images, segmentation, n, compactness)).long().to(x.device)


def sample_masks(rng: BatchRNG, counts: list[int], samples: int, device: torch.device) -> torch.Tensor:
    """[B, samples, max count] binary masks, zero beyond each input's segment count; row 0 all ones."""
    masks = torch.zeros(len(counts), samples, max(counts), device=device)
    for i, k in enumerate(counts):
        masks[i, :, :k] = (rng[[i]].uniform((samples, k), device, stream="masks")[0] < 0.5).float()
        masks[i, 0, :k] = 1
    return masks


def kernel_weights(masks: torch.Tensor, counts: torch.Tensor, kernel_width: float) -> torch.Tensor:
    """exp(−d²/(2w²)) with d = 1 − cos(z, 1) = 1 − sqrt(|z|/k): [B, samples]."""
    distance = 1 - (masks.sum(-1) / counts[:, None]).sqrt()
    return torch.exp(-distance**2 / (2 * kernel_width**2))


def fit_linear(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, regression: str, alpha: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(coefficients [B,K], intercept [B]) of weighted ridge/lasso fits, one per input, in float64 on the
    CPU (a few K×K systems: cheap anywhere, and float64 exists on every CPU)."""
    z, y, w, counts = (t.detach().cpu() for t in (z.double(), y.double(), w.double(), counts))
    total = w.sum(1, keepdim=True)
    z_mean = (w[..., None] * z).sum(1) / total
    y_mean = (w * y).sum(1, keepdim=True) / total
    zc, yc = z - z_mean[:, None], y - y_mean
    gram = torch.einsum("bnk,bn,bnl->bkl", zc, w, zc)
    corr = torch.einsum("bnk,bn,bn->bk", zc, w, yc)
    padding = torch.arange(z.shape[-1], device=z.device)[None] >= counts[:, None]
    if regression == "ridge":
        eye = torch.diag_embed(alpha + padding.double())
        coef = torch.linalg.solve(gram + eye, corr)
    else:
        coef = _lasso(gram / total[..., None], corr / total, alpha)
    return coef, y_mean[:, 0] - (z_mean * coef).sum(1)


def _lasso(gram: torch.Tensor, corr: torch.Tensor, alpha: float) -> torch.Tensor:
    """argmin ½βᵀGβ − cᵀβ + α‖β‖₁ for each row by FISTA (Beck & Teboulle 2009), batched."""
    step = 1 / torch.linalg.eigvalsh(gram)[:, -1:].clamp_min(1e-12)
    coef = momentum = torch.zeros_like(corr)
    t = 1.0
    for _ in range(LASSO_ITERATIONS):
        moved = momentum - step * (torch.einsum("bkl,bl->bk", gram, momentum) - corr)
        new = moved.sign() * (moved.abs() - step * alpha).clamp_min(0)
        t_new = (1 + (1 + 4 * t * t) ** 0.5) / 2
        momentum = new + (t - 1) / t_new * (new - coef)
        coef, t = new, t_new
    return coef


def lime(
    model: Model, x: torch.Tensor, target: torch.Tensor, rng: BatchRNG, segmentation: str = "slic", segments: int = 50,
    compactness: float = 10.0, samples: int = 1000, kernel_width: float = 0.25, baseline: str = "mean",
    sigma: float = 10.0, regression: str = "ridge", alpha: float | None = None, max_batch: MaxBatch = AUTO,
) -> Attribution:
    """Segment, evaluate the model on `samples` masked copies per input, fit one surrogate per input."""
    B, C, H, W = x.shape
    target = target.to(x.device)
    labels = segment(model, x, segmentation, segments, compactness)
    counts = (labels.flatten(1).amax(1) + 1).tolist()
    masks = sample_masks(rng, counts, samples, x.device)
    base = _baseline(model, x, baseline, sigma)
    flat_labels = labels.flatten(1)

    def masked(start: int, stop: int) -> torch.Tensor:
        index = torch.arange(start, stop, device=x.device)
        image, row = index // samples, index % samples
        keep = masks[image, row].gather(1, flat_labels[image]).view(-1, 1, H, W)
        return base[image] + keep * (x[image] - base[image])

    logits = predict_rows(model, masked, max_batch, key="lime", total=B * samples)
    y = logits.gather(1, target.repeat_interleave(samples)[:, None]).view(B, samples)
    count_t = torch.tensor(counts, device=x.device)
    weights = kernel_weights(masks, count_t, kernel_width)
    alpha = (1.0 if regression == "ridge" else 0.01) if alpha is None else alpha
    coef, intercept = fit_linear(masks, y, weights, count_t, regression, alpha)
    coef, intercept = coef.to(x.device, x.dtype), intercept.to(x.device, x.dtype)
    relevance = coef.gather(1, flat_labels).view(B, 1, H, W).expand(B, C, H, W).contiguous()
    extras = {"segments": labels.int(), "coefficients": coef, "n_segments": count_t, "intercept": intercept}
    return Attribution(relevance, extras)


def _baseline(model: Model, x: torch.Tensor, baseline: str, sigma: float) -> torch.Tensor:
    """The image off segments take, in normalised model-input space."""
    if baseline == "mean":
        return torch.zeros_like(x)
    if baseline == "blur":
        return gaussian_blur(x, sigma)
    return normalise(x.new_zeros(x.shape[1], 1, 1), model.spec).expand_as(x).contiguous()


@hookimpl
def xai_methods() -> list[Method]:
    return [
        Method(
            "lime",
            "weighted linear surrogate over superpixels (Ribeiro et al. 2016; model-agnostic)",
            lime,
            (
                Param("segmentation", str, "slic", "superpixels: slic, quickshift (lime's settings) or a regular grid",
                      choices=("slic", "quickshift", "grid")),
                Param("segments", int, 50, "number of segments for slic and grid", low=1, high=10_000),
                Param("compactness", float, 10.0,
                      "slic's colour/space trade-off (lower follows edges more; ~0.1 for gray images)", low=0),
                Param("samples", int, 1000, "masked copies per input, the unmasked input first (lime's 1000)", low=2,
                      high=100_000),
                Param("kernel_width", float, 0.25, "width of the exponential kernel on cosine distance (lime's 0.25)",
                      low=1e-6),
                Param("baseline", str, "mean", "what masked segments show: mean colour (0 normalised), zeros (black) "
                      "or blur", choices=("mean", "zeros", "blur")),
                Param("sigma", float, 10.0, "σ in pixels of the Gaussian for the blur baseline", low=0),
                Param("regression", str, "ridge", "surrogate: ridge (closed form) or lasso (FISTA)",
                      choices=("ridge", "lasso")),
                Param("alpha", float, None,
                      "regularisation strength: default 1.0 for ridge (lime's), 0.01 for lasso (captum's)", low=0),
                max_batch_param("masked images per forward pass"),
            ),
            needs="forward",
        )
    ]
