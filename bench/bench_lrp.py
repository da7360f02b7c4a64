"""LRP speed: images/s of xai's LRP vs Zennit 0.5.1 (same composite, model, batch, threads) and vs a
plain input gradient (xai's saliency path), in one run, printing ratios.

    .venv/bin/python bench/bench_lrp.py                       # resnet18 b8 and vgg16 b4 at 224, 2 threads
    .venv/bin/python bench/bench_lrp.py --models resnet18 --repeats 3

Random-init torchvision models, real photos (skimage.data) as input. Rounds are interleaved (every
candidate once per round) and the median of the rounds is reported, so load from other processes
hits all candidates alike. xai's LRP engine is prepared once (as the plugin caches it); Zennit
registers its composite per call, as its attributor does.

"bound" replays, as plain torch calls, just the convolutions and matrix products xai's engine ran for a
composite (recorded once at the dispatcher): what any implementation of the composite's rules must
compute. z⁺, γ and α-β denominators need a second forward convolution per layer (with w⁺), and
α-β (and γ on outputs of both signs, e.g. before a residual sum) a second backward one, so these
composites cannot reach a plain gradient's speed: `bound/grad` is the ceiling, `xai/bound` how
close the engine gets to it.

The plain gradient is xai's saliency path (`input_gradient` through `Model`, which feeds NHWC on CPUs,
as the LRP engine runs its convolutions), so the ratio compares the algorithms alone.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import numpy as np
import torch
import torchvision
from skimage import data
from skimage.transform import resize
from torch.utils._python_dispatch import TorchDispatchMode

from xaicli.graph import from_module
from xaicli.lrp import LRP, Settings, composite
from xaicli.model import InputSpec, Model, input_gradient

aten = torch.ops.aten
SETUPS = {"resnet18": 8, "vgg16": 4}
COMPOSITES = ["EpsilonPlusFlat", "EpsilonGammaBox", "EpsilonAlpha2Beta1"]


def photos(batch: int, size: int) -> torch.Tensor:
    images = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    x = torch.from_numpy(np.stack([resize(images[i % 4], (size, size), anti_aliasing=True) for i in range(batch)]))
    x = x.permute(0, 3, 1, 2).float()
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def zennit_call(net: torch.nn.Module, name: str, comp: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    from zennit import composites
    from zennit.attribution import Gradient
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer

    canonizers = [ResNetCanonizer()] if name.startswith("resnet") else [VGGCanonizer()]
    kwargs = {"low": -3.0, "high": 3.0} if comp == "EpsilonGammaBox" else {}

    def run(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with Gradient(net, getattr(composites, comp)(canonizers=canonizers, **kwargs)) as attributor:
            return attributor(x, attr_output=lambda out: torch.eye(out.shape[1])[target] * out)[1]

    return run


class Recorder(TorchDispatchMode):
    """Records the convolutions and matrix products run under it, to replay them alone."""

    OPS = {aten.convolution.default, aten.convolution_backward.default, aten.addmm.default, aten.mm.default,
           aten.bmm.default}

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func in self.OPS:
            self.calls.append((func, args, kwargs or {}))
        return func(*args, **(kwargs or {}))

    def replay(self) -> None:
        for func, args, kwargs in self.calls:
            func(*args, **kwargs)


def linear_work(engine: LRP, x: torch.Tensor, target: torch.Tensor) -> Callable:
    """A candidate replaying the convolutions and matrix products of one engine call."""
    with Recorder() as recorder:
        engine(x, target)
    return lambda x, t: recorder.replay()


def candidates(name: str, x: torch.Tensor, comps: list[str]) -> dict[str, Callable]:
    net = getattr(torchvision.models, name)(weights=None).eval()
    model = Model(name, InputSpec(), torch.device("cpu"), module=net)
    graph = from_module(net, x)
    runs: dict[str, Callable] = {"gradient": lambda x, t: input_gradient(model, x, t)[0]}
    for comp in comps:
        engine = LRP(graph, composite(comp, Settings(low=-3.0, high=3.0)))
        runs[f"xai {comp}"] = lambda x, t, engine=engine: engine(x, t).relevance
        runs[f"zennit {comp}"] = zennit_call(net, name, comp)
        runs[f"bound {comp}"] = linear_work(engine, x, torch.full((len(x),), 3))
    return runs


def measure(runs: dict[str, Callable], x: torch.Tensor, target: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds per call over interleaved rounds (after one warm-up round)."""
    times: dict[str, list[float]] = {key: [] for key in runs}
    for round_ in range(repeats + 1):
        for key, run in runs.items():
            start = time.perf_counter()
            run(x, target)
            if round_:
                times[key].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in times.items()}


def report(name: str, batch: int, seconds: dict[str, float], comps: list[str]) -> None:
    rate = {key: batch / s for key, s in seconds.items()}
    grad = rate["gradient"]
    print(f"\n{name}, batch {batch}: plain gradient {grad:.2f} images/s")
    print(f"{'composite':20s} {'xai img/s':>10s} {'zennit img/s':>13s} {'xai/grad':>9s} {'zennit/grad':>12s} "
          f"{'xai/zennit':>11s} {'bound/grad':>11s} {'xai/bound':>10s}")
    for comp in comps:
        ours, theirs, bound = rate[f"xai {comp}"], rate[f"zennit {comp}"], rate[f"bound {comp}"]
        print(f"{comp:20s} {ours:10.2f} {theirs:13.2f} {ours / grad:9.2f} {theirs / grad:12.2f} {ours / theirs:11.2f} "
              f"{bound / grad:11.2f} {ours / bound:10.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--composites", nargs="+", default=COMPOSITES)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.size}x{args.size}, "
          f"median of {args.repeats} rounds")
    for name in args.models:
        batch = SETUPS[name]
        x, target = photos(batch, args.size), torch.full((batch,), 3)
        seconds = measure(candidates(name, x, args.composites), x, target, args.repeats)
        report(name, batch, seconds, args.composites)


if __name__ == "__main__":
    main()
