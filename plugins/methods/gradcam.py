"""Grad-CAM (Selvaraju et al. 2017) and Grad-CAM++ (Chattopadhay et al. 2018) at any node of the
model's torch graph, so they work for eager, TorchScript and ONNX models alike (no module hooks).

An fx Interpreter runs the model's graph (`model.graph()`, see xaicli.graph), hands out the
activation of the chosen node as a leaf tensor and continues from it, so one backward gives
∂f_t/∂A (and nothing upstream of the layer is differentiated). The activation and its gradient
are then viewed as A [B,K,h,w] in the layer's own layout (xaicli.graph.feature_maps): a [B,C,H,W]
map as is, a [B,H,W,C] map (swin, convnext blocks) transposed, a vision transformer's token grid
[B,e+h·w,C] without its e class/distillation tokens, reshaped to the patch grid.
- gradcam: ReLU(Σ_k α_k A_k), α_k the spatial mean of ∂f_t/∂A_k — captum's LayerGradCam with
  relu_attributions=True (the paper's ReLU; captum's default False keeps negative evidence).
- gradcam_plus_plus: α_k = Σ_ij a_kij·ReLU(g_kij) with a_kij = g²_kij / (2g²_kij + g³_kij·Σ_ab A_kab),
  g = ∂f_t/∂A: the paper's closed form (exponential of the score), a = 0 where g = 0.
The map is upsampled to the input with `interpolation` (bilinear by default, as in the paper;
captum's LayerAttribution.interpolate defaults to nearest) and broadcast to the C channels.
`layer` is a layer name of the graph (`layer4.1.relu`), a node name, or a module path (`layer4`:
its output), resolved by xaicli.graph.find_node. The default is the last feature map with a real
grid (h·w > 1, never a pooled [B,C,1,1]/[B,1,1,C] tensor or an attention matrix) that the
output's gradient reaches at two or more positions: the last stage's output of a CNN, swin's final
norm, a ViT's last `norm1` (after its last attention only the class token matters). The layer
chosen and its role (nchw/nhwc/tokens) are recorded in run.json (`resolved`); a model without
such a map fails in `check`, before any input, listing the candidates.
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
from xaicli.graph.batch import in_rows
from xaicli.graph.feature_maps import FeatureMap, default_feature_map, feature_map_of
from xaicli.model import Model, gather_target
from xaicli.rng import BatchRNG


def input_shape(model: Model, graph: fx.GraphModule) -> tuple[int, int, int]:
    """(C, H, W) of the graph's input: its placeholder's example, else the model's input spec."""
    placeholder = next(n for n in graph.graph.nodes if n.op == "placeholder")
    shape = getattr(placeholder.meta.get("val"), "shape", None)
    if shape is not None and len(shape) == 4 and all(isinstance(d, int) for d in shape[1:]):
        return int(shape[1]), int(shape[2]), int(shape[3])
    return model.spec.channels, int(model.spec.size[0]), int(model.spec.size[1])


def resolve_layer(model: Model, layer: str | None) -> FeatureMap:
    """The feature map Grad-CAM reads: the named `layer`, or the default (module docstring)."""
    graph = model.graph()
    shape = input_shape(model, graph)
    if layer is None:
        return default_feature_map(graph, shape)
    return feature_map_of(graph, find_node(graph, layer), shape, layer)


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
    model: Model, x: torch.Tensor, target: torch.Tensor, layer: str | None, method: str = "gradcam"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, ∂f_t/∂A) at the chosen layer for a batch, both as [B,K,h,w] views of the layer's output."""
    try:
        feature_map = resolve_layer(model, layer)
    except UsageError as exc:
        raise UsageError(f"{method} layer: {exc}") from None
    graph = model.graph()

    def run(x: torch.Tensor, target: torch.Tensor, live: int) -> tuple[torch.Tensor, torch.Tensor]:
        capture = _Capture(graph, feature_map.node)
        with torch.enable_grad():
            out = capture.run(x.detach())
            out = out[0] if isinstance(out, (tuple, list)) else out
            (grad,) = torch.autograd.grad(gather_target(out, target).sum(), capture.activation)
        return feature_map.to_nchw(capture.activation.detach()), feature_map.to_nchw(grad)

    return in_rows(graph, run, x, target.to(x.device))


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
        activation, grad = layer_gradient(model, x[start:stop], target[start:stop], layer, key)
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


def check(model: Model, params: dict[str, Any]) -> dict[str, Any]:
    """UsageError before any input runs when `layer` is not a layer of the model (with suggestions)
    or not a feature map, or when no default can be chosen (listing candidates); else what run.json
    records: the layer, its role (nchw/nhwc/tokens), grid and extra tokens."""
    try:
        return resolve_layer(model, params.get("layer")).record()
    except UsageError as exc:
        raise UsageError(f"gradcam layer: {exc}") from None


PARAMS = (
    Param("layer", str, None, "graph node or module path whose activation is used: a [B,C,H,W] map, a [B,H,W,C] map "
          "or a vision transformer's token grid [B,N,C] (class/distillation tokens dropped). Default: the last "
          "map with an h×w > 1 grid that the output's gradient reaches — a CNN's last stage, swin's final norm, "
          "a ViT's last block norm1 — never a pooled tensor or attention matrix; run.json names it (`resolved`)"),
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
