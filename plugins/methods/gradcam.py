"""Grad-CAM (Selvaraju et al. 2017) and Grad-CAM++ (Chattopadhay et al. 2018) at any node of the
model's torch graph, so they work for eager, TorchScript and ONNX models alike (no module hooks).

An fx Interpreter runs the model's graph (`model.graph()`, see xaicli.graph), hands out the
activation A [B,K,h,w] of the chosen node as a leaf tensor and continues from it, so one backward
gives ∂f_t/∂A (and nothing upstream of the layer is differentiated).
- gradcam: ReLU(Σ_k α_k A_k), α_k the spatial mean of ∂f_t/∂A_k — captum's LayerGradCam with
  relu_attributions=True (the paper's ReLU; captum's default False keeps negative evidence).
- gradcam_plus_plus: α_k = Σ_ij a_kij·ReLU(g_kij) with a_kij = g²_kij / (2g²_kij + g³_kij·Σ_ab A_kab),
  g = ∂f_t/∂A: the paper's closed form (exponential of the score), a = 0 where g = 0.
The map is upsampled to the input with `interpolation` (bilinear by default, as in the paper;
captum's LayerAttribution.interpolate defaults to nearest) and broadcast to the C channels.
`layer` is a layer name of the graph (`layer4.1.relu`), a node name, or a module path (`layer4`:
its output), resolved by xaicli.graph.find_node; the default is the last node with a 4-D output
larger than 1×1, i.e. the last spatial feature map before global pooling.
Extras: `cam` [B,h,w], the map before upsampling.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx

from xaicli import Attribution, Method, Param, hookimpl
from xaicli.chunking import AUTO, MaxBatch, chunked, max_batch_param
from xaicli.errors import UsageError
from xaicli.graph import find_node
from xaicli.model import Model, gather_target
from xaicli.rng import BatchRNG


def default_layer(graph: fx.GraphModule) -> fx.Node:
    """The last node with a 4-D output larger than 1×1: the last spatial map before global pooling."""
    spatial = [n for n in graph.graph.nodes if n.op == "call_function" and _spatial(n.meta.get("val"))]
    if not spatial:
        raise UsageError("gradcam: the model has no spatial (4-D) feature map; name a `layer`")
    return spatial[-1]


def _spatial(value: Any) -> bool:
    shape = getattr(value, "shape", None)
    return shape is not None and len(shape) == 4 and shape[2] * shape[3] > 1


class _Capture(fx.Interpreter):
    """Runs the graph, replacing `node`'s output with a leaf that requires grad (kept in `activation`)."""

    def __init__(self, graph: fx.GraphModule, node: fx.Node):
        super().__init__(graph)
        self.node = node
        self.activation: torch.Tensor | None = None

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if n is not self.node:
            return value
        self.activation = value.detach().requires_grad_(True)
        return self.activation  # the graph is functional: no later op writes into it


def layer_gradient(
    model: Model, x: torch.Tensor, target: torch.Tensor, layer: str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, ∂f_t/∂A) at the chosen node for a batch."""
    graph = model.graph()
    capture = _Capture(graph, default_layer(graph) if layer is None else find_node(graph, layer))
    with torch.enable_grad():
        out = capture.run(x.detach())
        out = out[0] if isinstance(out, (tuple, list)) else out
        (grad,) = torch.autograd.grad(gather_target(out, target).sum(), capture.activation)
    return capture.activation.detach(), grad


def _upsample(cam: torch.Tensor, x: torch.Tensor, interpolation: str) -> Attribution:
    B, C, H, W = x.shape
    align = False if interpolation == "bilinear" else None
    up = F.interpolate(cam, size=(H, W), mode=interpolation, align_corners=align)
    return Attribution(up.expand(B, C, H, W).contiguous(), {"cam": cam[:, 0]})


def _chunked(
    model: Model, x: torch.Tensor, target: torch.Tensor, layer: str | None, max_batch: MaxBatch,
    weigh: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], key: str,
) -> torch.Tensor:
    """ReLU(Σ_k weigh(A, g)_k · A_k) [B,1,h,w], computed in chunks of at most max_batch inputs."""
    target = target.to(x.device)

    def cam(start: int, stop: int) -> torch.Tensor:
        activation, grad = layer_gradient(model, x[start:stop], target[start:stop], layer)
        if activation.dim() != 4:
            raise UsageError(f"gradcam: layer {layer!r} has a {activation.dim()}-D output; it needs a 4-D feature map")
        return F.relu((weigh(activation, grad) * activation).sum(1, keepdim=True))

    return torch.cat(chunked(cam, len(x), max_batch, key=key, device=x.device))


def _mean_gradient(activation: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return grad.mean((2, 3), keepdim=True)


def _plus_plus_weights(activation: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    g2, g3 = grad.pow(2), grad.pow(3)
    denominator = 2 * g2 + activation.sum((2, 3), keepdim=True) * g3
    a = g2 / torch.where(denominator != 0, denominator, torch.ones_like(denominator))
    return (a * F.relu(grad)).sum((2, 3), keepdim=True)


def gradcam(
    model: Model, x: torch.Tensor, target: torch.Tensor, rng: BatchRNG, layer: str | None = None,
    interpolation: str = "bilinear", max_batch: MaxBatch = AUTO,
) -> Attribution:
    """Channels weighted by their mean gradient."""
    return _upsample(_chunked(model, x, target, layer, max_batch, _mean_gradient, "gradcam"), x, interpolation)


def gradcam_plus_plus(
    model: Model, x: torch.Tensor, target: torch.Tensor, rng: BatchRNG, layer: str | None = None,
    interpolation: str = "bilinear", max_batch: MaxBatch = AUTO,
) -> Attribution:
    """Channels weighted by Grad-CAM++'s positive-gradient weights."""
    return _upsample(_chunked(model, x, target, layer, max_batch, _plus_plus_weights, "gradcam_plus_plus"), x,
                     interpolation)


def check(model: Model, params: dict[str, Any]) -> None:
    """UsageError before any input runs when `layer` is not a layer of the model (with suggestions)
    or not a 4-D feature map."""
    graph = model.graph()
    layer = params.get("layer")
    try:
        node = default_layer(graph) if layer is None else find_node(graph, layer)
    except UsageError as exc:
        raise UsageError(f"gradcam layer: {exc}") from None
    shape = getattr(node.meta.get("val"), "shape", None)
    if shape is not None and len(shape) != 4:
        raise UsageError(f"gradcam layer: {layer!r} has a {len(shape)}-D output; it needs a 4-D feature map")


PARAMS = (
    Param("layer", str, None, "graph node or module path whose activation is used (default: last spatial feature map)"),
    Param("interpolation", str, "bilinear", "upsampling of the map to the input", choices=("bilinear", "nearest")),
    max_batch_param("inputs per forward/backward pass"),
)


@hookimpl
def xai_methods() -> list[Method]:
    return [
        Method("gradcam", "gradient-weighted class activation map (Selvaraju et al. 2017)", gradcam, PARAMS,
               needs="graph", check=check),
        Method("gradcam_plus_plus", "Grad-CAM++ weighting of the activation map (Chattopadhay et al. 2018)",
               gradcam_plus_plus, PARAMS, needs="graph", check=check),
    ]
