"""SmoothGrad (Smilkov et al. 2017) and VarGrad (Adebayo et al. 2018) around any registered method.

Each input gets `samples` noisy copies x + ε, ε ~ N(0, σ²) with σ = noise × (max − min) of that
input (the paper's relative noise level; captum's NoiseTunnel takes an absolute `stdevs`
instead: pass stdevs = σ to compare). The `base` method (default saliency, with `base_params`)
explains the noisy copies of the whole batch at once, in chunks of at most `max_batch` copies;
smoothgrad averages its relevances, vargrad takes their (population) variance, as captum's vargrad.
Copy k of input i draws its noise from input i's stream "noise/k" and hands the base method the
child stream "base/k", so nested stochastic methods stay independent of the batch size. The base
inherits `max_batch` unless `base_params` sets it.
"""
from __future__ import annotations

from typing import Any

import torch

from xaicli import Attribution, Method, Param, hookimpl
from xaicli.chunking import AUTO, MaxBatch, chunked, max_batch_param
from xaicli.errors import UsageError
from xaicli.model import Model, check_needs
from xaicli.params import ParamErrors, resolve
from xaicli.rng import BatchRNG, derive_seed


def _base(name: str, given: dict[str, Any] | None, max_batch: MaxBatch) -> tuple[Method, dict[str, Any]]:
    """The wrapped method and its resolved parameters."""
    from xaicli.registry import default_registry

    method = default_registry().method(name)
    params = dict(given or {})
    if any(p.name == "max_batch" for p in method.params):
        params.setdefault("max_batch", max_batch)
    try:
        return method, resolve(method.params, params)
    except ParamErrors as err:
        raise UsageError("; ".join(f"base_params.{e} (of base method {name})" for e in err.errors)) from None


def noisy_copies(x: torch.Tensor, rng: BatchRNG, image: torch.Tensor, copy: torch.Tensor, noise: float) -> torch.Tensor:
    """x[image] + σ·ε for the (input, copy) pairs of one chunk; ε from input `image`'s stream `noise/copy`."""
    sigma = noise * (x.flatten(1).amax(1) - x.flatten(1).amin(1))
    eps = torch.empty((len(image), *x.shape[1:]), dtype=x.dtype, device=x.device)
    for k in copy.unique().tolist():
        rows = (copy == k).nonzero().squeeze(1)
        eps[rows] = rng[image[rows].tolist()].normal(x.shape[1:], x.device, stream=f"noise/{k}").to(x.dtype)
    return x[image] + sigma[image].view(-1, 1, 1, 1) * eps


def _moments(
    model: Model, x: torch.Tensor, target: torch.Tensor, rng: BatchRNG, base: str, base_params: dict[str, Any] | None,
    samples: int, noise: float, max_batch: MaxBatch, key: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, variance) of the base method's relevance over the noisy copies of every input.

    Sums are taken around each input's first copy (always in the first chunk holding that input),
    so the variance does not suffer the cancellation of E[R²] − E[R]².
    """
    method, params = _base(base, base_params, max_batch)
    check_needs(model, method.needs, f"smoothgrad's base method {base}")
    target = target.to(x.device)
    sums: list[torch.Tensor] = []  # shift, first, second: allocated by the first chunk

    def accumulate(start: int, stop: int) -> None:
        chunk = torch.arange(start, stop, device=x.device)
        image, copy = chunk // samples, chunk % samples
        seeds = [derive_seed(rng.seeds[i], f"base/{k}") for i, k in zip(image.tolist(), copy.tolist())]
        noisy = noisy_copies(x, rng, image, copy, noise)
        relevance = method.explain(model, noisy, target[image], BatchRNG(seeds), **params).relevance
        if not sums:
            zeros = relevance.new_zeros((len(x), *relevance.shape[1:]))
            sums.extend([zeros, torch.zeros_like(zeros), torch.zeros_like(zeros)])
        shift, first, second = sums
        shift[image[copy == 0]] = relevance[copy == 0]
        deviation = relevance - shift[image]
        first.index_add_(0, image, deviation)
        second.index_add_(0, image, deviation * deviation)

    chunked(accumulate, len(x) * samples, max_batch, key=key, device=x.device)
    shift, first, second = sums
    mean = first / samples
    return shift + mean, second / samples - mean * mean


def smoothgrad(
    model: Model, x: torch.Tensor, target: torch.Tensor, rng: BatchRNG, base: str = "saliency",
    base_params: dict[str, Any] | None = None, samples: int = 50, noise: float = 0.15, max_batch: MaxBatch = AUTO,
) -> Attribution:
    """Mean relevance of the base method over noisy copies."""
    mean, _ = _moments(model, x, target, rng, base, base_params, samples, noise, max_batch, f"smoothgrad:{base}")
    return Attribution(mean)


def vargrad(
    model: Model, x: torch.Tensor, target: torch.Tensor, rng: BatchRNG, base: str = "saliency",
    base_params: dict[str, Any] | None = None, samples: int = 50, noise: float = 0.15, max_batch: MaxBatch = AUTO,
) -> Attribution:
    """Variance of the base method's relevance over noisy copies."""
    _, variance = _moments(model, x, target, rng, base, base_params, samples, noise, max_batch, f"vargrad:{base}")
    return Attribution(variance)


def check(model: Model, params: dict[str, Any]) -> None:
    """UsageError before any input runs for an unknown base method, bad base_params, a base that wraps
    noise itself (samples would multiply), or a base whose own check fails."""
    if params["base"] in ("smoothgrad", "vargrad"):
        raise UsageError(f"base: {params['base']} cannot be the base of smoothgrad or vargrad (samples would multiply)")
    method, resolved = _base(params["base"], params["base_params"], params["max_batch"])
    check_needs(model, method.needs, f"smoothgrad's base method {params['base']}")
    if method.check is not None:
        method.check(model, resolved)


PARAMS = (
    Param("base", str, "saliency", "the method explaining each noisy copy (any registered method)"),
    Param("base_params", dict, None, "parameters of the base method, e.g. {abs: true}"),
    Param("samples", int, 50, "noisy copies per input (the paper's 50)", low=1, high=100_000),
    Param("noise", float, 0.15, "noise σ as a fraction of the input's range max − min (paper: 0.1–0.2)", low=0),
    max_batch_param("noisy copies explained"),
)


@hookimpl
def xai_methods() -> list[Method]:
    return [
        Method("smoothgrad", "mean of a method's relevance over noisy copies (Smilkov et al. 2017)",
               smoothgrad, PARAMS, check=check),
        Method("vargrad", "variance of a method's relevance over noisy copies (Adebayo et al. 2018)", vargrad, PARAMS,
               check=check),
    ]
