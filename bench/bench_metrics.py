"""Metric speed: xai against Quantus 0.6 on the same inputs and attributions, and against the compute
bound (the plain torch passes a metric cannot avoid, at the best batch size), in one run.

    .venv/bin/python bench/bench_metrics.py [--images 8] [--threads 2]

Model: torchvision resnet18, random init, 224×224 inputs (real photos from skimage.data), saliency
attributions. Printed per metric: seconds per image for xai, Quantus and the bound, and the ratios
quantus/xai (speed-up) and bound/xai (share of the bound reached; pure-array metrics have none).

Times are process CPU seconds (both threads), best of up to 3 runs, with OpenMP threads that sleep
instead of spinning: on a shared, overloaded machine wall time mostly measures the neighbours, CPU
time measures the work. Wall seconds per image are printed too.
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: idle threads sleep, CPU time = work

import time
import warnings
from typing import Callable

import numpy as np
import quantus
import torch
import torchvision
from skimage import data, transform

from xaicli.descriptors import MetricContext
from xaicli.model import IMAGENET_MEAN, IMAGENET_STD, InputSpec, Model
from xaicli.params import resolve
from xaicli.registry import default_registry
from xaicli.rng import BatchRNG
from xaicli_plugins.methods.gradient import saliency

warnings.filterwarnings("ignore")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina", "cat")


def photos(n: int) -> torch.Tensor:
    """n real photos, 224×224, ImageNet-normalised: [n, 3, 224, 224]."""
    images = [transform.resize(getattr(data, PHOTOS[i % len(PHOTOS)])(), (224, 224), anti_aliasing=True) for i in range(n)]
    x = torch.from_numpy(np.stack(images)).float().permute(0, 3, 1, 2)
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def timed(fn: Callable[[], object], budget: float = 20.0) -> tuple[float, float]:
    """(CPU seconds, wall seconds), best of up to 3 runs, stopping once the runs took `budget` wall seconds."""
    runs: list[tuple[float, float]] = []
    while len(runs) < 3 and sum(w for _, w in runs) < budget:
        cpu, wall = time.process_time(), time.perf_counter()
        fn()
        runs.append((time.process_time() - cpu, time.perf_counter() - wall))
    return min(c for c, _ in runs), min(w for _, w in runs)


def best_rate(step: Callable[[torch.Tensor], object], sizes: tuple[int, ...]) -> tuple[float, int]:
    """(images per second, batch size) of the fastest batch size for one pass `step(batch)`."""
    rates = {}
    for size in sizes:
        batch = torch.randn(size, 3, 224, 224)
        step(batch)  # warm-up
        rates[size] = size / timed(lambda: step(batch), budget=60.0)[0]
    size = max(rates, key=rates.get)
    return rates[size], size


def q_saliency(model, inputs, targets, **kwargs) -> np.ndarray:
    """Quantus explain_func: the same autograd saliency, channel-summed, numpy in and out."""
    x = torch.as_tensor(inputs).requires_grad_(True)
    out = model(x).gather(1, torch.as_tensor(targets).long().view(-1, 1)).sum()
    return torch.autograd.grad(out, x)[0].sum(1, keepdim=True).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None).eval()
    model = Model("resnet18", InputSpec(), torch.device("cpu"), module=net)
    x = photos(args.images)
    n = len(x)
    with torch.no_grad():
        y = net(x).argmax(1)
    rng = BatchRNG(range(n))
    relevance = saliency(model, x, y, rng).relevance
    masks = torch.zeros(n, 1, 224, 224, dtype=torch.bool)
    masks[:, :, 56:168, 56:168] = True
    q_data = dict(model=net, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=relevance.sum(1, keepdim=True).numpy(),
                  s_batch=masks.numpy().astype(float), batch_size=n)
    explain = lambda xx, t, m=None, r=None: saliency(m or model, xx, t, r).relevance  # noqa: E731

    def grad_step(batch: torch.Tensor) -> None:
        saliency(model, batch, torch.zeros(len(batch), dtype=torch.long), rng)

    with torch.no_grad():
        forward_rate, forward_batch = best_rate(net, (8, 16, 32))
    saliency_rate, saliency_batch = best_rate(grad_step, (4, 8, 16))
    layers = sum(1 for m in net.modules() if next(m.parameters(recurse=False), None) is not None)
    print(f"load average {os.getloadavg()[0]:.1f}; resnet18 @224, {args.threads} threads, {n} images; per CPU second: "
          f"forward {forward_rate:.1f} img (batch {forward_batch}), saliency {saliency_rate:.1f} img (batch {saliency_batch}); "
          f"{layers} layers with weights")

    def ours(name: str, **params) -> Callable[[], object]:
        metric = default_registry().metric(name)
        resolved = resolve(metric.params, params)
        ctx = MetricContext(explain=explain, masks=masks, rng=rng)
        return lambda: metric.score(model, x, y, relevance, ctx, **resolved)

    def theirs(metric, **call) -> Callable[[], object]:
        return lambda: metric(**q_data, **call)

    # Quantus checks features_in_step against H×W but flips C×H×W values: its "16 steps"
    # (features_in_step = 224·224/16) are 48 forwards per image. We time ours with the same 48.
    steps = 16
    cases = [
        ("pixel_flipping (48 forwards)", ours("pixel_flipping", steps=3 * steps, max_batch=forward_batch),
         theirs(quantus.PixelFlipping(features_in_step=224 * 224 // steps, normalise=False, disable_warnings=True)),
         3 * steps / forward_rate),
        ("region_perturbation (16 regions)", ours("region_perturbation", patch_size=16, regions=16, max_batch=forward_batch),
         theirs(quantus.RegionPerturbation(patch_size=16, regions_evaluation=16, normalise=False, disable_warnings=True)),
         (steps + 1) / forward_rate),
        ("completeness", ours("completeness", max_batch=forward_batch),
         theirs(quantus.Completeness(normalise=False, disable_warnings=True)), 2 / forward_rate),
        ("max_sensitivity (10 samples)", ours("max_sensitivity", samples=10, max_batch=saliency_batch),
         theirs(quantus.MaxSensitivity(nr_samples=10, disable_warnings=True), explain_func=q_saliency), 10 / saliency_rate),
        ("random_logit", ours("random_logit", max_batch=saliency_batch),
         theirs(quantus.RandomLogit(num_classes=1000, disable_warnings=True), explain_func=q_saliency), 1 / saliency_rate),
        (f"mprt ({layers} layers)", ours("mprt", max_batch=saliency_batch),
         theirs(quantus.MPRT(disable_warnings=True), explain_func=q_saliency), layers / saliency_rate),
        ("sparseness", ours("sparseness"), theirs(quantus.Sparseness(normalise=False, disable_warnings=True)), None),
        ("complexity", ours("complexity"), theirs(quantus.Complexity(normalise=False, disable_warnings=True)), None),
        ("relevance_rank_accuracy", ours("relevance_rank_accuracy"),
         theirs(quantus.RelevanceRankAccuracy(normalise=False, disable_warnings=True)), None),
        ("pointing_game", ours("pointing_game"), theirs(quantus.PointingGame(normalise=False, disable_warnings=True)), None),
    ]
    print(f"{'CPU s/img':34s} {'xai':>9s} {'quantus':>9s} {'bound':>9s} {'×quantus':>9s} {'×bound':>7s}  wall s/img: xai, quantus")
    for label, run_ours, run_theirs, bound in cases:
        (ours_cpu, ours_wall), (theirs_cpu, theirs_wall) = timed(run_ours), timed(run_theirs)
        t_ours, t_theirs = ours_cpu / n, theirs_cpu / n
        bound_text = f"{bound:9.4f}" if bound else f"{'-':>9s}"
        share = f"{bound / t_ours:7.2f}" if bound else f"{'-':>7s}"
        print(f"{label:34s} {t_ours:9.4f} {t_theirs:9.4f} {bound_text} {t_theirs / t_ours:9.2f} {share}  "
              f"{ours_wall / n:.4f}, {theirs_wall / n:.4f}", flush=True)


if __name__ == "__main__":
    main()
