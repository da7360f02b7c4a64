"""Images/s of our integrated gradients, occlusion and LIME against captum (and the lime package),
and against each method's compute bound, in one run.

The bound is the work a method cannot avoid — its forward (or forward+backward) passes — run as
plain torch calls at the best batch size and the best memory layout (NCHW or channels-last): IG
needs `steps` forward+backward passes per image, occlusion one forward per window position, LIME
one forward per sample. Same model (torchvision resnet18, random init, 224×224), same settings and
batch size (`--max-batch`) for every library, real photos from scikit-image. Each library runs the
model as its users would hand it over: captum gets the NCHW module; the lime package feeds it the
NHWC→NCHW permute of its numpy images (a channels-last tensor); xai's Model feeds NHWC on CPUs.
The contenders of one method run round-robin, `--repeat` rounds, and each keeps its fastest
round, so load from other processes hits them alike. Targets: ours ≥ 1.0× each reference and
≥ 0.8× the bound.

    python bench/bench_methods.py [--images 2] [--threads 2] [--steps 32] [--samples 128] [--repeat 2]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import time
from typing import Callable

import numpy as np
import torch
import torchvision

from xaicli.model import IMAGENET_MEAN, IMAGENET_STD, InputSpec, Model
from xaicli.rng import BatchRNG

Contender = tuple[str, Callable[[], object]]


def photos(n: int, size: int = 224) -> torch.Tensor:
    """n real photos from scikit-image, center-cropped, resized and ImageNet-normalised: [n,3,size,size]."""
    from skimage import data

    names = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "motorcycle_left"]
    out = []
    for name in (names * n)[:n]:
        image = getattr(data, name)()
        image = image[0] if image.ndim == 4 else image
        h, w = image.shape[:2]
        side = min(h, w)
        crop = image[(h - side) // 2 : (h + side) // 2, (w - side) // 2 : (w + side) // 2, :3]
        x = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None].float() / 255
        out.append(torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True))
    x = torch.cat(out)
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def passes(module: Callable[[torch.Tensor], torch.Tensor], count: int, batch: int, backward: bool
           ) -> Callable[[], None]:
    """`count` plain forward (or forward+backward to the input) passes in batches of `batch`."""
    x = torch.randn(batch, 3, 224, 224)

    def run() -> None:
        for start in range(0, count, batch):
            part = x[: min(batch, count - start)]
            if backward:
                part = part.clone().requires_grad_(True)
                torch.autograd.grad(module(part)[:, 0].sum(), part)
            else:
                with torch.no_grad():
                    module(part)

    return run


def best_batch(module: Callable[[torch.Tensor], torch.Tensor], sizes: tuple[int, ...], backward: bool
               ) -> tuple[int, float]:
    """(batch size, passes/s) of the fastest plain batch size, two timings each after a warm-up."""
    rates = {}
    for size in sizes:
        run = passes(module, size, size, backward)
        run()
        rates[size] = size / min(timed(run) for _ in range(2))
    size = max(rates, key=rates.get)
    return size, rates[size]


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(title: str, images: int, contenders: list[Contender], repeat: int) -> None:
    """Run the contenders round-robin; print images/s of each and ours (the first) / each."""
    best = {name: float("inf") for name, _ in contenders}
    for _ in range(repeat):
        for name, fn in contenders:
            best[name] = min(best[name], timed(fn))
    print(title, flush=True)
    ours = images / best[contenders[0][0]]
    for name, _ in contenders:
        rate = images / best[name]
        ratio = "" if name == contenders[0][0] else f"   ours/this = {ours / rate:5.2f}×"
        print(f"  {name:<34} {rate:9.3f} images/s{ratio}", flush=True)


def ig_contenders(model: Model, x: torch.Tensor, t: torch.Tensor, steps: int, max_batch: int,
                  bound: Callable[[], None]) -> list[Contender]:
    from captum.attr import IntegratedGradients

    from xaicli_plugins.methods.integrated_gradients import integrated_gradients

    ig = IntegratedGradients(model.module)
    rng = BatchRNG(range(len(x)))
    return [
        ("xai", lambda: integrated_gradients(model, x, t, rng, baseline="mean", steps=steps, max_batch=max_batch)),
        ("captum IntegratedGradients", lambda: ig.attribute(x, target=t, n_steps=steps, internal_batch_size=max_batch)),
        ("bound: steps × forward+backward", bound),
    ]


def occlusion_contenders(model: Model, x: torch.Tensor, t: torch.Tensor, window: int, stride: int, max_batch: int,
                         bound: Callable[[], None]) -> list[Contender]:
    from captum.attr import Occlusion

    from xaicli_plugins.methods.occlusion import occlusion

    occ = Occlusion(model.module)
    rng = BatchRNG(range(len(x)))
    return [
        ("xai", lambda: occlusion(model, x, t, rng, window=window, stride=stride, max_batch=max_batch)),
        ("captum Occlusion", lambda: occ.attribute(x, target=t, sliding_window_shapes=(3, window, window),
                                                   strides=(3, stride, stride), perturbations_per_eval=max_batch)),
        ("bound: windows × forward", bound),
    ]


def lime_contenders(model: Model, x: torch.Tensor, t: torch.Tensor, samples: int, max_batch: int,
                    bound: Callable[[], None]) -> list[Contender]:
    """Ours, captum's Lime on our segments, and the lime package with the same slic settings."""
    from captum.attr import Lime
    from lime.lime_image import LimeImageExplainer
    from skimage.segmentation import slic

    from xaicli_plugins.methods.lime import lime

    rng = BatchRNG(range(len(x)))
    ours = lambda: lime(model, x, t, rng, samples=samples, max_batch=max_batch)  # noqa: E731
    masks = ours().extras["segments"].long()  # also warms up scikit-image
    reference = Lime(model.module)
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    pictures = (x.permute(0, 2, 3, 1).numpy() * std + mean).clip(0, 1)

    def classify(batch: np.ndarray) -> np.ndarray:
        inputs = torch.from_numpy(((batch - mean) / std).astype(np.float32)).permute(0, 3, 1, 2)
        with torch.no_grad():
            return model.module(inputs).softmax(1).numpy()

    def captum_run() -> None:
        for i in range(len(x)):
            reference.attribute(x[i : i + 1], target=int(t[i]), feature_mask=masks[i][None, None], n_samples=samples,
                                perturbations_per_eval=max_batch)

    def segments(image: np.ndarray) -> np.ndarray:
        return slic(image, n_segments=50, compactness=10, start_label=0)

    def lime_run() -> None:
        explainer = LimeImageExplainer(random_state=0)
        with contextlib.redirect_stderr(io.StringIO()):  # its tqdm progress bar
            for i in range(len(x)):
                explainer.explain_instance(pictures[i], classify, labels=(int(t[i]),), top_labels=None, hide_color=0,
                                           num_samples=samples, batch_size=max_batch, segmentation_fn=segments)

    return [("xai", ours), ("captum Lime", captum_run), ("lime LimeImageExplainer", lime_run),
            ("bound: samples × forward", bound)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--stride", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=2, help="rounds per comparison; the fastest counts")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    plain = torchvision.models.resnet18(weights=None).eval()
    model = Model("resnet18", InputSpec(size=(224, 224)), torch.device("cpu"), module=plain)
    x = photos(args.images)
    t = model.predict(x).argmax(1)
    sizes = tuple(sorted({8, 16, args.max_batch}))
    cpu = torch.device("cpu")
    layouts = {name: Model("resnet18", model.spec, cpu, module=plain, channels_last=last)
               for name, last in (("NCHW", False), ("channels-last", True))}
    fwd = {name: best_batch(m, sizes, backward=False) for name, m in layouts.items()}
    bwd = {name: best_batch(m, sizes, backward=True) for name, m in layouts.items()}
    fwd_layout = max(fwd, key=lambda k: fwd[k][1])
    bwd_layout = max(bwd, key=lambda k: bwd[k][1])
    (fwd_batch, fwd_rate), (bwd_batch, bwd_rate) = fwd[fwd_layout], bwd[bwd_layout]
    print(f"resnet18 224×224, {args.threads} threads, {args.images} images, max_batch {args.max_batch}; plain torch: "
          + ", ".join(f"{name} {fwd[name][1]:.1f} forward/s (batch {fwd[name][0]}), {bwd[name][1]:.1f} "
                      f"forward+backward/s (batch {bwd[name][0]})" for name in layouts), flush=True)
    fwd_module, bwd_module = layouts[fwd_layout], layouts[bwd_layout]
    n = args.images
    windows = ((224 - args.window) // args.stride + 1) ** 2
    compare(f"integrated gradients ({args.steps} steps, Gauss–Legendre, zero baseline)", n, ig_contenders(
        model, x, t, args.steps, args.max_batch, passes(bwd_module, n * args.steps, bwd_batch, True)), args.repeat)
    compare(f"occlusion ({args.window}×{args.window} window, stride {args.stride}: {windows} windows per image)", n,
            occlusion_contenders(model, x, t, args.window, args.stride, args.max_batch,
                                 passes(fwd_module, n * windows, fwd_batch, False)), args.repeat)
    compare(f"LIME (slic, 50 segments, {args.samples} samples)", n, lime_contenders(
        model, x, t, args.samples, args.max_batch, passes(fwd_module, n * args.samples, fwd_batch, False)), args.repeat)


if __name__ == "__main__":
    main()
