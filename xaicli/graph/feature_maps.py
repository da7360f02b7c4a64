"""Spatial feature maps of a graph, in the model's own layout: which nodes Grad-CAM-like methods
may read, how to view them as [B,C,h,w], and the default one.

A node is a feature map when its output, on a probe input of the model's size, has the input's
batch and one of three layouts whose grid (h, w) is the input's size divided by a whole stride
(floor or ceiling), with h·w > 1:
    nchw    [B,C,h,w]                        (CNNs)
    nhwc    [B,h,w,C]                        (swin stages, convnext blocks): viewed as permute(0,3,1,2)
    tokens  [B,e+h·w,C], e ≤ 8 leading class/distillation/register tokens (vision transformers):
            the e tokens are dropped, the rest reshaped to [B,C,h,w]
Pooled tensors ([B,C,1,1], [B,1,1,C]) have no grid. Attention internals are never feature maps:
softmax, products of two graph tensors (q·kᵀ, attn·v), what lies between them (scale, bias, mask),
the head-split q/k/v (and the projection producing them) and the merged heads before the output
projection. Where a 4-D shape fits both nchw and nhwc, the op's provenance decides (convolutions
and pools give nchw, permute(0,2,3,1) flips, layer norms over the last dim of 4-D give nhwc).

The default map (`default_feature_map`) is the last feature map in execution order whose
gradient of the output (a fixed random mix of the logits) reaches at least two grid positions:
this skips a vision transformer's tokens after its last attention, where only the class token
still matters (there the default is the last block's input norm, `blocks.N.norm1`).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import fx

from ..errors import UsageError
from ..lrp.nodes import packet
from .batch import fixed_batch

ROLES = ("nchw", "nhwc", "tokens")
MAX_EXTRA_TOKENS = 8
PROBE_BATCH = 2
_MATMUL = {"matmul", "bmm", "baddbmm", "einsum"}
_SOFTMAX = {"softmax", "_softmax", "log_softmax"}
_SHAPE = {"view", "_unsafe_view", "reshape", "reshape_as", "view_as", "flatten", "unflatten", "permute", "transpose",
          "t", "squeeze", "unsqueeze", "expand", "slice", "select", "split", "split_with_sizes", "chunk", "unbind",
          "narrow", "contiguous", "clone", "alias", "dropout", "_to_copy", "movedim", "getitem"}
_SCALE = {"mul", "div"}  # a product with a constant or number (attention's scale) keeps a tensor's role
_NCHW_OPS = {"conv2d", "convolution", "_convolution", "conv_transpose2d", "max_pool2d", "avg_pool2d",
             "adaptive_avg_pool2d", "batch_norm", "group_norm", "instance_norm", "pixel_shuffle"}
_SEARCH_DEPTH = 8  # ops between attention's two products (scale, bias, mask, dropout)


@dataclass(frozen=True)
class FeatureMap:
    """A node read as a spatial map: `role` (nchw/nhwc/tokens), grid (h, w), leading extra tokens,
    `reaches` (whether the probe's output gradient reaches ≥ 2 grid positions)."""

    node: fx.Node
    role: str
    grid: tuple[int, int]
    extra: int = 0
    reaches: bool = True

    @property
    def layer(self) -> str:
        return self.node.meta.get("layer", self.node.name)

    def to_nchw(self, value: torch.Tensor) -> torch.Tensor:
        """A [B,C,h,w] view of the node's output (or of its gradient)."""
        if self.role == "nchw":
            return value
        if self.role == "nhwc":
            return value.permute(0, 3, 1, 2)
        h, w = self.grid
        return value[:, self.extra:].reshape(value.shape[0], h, w, value.shape[-1]).permute(0, 3, 1, 2)

    def describe(self) -> str:
        """`blocks.1.norm1 (tokens, 4×4 grid, 1 extra token)`."""
        extra = f", {self.extra} extra token{'s' * (self.extra != 1)}" if self.extra else ""
        return f"{self.layer} ({self.role}, {self.grid[0]}×{self.grid[1]} grid{extra})"

    def record(self) -> dict[str, Any]:
        """What run.json states about the layer."""
        return {"layer": self.layer, "layer_role": self.role, "layer_grid": list(self.grid),
                "layer_extra_tokens": self.extra}


def grids(height: int, width: int) -> set[tuple[int, int]]:
    """Every (h, w) the input's size divided by a whole stride gives (floor or ceiling), h·w > 1."""
    found = set()
    for s in range(1, max(height, width) + 1):
        for h in {height // s, -(-height // s)}:
            for w in {width // s, -(-width // s)}:
                if h >= 1 and w >= 1 and h * w > 1:
                    found.add((h, w))
    return found


def classify(shape: tuple[int, ...], batch: int, size: tuple[int, int], hint: str | None = None
             ) -> tuple[str, tuple[int, int], int] | None:
    """(role, grid, extra tokens) of an output shape, or None when it is no spatial map."""
    if len(shape) < 3 or shape[0] != batch:
        return None
    valid = grids(*size)
    if len(shape) == 4:
        nchw, nhwc = tuple(shape[2:]) in valid, tuple(shape[1:3]) in valid
        if nchw and (not nhwc or hint != "nhwc"):
            return "nchw", (shape[2], shape[3]), 0
        if nhwc:
            return "nhwc", (shape[1], shape[2]), 0
        return None
    if len(shape) == 3:
        for extra in range(min(MAX_EXTRA_TOKENS, shape[1] - 2) + 1):
            grid = _nearest_aspect(valid, shape[1] - extra, size)
            if grid is not None:
                return "tokens", grid, extra
    return None


def _nearest_aspect(valid: set[tuple[int, int]], count: int, size: tuple[int, int]) -> tuple[int, int] | None:
    """Of the grids with `count` cells, the one closest to the input's aspect ratio."""
    same = [g for g in valid if g[0] * g[1] == count]
    return min(same, key=lambda g: abs(g[0] * size[1] - g[1] * size[0])) if same else None


def attention_internals(graph: fx.Graph) -> set[fx.Node]:
    """Nodes inside attention: products of two graph tensors, softmax, what lies between them,
    the head-split operands (through shape ops and scaling, plus the projection producing them
    when all its users are inside) and the merged heads before the output projection."""
    dependent = _input_dependent(graph)
    products = {n for n in dependent if n.op == "call_function" and packet(n) in _MATMUL
                and sum(a in dependent for a in n.all_input_nodes) >= 2}
    softmaxes = {n for n in dependent if n.op == "call_function" and packet(n) in _SOFTMAX}
    inside = set(products) | softmaxes
    for s in softmaxes:
        inside |= _paths(s, products, lambda n: [a for a in n.all_input_nodes if a in dependent])
        inside |= _paths(s, products, lambda n: list(n.users))
    for p in products:
        inside |= _shape_chain(p, forward=True)
        for operand in (a for a in p.all_input_nodes if a in dependent):
            inside |= _operand_chain(operand, inside, dependent)
    return inside


def _paths(start: fx.Node, ends: set[fx.Node], step: Callable[[fx.Node], list[fx.Node]]) -> set[fx.Node]:
    """Nodes on paths of ≤ _SEARCH_DEPTH steps from `start` to any of `ends` (exclusive of both)."""
    found: set[fx.Node] = set()

    def walk(node: fx.Node, path: list[fx.Node]) -> None:
        for nxt in step(node):
            if nxt in ends:
                found.update(path)
            elif len(path) < _SEARCH_DEPTH:
                walk(nxt, path + [nxt])

    walk(start, [])
    return found


def _shape_chain(node: fx.Node, forward: bool) -> set[fx.Node]:
    """Nodes reached from `node` through shape ops only (forward: its users)."""
    found: set[fx.Node] = set()
    todo = list(node.users) if forward else []
    while todo:
        n = todo.pop()
        if n.op == "call_function" and packet(n) in _SHAPE and n not in found:
            found.add(n)
            todo.extend(n.users)
    return found


def _operand_chain(node: fx.Node, inside: set[fx.Node], dependent: set[fx.Node]) -> set[fx.Node]:
    """An operand of attention's product back through shape ops and scaling, and the op producing
    it when every user of that op is inside attention (vit's qkv projection)."""
    found: set[fx.Node] = set()
    while node.op == "call_function" and _transparent(node, dependent):
        found.add(node)
        node = next(a for a in node.all_input_nodes if a in dependent)
    if node.op == "call_function" and all(u in found or u in inside or _feeds_only(u, found | inside)
                                          for u in node.users):
        found.add(node)
    return found


def _feeds_only(node: fx.Node, inside: set[fx.Node]) -> bool:
    """A shape op whose users are all inside attention (one of vit's q/k/v selects)."""
    return node.op == "call_function" and packet(node) in _SHAPE and all(u in inside for u in node.users)


def _transparent(node: fx.Node, dependent: set[fx.Node]) -> bool:
    name = packet(node)
    graph_inputs = [a for a in node.all_input_nodes if a in dependent]
    return len(graph_inputs) == 1 and (name in _SHAPE or name in _SCALE)


def _input_dependent(graph: fx.Graph) -> set[fx.Node]:
    found: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(a in found for a in node.all_input_nodes):
            found.add(node)
    return found


def _layout_hints(graph: fx.Graph) -> dict[fx.Node, str]:
    """nchw/nhwc of 4-D nodes by provenance (convolutions, permutes, last-dim layer norms)."""
    hints: dict[fx.Node, str] = {}
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        name = packet(node)
        first = next((hints[a] for a in node.all_input_nodes if a in hints), None)
        if name in _NCHW_OPS:
            hints[node] = "nchw"
        elif name == "permute" and len(node.args) > 1 and list(node.args[1]) == [0, 2, 3, 1]:
            hints[node] = "nhwc" if first != "nhwc" else "nchw"
        elif name == "permute" and len(node.args) > 1 and list(node.args[1]) == [0, 3, 1, 2]:
            hints[node] = "nchw" if first != "nchw" else "nhwc"
        elif name == "layer_norm" and first is None:
            hints[node] = "nhwc"
        elif first is not None:
            hints[node] = first
    return hints


class _Probe(fx.Interpreter):
    """Runs the graph once, keeping the outputs of the nodes whose shape is a spatial map."""

    def __init__(self, gm: fx.GraphModule, size: tuple[int, int], skip: set[fx.Node], batch: int):
        super().__init__(gm)
        self.size, self.skip, self.batch = size, skip, batch
        self.hints = _layout_hints(gm.graph)
        self.dependent = _input_dependent(gm.graph)
        self.found: list[tuple[FeatureMap, torch.Tensor]] = []
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if isinstance(value, torch.Tensor) and n.op == "call_function" and n in self.dependent:
            self.shapes[n] = tuple(value.shape)
            role = None if n in self.skip else classify(tuple(value.shape), self.batch, self.size, self.hints.get(n))
            if role is not None:
                self.found.append((FeatureMap(n, *role), value))
        return value


@dataclass(frozen=True)
class Survey:
    """Every feature map of a graph (execution order) and every probed node's output shape; `constant`:
    the output's gradient is zero on every map (the output does not depend on them, e.g. a zero head)."""

    maps: tuple[FeatureMap, ...]
    shapes: dict[fx.Node, tuple[int, ...]]
    constant: bool = False


_SURVEYS: "weakref.WeakKeyDictionary[fx.GraphModule, tuple[tuple[int, ...], Survey]]" = weakref.WeakKeyDictionary()


def survey(gm: fx.GraphModule, input_shape: tuple[int, int, int]) -> Survey:
    """The graph's feature maps for inputs of `input_shape` (C, H, W), from one forward and backward
    of a fixed random batch (cached per graph)."""
    cached = _SURVEYS.get(gm)
    if cached is not None and cached[0] == tuple(input_shape):
        return cached[1]
    generator = torch.Generator().manual_seed(0)
    device = next((b.device for b in gm.buffers()), next((p.device for p in gm.parameters()), torch.device("cpu")))
    batch = fixed_batch(gm) or PROBE_BATCH
    x = torch.randn(batch, *input_shape, generator=generator).to(device).requires_grad_(True)
    probe = _Probe(gm, tuple(input_shape[1:]), attention_internals(gm.graph), batch)
    with torch.enable_grad():
        out = probe.run(x)
        out = out[0] if isinstance(out, (tuple, list)) else out
        mix = torch.randn(out.shape[1:], generator=generator).to(out.device, out.dtype)
        # maps computed from the input's shape only (xcit's positional encoding) carry no gradient
        tensors = [t for _, t in probe.found if t.requires_grad]
        reached = iter(torch.autograd.grad((out * mix).sum(), tensors, allow_unused=True) if tensors else [])
        grads = [next(reached) if t.requires_grad else None for _, t in probe.found]
    maps = tuple(FeatureMap(m.node, m.role, m.grid, m.extra, _reaches(m, g)) for (m, _), g in zip(probe.found, grads))
    result = Survey(maps, probe.shapes, all(g is None or not bool(g.any()) for g in grads))
    _SURVEYS[gm] = (tuple(input_shape), result)
    return result


def _reaches(feature_map: FeatureMap, grad: torch.Tensor | None) -> bool:
    if grad is None:
        return False
    energy = feature_map.to_nchw(grad.detach()).abs().sum((0, 1))
    return int((energy > 1e-7 * energy.max()).sum()) >= 2 if energy.max() > 0 else False


def default_feature_map(gm: fx.GraphModule, input_shape: tuple[int, int, int]) -> FeatureMap:
    """The last feature map the output's gradient reaches (the last map of all when the output is constant:
    timm initialises some heads to zero); UsageError naming candidates when none."""
    found = survey(gm, input_shape)
    reached = [m for m in found.maps if m.reaches]
    if reached:
        return reached[-1]
    if found.maps and found.constant:
        return found.maps[-1]
    raise UsageError(f"no layer of the model is a spatial feature map the output depends on "
                     f"({_candidates(found)}); name one with `layer`")


def feature_map_of(gm: fx.GraphModule, node: fx.Node, input_shape: tuple[int, int, int], name: str) -> FeatureMap:
    """The user-named `node` as a feature map (any of the three layouts); UsageError when it is none."""
    found = survey(gm, input_shape)
    for m in found.maps:
        if m.node is node:
            return m
    shape = found.shapes.get(node)
    if shape is not None and len(shape) == 4:  # a 4-D map of another grid (or inside attention): as given
        return FeatureMap(node, "nchw", (shape[2], shape[3]))
    what = "no tensor output" if shape is None else f"output shape [{', '.join(map(str, ('B',) + shape[1:]))}]"
    raise UsageError(f"layer {name!r} has {what}, not a [B,C,H,W], [B,H,W,C] or token [B,N,C] map "
                     f"of the {input_shape[1]}×{input_shape[2]} input; feature maps: {_candidates(found)}")


def _candidates(found: Survey, limit: int = 6) -> str:
    """The last feature maps the output's gradient reaches (else the last ones it does not)."""
    reached = [m for m in found.maps if m.reaches]
    maps = reached or list(found.maps)
    if not maps:
        return "none found"
    shown = ", ".join(m.describe() for m in maps[-limit:])
    more = f" and {len(found.maps) - min(limit, len(maps))} more" if len(found.maps) > min(limit, len(maps)) else ""
    note = "" if reached else " (the output's gradient reaches none of them)"
    return f"candidates: {shown}{more}{note}"
