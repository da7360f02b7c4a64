"""Graph conversion cost and graph forward speed against the source model.

    python bench/bench_graph.py [resnet18 vit_tiny_patch16_224 ...] [--size 64] [--batch 8]

For each model and format: seconds to build the graph, the relative logit error, and the
forward time of the graph divided by the source's (eager module, TorchScript module or
onnxruntime session).
"""
from __future__ import annotations

import argparse
import io
import time
import warnings

import onnx
import onnxruntime as ort
import timm
import torch
import torchvision

from xaicli.graph import from_module, from_onnx, from_torchscript


def create(name: str, size: int) -> torch.nn.Module:
    if hasattr(torchvision.models, name):
        return getattr(torchvision.models, name)(weights=None).eval()
    extra = {"img_size": size} if name.startswith("vit") else {}
    return timm.create_model(name, pretrained=False, **extra).eval()


def seconds(f, x: torch.Tensor, repeat: int = 5) -> float:
    with torch.no_grad():
        f(x)
        start = time.perf_counter()
        for _ in range(repeat):
            f(x)
    return (time.perf_counter() - start) / repeat


def sources(module: torch.nn.Module, x: torch.Tensor) -> dict[str, tuple]:
    """format -> (callable source model, builder of its graph)."""
    traced = torch.jit.trace(module, x, check_trace=False)
    buffer = io.BytesIO()
    torch.onnx.export(module, (x,), buffer, dynamo=False, opset_version=17, input_names=["x"], dynamic_axes={"x": {0: "b"}})
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])

    def run_ort(batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"x": batch.numpy()})[0])

    return {
        "eager": (module, lambda: from_module(module, x)),
        "torchscript": (traced, lambda: from_torchscript(traced, x)),
        "onnx": (run_ort, lambda: from_onnx(onnx.load_from_string(buffer.getvalue()))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=["resnet18", "mobilenet_v3_small", "vit_tiny_patch16_224"])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    print(f"{'model':24} {'format':12} {'build s':>8} {'rel err':>9} {'graph/source time':>18}")
    for name in args.models:
        module = create(name, args.size)
        x = torch.randn(args.batch, 3, args.size, args.size)
        for fmt, (model, build) in sources(module, x).items():
            start = time.perf_counter()
            gm = build()
            built = time.perf_counter() - start
            with torch.no_grad():
                want = model(x)
                error = ((gm(x) - want).abs().max() / want.abs().max()).item()
            ratio = seconds(gm, x) / seconds(model, x)
            print(f"{name:24} {fmt:12} {built:8.2f} {error:9.1e} {ratio:18.2f}")


if __name__ == "__main__":
    main()
