"""Integrated Gradients (Sundararajan et al. 2017): (x − x̄) ⊙ Σ_k w_k ∂f_t(x̄ + α_k (x − x̄))/∂x.

Nodes α_k and weights w_k follow captum's IntegratedGradients exactly, under captum's names:
`gausslegendre` (captum's default; numpy's Gauss–Legendre nodes mapped to [0, 1]) and
`riemann_left|right|middle|trapezoid` (weights 1/steps; captum's trapezoid halves the two end
weights, so they sum to (steps−1)/steps — kept for parity, and visible in `completeness_gap`).
`steps` defaults to captum's 50. Every interpolated image of the batch goes through one forward
and backward pass in chunks of at most `max_batch` images.

Baselines x̄ (x is normalised model input, so names refer to the image):
- `zeros`: a black image, (0 − mean)/std per channel (the paper's baseline);
- `mean`: the input spec's mean colour, i.e. 0 in normalised space (captum's default all-zero tensor);
- `blur`: the input blurred with a Gaussian of `sigma` pixels (Sturmfels et al. 2020);
- `uniform`: uniform noise in [0, 1] image space from the input's random stream, then normalised;
- any other value: the path of an image, decoded and preprocessed with the model's input spec.
Extras: `completeness_gap` Σ R − (f_t(x) − f_t(x̄)) and `baseline_logit` f_t(x̄), per input.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from xaicli import Attribution, Method, Param, hookimpl
from xaicli.chunking import AUTO, MaxBatch, chunked, max_batch_param, predict_rows
from xaicli.errors import UsageError
from xaicli.imaging import gaussian_blur, normalise
from xaicli.model import Model, gather_target, input_gradient
from xaicli.rng import BatchRNG

INTEGRATIONS = ("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle")
NAMED_BASELINES = ("zeros", "mean", "blur", "uniform")


def quadrature(integration: str, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(nodes α [steps], weights w [steps]) on [0, 1], as captum's approximation methods."""
    if integration == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return torch.from_numpy(0.5 * (nodes + 1)), torch.from_numpy(0.5 * weights)
    if steps < 2:
        raise UsageError(f"integrated_gradients: {integration} needs steps >= 2; got {steps}")
    weights = torch.full((steps,), 1.0 / steps, dtype=torch.float64)
    alphas = {
        "riemann_left": torch.linspace(0, 1 - 1 / steps, steps),
        "riemann_right": torch.linspace(1 / steps, 1, steps),
        "riemann_middle": torch.linspace(1 / (2 * steps), 1 - 1 / (2 * steps), steps),
        "riemann_trapezoid": torch.linspace(0, 1, steps),
    }[integration]
    if integration == "riemann_trapezoid":
        weights[0] /= 2
        weights[-1] /= 2
    return alphas.double(), weights


def make_baseline(model: Model, x: torch.Tensor, rng: BatchRNG, baseline: str, sigma: float) -> torch.Tensor:
    """The baseline x̄ [B,C,H,W] in normalised model-input space (see the module docstring)."""
    if baseline == "mean":
        return torch.zeros_like(x)
    if baseline == "zeros":
        return normalise(x.new_zeros(x.shape[1], 1, 1), model.spec).expand_as(x).contiguous()
    if baseline == "blur":
        return gaussian_blur(x, sigma)
    if baseline == "uniform":
        return normalise(rng.uniform(x.shape[1:], x.device, stream="baseline").to(x.dtype), model.spec)
    return _image_baseline(Path(baseline), model, x)


def _image_baseline(path: Path, model: Model, x: torch.Tensor) -> torch.Tensor:
    """An image file as model input, preprocessed like every input of the run."""
    from xaicli.data import load_image, preprocess
    from xaicli.errors import InputError

    if not path.is_file():
        raise UsageError(f"integrated_gradients: baseline must be one of {', '.join(NAMED_BASELINES)} "
                         f"or an image file; {str(path)!r} is neither")
    try:
        pixels, _ = load_image(path, model.spec.channels)
    except InputError as err:
        raise UsageError(f"integrated_gradients: baseline image {path}: {err}") from None
    image, _, _ = preprocess(pixels, model.spec)
    if image.shape != x.shape[1:]:
        raise UsageError(f"integrated_gradients: baseline image {path} gives {tuple(image.shape)}, "
                         f"inputs are {tuple(x.shape[1:])}")
    return image.to(x.device, x.dtype).expand_as(x).contiguous()


def integrated_gradients(
    model: Model, x: torch.Tensor, target: torch.Tensor, rng: BatchRNG, baseline: str = "zeros", sigma: float = 10.0,
    steps: int = 50, integration: str = "gausslegendre", max_batch: MaxBatch = AUTO,
) -> Attribution:
    """Accumulate weighted gradients along the straight path, B·steps points in chunks of max_batch."""
    B = len(x)
    target = target.to(x.device)
    base = make_baseline(model, x, rng, baseline, sigma)
    alphas, weights = (t.to(x.device, x.dtype) for t in quadrature(integration, steps))
    delta = x - base
    total = torch.zeros_like(x)

    def accumulate(start: int, stop: int) -> None:
        chunk = torch.arange(start, stop, device=x.device)
        image, k = chunk // steps, chunk % steps
        points = base[image] + alphas[k].view(-1, 1, 1, 1) * delta[image]
        grad, _ = input_gradient(model, points, target[image])
        total.index_add_(0, image, grad * weights[k].view(-1, 1, 1, 1))

    chunked(accumulate, B * steps, max_batch, key="integrated_gradients", device=x.device)
    relevance = delta * total
    ends = gather_target(predict_rows(model, torch.cat([x, base]), max_batch), torch.cat([target, target]))
    gap = relevance.flatten(1).sum(1) - (ends[:B] - ends[B:])
    return Attribution(relevance, {"completeness_gap": gap, "baseline_logit": ends[B:]})


@hookimpl
def xai_methods() -> list[Method]:
    return [
        Method(
            "integrated_gradients",
            "path integral of gradients from a baseline (Sundararajan et al. 2017)",
            integrated_gradients,
            (
                Param("baseline", str, "zeros", "zeros (black image), mean (0 after normalisation, captum's default), "
                      "blur, uniform (noise), or the path of an image file"),
                Param("sigma", float, 10.0, "σ in pixels of the Gaussian for the blur baseline", low=0),
                Param("steps", int, 50, "number of integration nodes (captum's default 50)", low=1, high=10_000),
                Param("integration", str, "gausslegendre", "quadrature rule, named as in captum", choices=INTEGRATIONS),
                max_batch_param("interpolated images per forward/backward pass"),
            ),
        )
    ]
