"""Parity of the graph with the source model for torchvision/timm architectures (random init,
64×64 inputs) in all three formats: eager (torch.export), TorchScript (jit.trace; saved and
loaded files are covered by test_graph's digits model) and ONNX (torch.onnx, TorchScript-based or dynamo exporter), each at batch 1 and 3
from one graph, with input gradients through the graph equal to eager ones (for ONNX: of the
eager model with BatchNorm folded into its convolutions, as the exporters do; folding alone
moves ReLU decisions near 0 and changes resnet50's input gradient by 1.5 % in L2).

Each model is exported to ONNX by one exporter by default; the other exporter is `slow`."""
from __future__ import annotations

import functools
import io

import onnx
import pytest
import timm
import torch
import torchvision
from torch.fx.experimental.optimization import fuse

from xaicli.graph import from_module, from_onnx, from_torchscript
from test_graph import assert_contract, rel_err

SIZE = 64
DYNAMO = {False: 17, True: 18}  # exporter -> opset
MODELS = {  # name -> (factory, ONNX exporter used by default: dynamo?)
    "resnet18": (lambda: torchvision.models.resnet18(weights=None), False),
    "resnet50": (lambda: torchvision.models.resnet50(weights=None), True),
    "vgg16": (lambda: torchvision.models.vgg16(weights=None), True),  # 2×2 -> 7×7 adaptive pool: dynamo only
    "vgg16_bn": (lambda: torchvision.models.vgg16_bn(weights=None), True),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(weights=None), False),
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(weights=None), False),
    "densenet121": (lambda: torchvision.models.densenet121(weights=None), False),
    "convnext_tiny": (lambda: timm.create_model("convnext_tiny", pretrained=False), True),
    "vit_tiny_patch16_224": (lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=SIZE), False),
}
NO_TORCHSCRIPT_EXPORT = {"vgg16", "vgg16_bn"}  # TorchScript ONNX exporter: adaptive pool sizes must divide


@functools.lru_cache(maxsize=1)
def source(name: str) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(model, x [3,3,64,64], logits, input gradient of the top logits) for one model at a time."""
    torch.manual_seed(0)
    module = MODELS[name][0]().eval()
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    logits, grad = logits_and_gradient(module, x)
    return module, x, logits, grad


def logits_and_gradient(f, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    logits = f(x)
    (grad,) = torch.autograd.grad(logits.gather(1, torch.tensor([[0], [1], [2]])).sum(), x)
    return logits.detach(), grad


def bn_folded(module: torch.nn.Module) -> torch.nn.Module:
    """A copy with conv->BatchNorm pairs fused (fx), the module itself where fx cannot trace it."""
    try:
        return fuse(module)
    except Exception:
        return module


def to_onnx(module: torch.nn.Module, x: torch.Tensor, dynamo: bool) -> onnx.ModelProto:
    buffer = io.BytesIO()
    if dynamo:
        torch.onnx.export(module, (x,), buffer, dynamo=True, opset_version=DYNAMO[True], verbose=False,
                          dynamic_shapes=({0: torch.export.Dim("batch")},))
    else:
        torch.onnx.export(module, (x,), buffer, dynamo=False, opset_version=DYNAMO[False], input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}})
    return onnx.load_from_string(buffer.getvalue())


def build(name: str, fmt: str) -> torch.fx.GraphModule:
    module, x, _, _ = source(name)
    if fmt == "eager":
        return from_module(module, x)
    if fmt == "torchscript":
        return from_torchscript(torch.jit.trace(module, x, check_trace=False), x)
    return from_onnx(to_onnx(module, x, dynamo=fmt == "onnx-dynamo"))


def check(name: str, fmt: str) -> None:
    gm = build(name, fmt)
    assert_contract(gm)
    module, x, logits, grad = source(name)
    with torch.no_grad():
        assert rel_err(gm(x[:1]), logits[:1]) <= 1e-4, "batch 1"
    got_logits, got_grad = logits_and_gradient(gm, x)
    assert rel_err(got_logits, logits) <= 1e-4, "batch 3"
    if fmt.startswith("onnx"):  # the exporters fold BatchNorm into convolutions, so do we
        _, grad = logits_and_gradient(bn_folded(module), x)
    assert rel_err(got_grad, grad) <= 1e-3, "input gradient"


def default_cases() -> list[tuple[str, str]]:
    cases = []
    for name, (_, dynamo) in MODELS.items():
        cases += [(name, "eager"), (name, "torchscript"), (name, "onnx-dynamo" if dynamo else "onnx-torchscript")]
    return cases


def other_exporter_cases() -> list[tuple[str, str]]:
    return [(name, "onnx-torchscript" if dynamo else "onnx-dynamo")
            for name, (_, dynamo) in MODELS.items() if dynamo is False or name not in NO_TORCHSCRIPT_EXPORT]


@pytest.mark.parametrize(("name", "fmt"), default_cases())
def test_graph_matches_model(name, fmt):
    check(name, fmt)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "fmt"), other_exporter_cases())
def test_graph_matches_model_other_onnx_exporter(name, fmt):
    check(name, fmt)


def test_resnet_layer_names_agree_across_formats():
    """The names a user types (`layer4.1.conv2`) exist in the eager, TorchScript and ONNX graphs."""
    names = {fmt: {n.meta["layer"] for n in build("resnet18", fmt).graph.nodes if "layer" in n.meta}
             for fmt in ("eager", "torchscript", "onnx-torchscript", "onnx-dynamo")}
    for fmt, found in names.items():
        assert {"conv1", "layer1.0.conv1", "layer4.1.conv2", "layer2.0.downsample.0", "layer4.1.add", "fc"} <= found, fmt
