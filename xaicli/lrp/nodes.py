"""What each node of an ATen graph is, for LRP: its kind, its arguments by name, its public names.

Kinds are the keys of `rules_by_type`; every call_function node gets one:

    conv        convolutions (any dims, groups, transposed) with constant weights
    linear      aten.linear with a constant weight
    sum         add / sub of graph tensors (residual sums; constants act as biases)
    pool        average pooling, adaptive average pooling, mean / sum over dims
    maxpool     max pooling (and amax)
    activation  element-wise non-linearities (relu, gelu, silu, hardswish, ..., c / x of a graph tensor x)
    norm        normalisation layers left after canonization (batch/layer/group/RMS norm)
    softmax     softmax (attention weights, and any other softmax)
    gate        element-wise products: mul (by a constant, a gate, or another graph tensor), and div
                (by a constant, or by a graph tensor: the divisor is then held constant, see `signal`)
    matmul      products of two graph tensors (attention: softmax(q·kᵀ)·v)
    shape       re-arrangements without arithmetic (view, flatten, cat, slice, ...): always the gradient
    other       anything else: the gradient (as Zennit does for modules without a rule)
"""
from __future__ import annotations

import operator
import re
from typing import Any, Iterable

import torch
from torch import fx

KINDS = ("conv", "linear", "sum", "pool", "maxpool", "activation", "norm", "softmax", "gate", "matmul")
"""Kinds a user may assign rules to (`rules_by_type` keys)."""

_CONV = {"conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d", "conv_transpose2d",
         "conv_transpose3d"}
_NORM = {"batch_norm", "layer_norm", "group_norm", "instance_norm", "native_batch_norm",
         "_native_batch_norm_legit_no_training", "native_layer_norm", "native_group_norm", "rms_norm"}
_ACTIVATION = {"relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "hardtanh",
               "leaky_relu", "elu", "selu", "celu", "softplus", "mish", "prelu", "_prelu_kernel", "threshold",
               "clamp", "clamp_min", "clip", "log_sigmoid", "erf"}
_POOL = {"avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
         "adaptive_avg_pool3d", "_adaptive_avg_pool2d", "_adaptive_avg_pool3d", "mean", "sum"}
_MAXPOOL = {"max_pool1d", "max_pool2d", "max_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
            "adaptive_max_pool3d", "max_pool2d_with_indices", "max_pool3d_with_indices", "amax"}
_SHAPE = {"view", "_unsafe_view", "reshape", "flatten", "unflatten", "permute", "transpose", "t", "squeeze",
          "unsqueeze", "expand", "cat", "concat", "stack", "slice", "select", "split", "split_with_sizes",
          "chunk", "unbind", "narrow", "contiguous", "clone", "alias", "dropout", "feature_dropout",
          "constant_pad_nd", "pad", "pixel_shuffle", "pixel_unshuffle", "repeat", "index_select", "movedim",
          "_to_copy", "to", "detach", "lift_fresh_copy", "view_as", "flip", "roll"}
_SOFTMAX = {"softmax", "_softmax", "_safe_softmax"}
_NONNEG = {"relu", "relu6", "sigmoid", "hardsigmoid", *_SOFTMAX, "exp", "abs", "sqrt", "rsqrt"}


def packet(node: fx.Node) -> str:
    """The op's name without overload or in-place suffix (`aten.relu_.default` -> `relu`)."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        name = target.overloadpacket.__name__
    else:
        name = getattr(target, "__name__", str(target))
    return name[:-1] if name.endswith("_") and not name.endswith("__") and not name.startswith("_") else name


def bind(node: fx.Node) -> dict[str, Any]:
    """The node's arguments by schema name, defaults filled in (OpOverload targets only)."""
    schema = node.target._schema  # type: ignore[union-attr]
    out: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args) and not arg.kwarg_only:
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
    return out


def is_constant(arg: Any) -> bool:
    """A parameter or buffer of the graph (not computed from the input)."""
    return isinstance(arg, fx.Node) and arg.op == "get_attr"


def tensor_args(node: fx.Node) -> list[fx.Node]:
    """The node's inputs computed from the graph input (relevance flows to these), in argument order."""
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) if n.op != "get_attr" else None)
    return [n for n in found if _is_tensor(n)]


def _is_tensor(node: fx.Node) -> bool:
    val = node.meta.get("val")
    if val is not None:
        return isinstance(val, torch.Tensor)
    if isinstance(node.target, torch._ops.OpOverload):
        return not packet(node).startswith("sym_")
    return node.op == "placeholder" or node.target is operator.getitem


def kind(node: fx.Node) -> str:
    """The LRP kind of a call_function node (see the module docstring)."""
    if not isinstance(node.target, torch._ops.OpOverload):
        return "shape" if node.target is operator.getitem else "other"
    name = packet(node)
    args = bind(node)
    if name in _CONV:
        return "conv" if is_constant(args.get("weight")) else "other"
    if name == "linear":
        return "linear" if is_constant(args.get("weight")) else "other"
    if name in ("add", "sub", "rsub"):
        return "sum" if tensor_args(node) else "other"
    if name in ("mul", "div"):
        return _gate_kind(node, name)
    if name in ("matmul", "bmm", "mm"):
        return "matmul" if len(tensor_args(node)) == 2 else "other"
    if name in _SOFTMAX:
        return "softmax"
    for table, label in ((_NORM, "norm"), (_ACTIVATION, "activation"), (_POOL, "pool"), (_MAXPOOL, "maxpool"),
                         (_SHAPE, "shape")):
        if name in table:
            return label
    return "other"


