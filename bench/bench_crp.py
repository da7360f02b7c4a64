"""CRP speed: K = 8 concepts per input in one batched call vs K separate passes vs zennit-crp, and the
concept atlas over a dataset vs one LRP run over it, printing ratios.

    .venv/bin/python bench/bench_crp.py                         # vgg16 b2 and resnet18 b4 at 224, 2 threads
    .venv/bin/python bench/bench_crp.py --models resnet18 --size 112 --atlas-images 1000
    .venv/bin/python bench/bench_crp.py --skip-atlas

CRP part: random-init torchvision models (seeded as in tests/test_lrp_parity), real photos, EpsilonPlusFlat,
the same 8 channels of a deep layer for every input (features.28, layer4.1.conv1: most of the network
lies below them, the costly case for CRP), median of interleaved rounds.
- `xai crp`: our ConditionalLRP, one call for the batch and the K concepts;
- `K passes`: our engine once per concept (a forward and a full backward each: K LRP passes);
- `zennit-crp`: CondAttribution (zennit-crp 0.6.0) with the batch repeated K times and one condition per
  row — its batched use. zennit-crp pins zennit<=0.4.6, so it runs in its own environment on the same
  torch: point ZENNIT_CRP_PYTHON at a python with zennit-crp and zennit 0.4.6 installed and .venv's
  site-packages on its path (default /tmp/crpenv/bin/python; skipped when absent). Its heatmaps are
  compared with ours too (max relative difference).

Atlas part: N synthetic 64×64 PNG images (seeded noise and shapes), resnet18 as TorchScript at 64×64;
`xai concepts` (the concept_scores run + the atlas; with reference grids too with --references) against
an `xai explain -m lrp` run writing NPZ arrays over the same files, batch 16, one process, median of
interleaved rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_lrp_parity import network, photos  # noqa: E402

from xaicli.concepts.conditional import ConditionalLRP  # noqa: E402
from xaicli.graph import from_module  # noqa: E402
from xaicli.lrp import composite  # noqa: E402

SETUPS = {"vgg16": (2, "features.28"), "resnet18": (4, "layer4.1.conv1")}
K = 8
ZENNIT_CRP = os.environ.get("ZENNIT_CRP_PYTHON", "/tmp/crpenv/bin/python")

_ZENNIT_CRP_RUNNER = r'''
import json, statistics, sys, time
sys.path.insert(0, sys.argv[1])
try:  # xaicli (imported by the test helpers) as installed in .venv, editable
    import __editable___xaicli_0_1_0_finder as finder
    finder.install()
except ImportError:
    pass
import torch
from crp.attribution import CondAttribution
from zennit.composites import EpsilonPlusFlat
from zennit.torchvision import ResNetCanonizer
from test_lrp_parity import network, photos
name, size, batch, layer, k, repeats, threads, out = sys.argv[2:10]
size, batch, k, repeats, threads = int(size), int(batch), int(k), int(repeats), int(threads)
torch.set_num_threads(threads)
net, x = network(name), photos(size)
x = torch.cat([x] * (batch // len(x) + 1))[:batch]
attr = CondAttribution(net)
canonizers = [ResNetCanonizer()] if name.startswith("resnet") else []
conditions = [{"y": [3], layer: [c]} for _ in range(batch) for c in range(k)]
data = x.repeat_interleave(k, 0)
def run():
    return attr(data.clone().requires_grad_(True), conditions, EpsilonPlusFlat(canonizers=canonizers)).heatmap
heat = run()
times = []
for _ in range(repeats):
    t = time.perf_counter(); run(); times.append(time.perf_counter() - t)
torch.save(heat.reshape(batch, k, *heat.shape[1:]), out)
print(json.dumps({"seconds": statistics.median(times)}))
'''


def inputs(size: int, batch: int) -> torch.Tensor:
    x = photos(size)
    return torch.cat([x] * (batch // len(x) + 1))[:batch]


def crp_candidates(name: str, size: int, batch: int, layer: str) -> tuple[dict[str, Callable], torch.Tensor]:
    net, x = network(name), inputs(size, batch)
    engine = ConditionalLRP(from_module(net, x), composite("EpsilonPlusFlat"), layer)
    target = torch.full((batch,), 3)
    channels = torch.arange(K).expand(batch, -1)
    single = [torch.full((batch, 1), c) for c in range(K)]
    batched = lambda: engine(x, target, lambda r: channels).relevance  # noqa: E731
    separate = lambda: torch.cat([engine(x, target, lambda r, s=s: s).relevance for s in single], 1)  # noqa: E731
    return {"xai crp": batched, "K passes": separate}, batched()


def measure(runs: dict[str, Callable], repeats: int) -> dict[str, float]:
    """Median seconds per call over interleaved rounds (after one warm-up round)."""
    times: dict[str, list[float]] = {key: [] for key in runs}
    for round_ in range(repeats + 1):
        for key, run in runs.items():
            start = time.perf_counter()
            run()
            if round_:
                times[key].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in times.items()}


def zennit_crp(name: str, size: int, batch: int, layer: str, repeats: int, threads: int
               ) -> tuple[float, torch.Tensor] | None:
    if not Path(ZENNIT_CRP).exists():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        script, out = Path(tmp) / "run.py", Path(tmp) / "heat.pt"
        script.write_text(_ZENNIT_CRP_RUNNER)
        done = subprocess.run([ZENNIT_CRP, str(script), str(ROOT / "tests"), name, str(size), str(batch), layer, str(K),
                               str(repeats), str(threads), str(out)], capture_output=True, text=True)
        if done.returncode != 0:
            print(f"  zennit-crp failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
            return None
        return json.loads(done.stdout.strip().splitlines()[-1])["seconds"], torch.load(out)


def bench_crp(args: argparse.Namespace) -> None:
    for name in args.models:
        batch, layer = SETUPS[name]
        runs, ours = crp_candidates(name, args.size, batch, layer)
        seconds = measure(runs, args.repeats)
        line = (f"{name} b{batch} {args.size}px layer {layer}, K={K}: xai crp {seconds['xai crp']:.2f} s, "
                f"K passes {seconds['K passes']:.2f} s -> {seconds['K passes'] / seconds['xai crp']:.2f}x")
        theirs = zennit_crp(name, args.size, batch, layer, args.repeats, args.threads)
        if theirs is None:
            line += "; zennit-crp: not available (ZENNIT_CRP_PYTHON)"
        else:
            heat = ours.sum(2)
            error = ((heat - theirs[1]).flatten(2).abs().amax(2) / theirs[1].flatten(2).abs().amax(2).clamp_min(1e-30))
            line += (f"; zennit-crp {theirs[0]:.2f} s -> {theirs[0] / seconds['xai crp']:.2f}x "
                     f"(heatmaps differ by <= {error.max().item():.1e} relative; ours NHWC, theirs NCHW: max-pool ties)")
        print(line, flush=True)


def synthetic_images(folder: Path, count: int, size: int = 64) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(count):
        image = rng.normal(0.5, 0.15, (size, size, 3))
        for _ in range(3):
            cy, cx, r = rng.uniform(0, size, 2).tolist() + [rng.uniform(4, 16)]
            image[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 1, 3)
        path = folder / f"{i % 10}" / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(image * 255, 0, 255).astype(np.uint8)).save(path)


def bench_atlas(args: argparse.Namespace) -> None:
    import xaicli
    from xaicli.concepts.api import concepts

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthetic_images(root / "images", args.atlas_images)
        torch.manual_seed(0)
        net = torchvision.models.resnet18(weights=None).eval()
        spec = {"size": [64, 64], "channels": 3, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                "interpolation": "bilinear", "crop_pct": 1.0}
        model = root / "resnet18.pt"
        torch.jit.save(torch.jit.trace(net, torch.zeros(2, 3, 64, 64)), str(model), _extra_files={"xai.json": json.dumps(spec)})
        common = {"batch_size": 16, "device": "cpu"}
        runs: dict[str, Callable] = {
            "lrp run": lambda out: xaicli.explain(model, root / "images", methods=["lrp"], output=out,
                                                  writers={"npz": {}}, **common),
            "atlas": lambda out: concepts(model, [root / "images"], layers=["layer4"], output=out, top=8,
                                          references=False, **common),
        }
        if args.references:
            runs["atlas + references"] = lambda out: concepts(model, [root / "images"], layers=["layer4"], output=out,
                                                              top=8, references=True, **common)
        times: dict[str, list[float]] = {key: [] for key in runs}
        for round_ in range(args.repeats):  # interleaved, each run into a fresh folder
            for key, run in runs.items():
                start = time.perf_counter()
                result = run(root / f"{key.replace(' ', '_').replace('+', 'and')}_{round_}")
                times[key].append(time.perf_counter() - start)
                assert result.exit_code == 0
        median = {key: statistics.median(values) for key, values in times.items()}
        line = (f"resnet18 64px, {args.atlas_images} images, batch 16, median of {args.repeats}: lrp run "
                f"{median['lrp run']:.1f} s, atlas {median['atlas']:.1f} s -> {median['atlas'] / median['lrp run']:.2f}x")
        if args.references:
            line += (f", with reference grids (512 channels x 8) {median['atlas + references']:.1f} s -> "
                     f"{median['atlas + references'] / median['lrp run']:.2f}x")
        print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--atlas-images", type=int, default=1000)
    parser.add_argument("--skip-atlas", action="store_true")
    parser.add_argument("--skip-crp", action="store_true")
    parser.add_argument("--references", action="store_true", help="also time the atlas with reference grids")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats} rounds", flush=True)
    if not args.skip_crp:
        bench_crp(args)
    if not args.skip_atlas:
        bench_atlas(args)


if __name__ == "__main__":
    main()
