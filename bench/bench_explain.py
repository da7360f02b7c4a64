"""End-to-end throughput of `xai explain -m saliency` against a bare in-memory torch loop.

Same model (timm resnet18, random init), same batch size, same gradients. The bare loop has
every input already decoded and preprocessed in memory and writes nothing; xai reads JPEGs,
decodes, preprocesses, explains, and writes a PNG and an NPZ per image. The ratio shows how
well decoding and writing overlap with compute.

    python bench/bench_explain.py [--images 256] [--batch-size 16] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_images(folder: Path, n: int, size: int = 256) -> None:
    """n smooth random JPEG photos-like images (decoding cost of a real photo of that size)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        small = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.BICUBIC).save(folder / f"{i:04d}.jpg", quality=90)


def bare_loop(model: torch.nn.Module, n: int, batch: int, size: int = 224) -> float:
    """Images/s of the same saliency computation on inputs already in memory, fed channels-last as
    xai's Model feeds them on CPUs (the faster layout for oneDNN convolutions)."""
    x_all = torch.randn(n, 3, size, size)
    start = time.perf_counter()
    for i in range(0, n, batch):
        x = x_all[i : i + batch].contiguous(memory_format=torch.channels_last).requires_grad_(True)
        logits = model(x)
        target = logits.argmax(1)
        (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), x)
        grad.numpy()
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import timm

    import xaicli

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        make_images(folder, args.images)
        model = timm.create_model("resnet18", pretrained=False).eval()
        bare_loop(model, 2 * args.batch_size, args.batch_size)  # warm-up
        bare = bare_loop(model, args.images, args.batch_size)
        result = xaicli.explain("timm:resnet18", folder, methods=["saliency"], output=Path(tmp) / "out",
                                batch_size=args.batch_size)
        ours = result.manifest["throughput"]
        report = {
            "images": args.images, "batch_size": args.batch_size, "threads": args.threads,
            "bare_loop_images_per_s": round(bare, 2), "xai_explain_images_per_s": ours,
            "ratio": round(ours / bare, 3), "xai_timings_s": result.manifest["timings"],
        }
    print(json.dumps(report, indent=2))
    print(f"xai explain / bare loop = {report['ratio']:.2f} (target >= 0.8)")


if __name__ == "__main__":
    main()