def _gate_kind(node: fx.Node, name: str) -> str:
    graph_inputs = tensor_args(node)
    if not graph_inputs:
        return "other"
    if name == "div":
        numerator = node.args[0]
        if not (isinstance(numerator, fx.Node) and numerator in graph_inputs):
            return "activation"  # c / x: an element-wise function of the divisor (a reciprocal)
    return "gate"


def signal(node: fx.Node) -> tuple[int, ...] | None:
    """Positions (in `tensor_args` order) of a gate node's inputs that carry the signal, None: all.

    A division by a graph tensor keeps the divisor as a constant: only the numerator (the first
    graph input) receives relevance, as a gate's signal does.
    """
    if packet(node) == "div" and len(tensor_args(node)) > 1:
        return (0,)
    return None


def softmax_operand(node: fx.Node) -> int | None:
    """Which operand of a matmul is attention weights (a softmax, maybe re-arranged), if one is."""
    for index, arg in enumerate(node.args[:2]):
        while isinstance(arg, fx.Node) and arg.op == "call_function" and kind(arg) == "shape":
            arg = arg.args[0]
        if isinstance(arg, fx.Node) and arg.op == "call_function" and packet(arg) in _SOFTMAX:
            return index
    return None


def has_attention(nodes: Iterable[fx.Node]) -> bool:
    """Whether a graph holds attention: a softmax feeding (maybe re-arranged) a product of two graph tensors."""
    return any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and kind(n) == "matmul"
               and softmax_operand(n) is not None for n in nodes)


def nonnegative(nodes: Iterable[fx.Node]) -> set[fx.Node]:
    """Nodes whose value is >= 0 for every input (ReLU outputs and what keeps their sign)."""
    known: set[fx.Node] = set()
    for node in nodes:
        if node.op != "call_function":
            continue
        name = packet(node)
        inputs = tensor_args(node)
        if name in _NONNEG or (name in ("clamp", "clamp_min", "hardtanh") and _min_at_least_zero(node)):
            known.add(node)
        elif kind(node) in ("shape", "maxpool", "pool", "sum", "gate") and inputs and all(n in known for n in inputs):
            if name not in ("sub", "rsub") and not _negative_constant(node):
                known.add(node)
    return known


def _min_at_least_zero(node: fx.Node) -> bool:
    args = bind(node)
    low = args.get("min", args.get("min_val"))
    return isinstance(low, (int, float)) and low >= 0


def _negative_constant(node: fx.Node) -> bool:
    return any(isinstance(a, (int, float)) and a < 0 for a in node.args) or any(is_constant(a) for a in node.args)


def normalise(name: str) -> str:
    """A layer name in a comparable form: `layer4.1.conv2`, `layer4_1_conv2` and `/layer4/1/conv2` agree."""
    return re.sub(r"[^0-9a-zA-Z]+", "_", name).strip("_").lower()


def module_paths(node: fx.Node) -> list[str]:
    """Layer names the node belongs to, outermost first, plus names it absorbed in canonization.

    Uses xaicli.graph's `meta["layer"]` (`layer4.1.conv2` -> `layer4`, `layer4.1`, `layer4.1.conv2`)
    and falls back on torch.export's module stack.
    """
    layer = node.meta.get("layer")
    if layer:
        parts = str(layer).split(".")
        paths = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    else:
        stack = node.meta.get("nn_module_stack") or {}
        paths = [value[0] if isinstance(value, tuple) else str(value) for value in stack.values()]
    return [p for p in paths if p] + list(node.meta.get("lrp_aliases", ()))


def layer_index(nodes: Iterable[fx.Node]) -> tuple[dict[str, fx.Node], dict[str, list[fx.Node]]]:
    """Public names of a graph's compute nodes.

    Returns (outputs, members): `outputs[name]` is the node whose value is the output of layer `name`
    (the node itself for node names; the last node traced inside a module for module paths),
    `members[name]` every compute node inside it. Keys are `normalise`d.
    """
    outputs: dict[str, fx.Node] = {}
    members: dict[str, list[fx.Node]] = {}
    for node in nodes:
        if node.op != "call_function":
            continue
        keys = [normalise(node.name)] + [normalise(p) for p in module_paths(node)]
        for key in dict.fromkeys(keys):
            outputs[key] = node
            members.setdefault(key, []).append(node)
    return outputs, members


def display_names(nodes: Iterable[fx.Node]) -> list[str]:
    """Names a user can type, for error messages: layer names where known, else node names."""
    names: list[str] = []
    for node in nodes:
        if node.op == "call_function":
            own = [p for p in module_paths(node) if p not in node.meta.get("lrp_aliases", ())]
            names.append(own[-1] if own else node.name)
    return list(dict.fromkeys(names))
