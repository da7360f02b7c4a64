"""Canonization: the same function as a new GraphModule, in the form LRP rules assume.

- BatchNorm folded into the conv/linear before it (Motzkus et al. 2022), for grouped, depthwise and
  transposed convolutions and for BatchNorm1d after a linear layer; a folded BatchNorm's names become
  aliases of the layer that absorbed it.
- Constant bias additions after a bias-free conv/linear merged into its bias; `x @ W` with a constant W
  (mm, matmul, addmm) written as aten.linear.
- In-place ops replaced by their out-of-place forms, multi-output forms (`_native_batch_norm_legit_no_training`,
  `native_layer_norm`, `max_pool2d_with_indices`) by single-output ones, eval-mode dropout removed,
  views as reshapes, computations on constants folded, and one tensor output.

The source graph is never modified. Untouched parameters are shared read-only with it; every changed
tensor is new, so the user's model and the source graph keep their parameters.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
from torch import fx

from .nodes import bind, is_constant, kind, module_paths, packet

aten = torch.ops.aten

_IDENTITY = {"alias", "clone", "detach", "lift_fresh_copy", "contiguous"}


class _Builder:
    """The new graph and the tensors its get_attr nodes name."""

    def __init__(self) -> None:
        self.graph = fx.Graph()
        self.constants: dict[str, torch.Tensor] = {}

    def constant(self, tensor: torch.Tensor, before: fx.Node, hint: str) -> fx.Node:
        name = _unique(hint, self.constants)
        self.constants[name] = tensor
        with self.graph.inserting_before(before):
            return self.graph.get_attr(name)

    def value(self, node: fx.Node) -> torch.Tensor:
        return self.constants[str(node.target)]

    def module(self) -> fx.GraphModule:
        used = {str(n.target) for n in self.graph.nodes if n.op == "get_attr"}
        root = torch.nn.Module()
        for name in used:
            root.register_buffer(name, self.constants[name])
        return fx.GraphModule(root, self.graph)


def canonize(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule that computes what `gm` computes, in LRP's canonical form (module docstring)."""
    builder = _copy(gm)
    graph = builder.graph
    for step in (_drop_guards, _functionalise, _single_outputs, _drop_identities, _fold_constants,
                 _as_linear, _merge_bias_adds, _fold_batch_norms):
        step(builder)
        graph.eliminate_dead_code()
    graph.lint()
    return builder.module()


def _copy(gm: fx.GraphModule) -> _Builder:
    builder = _Builder()
    graph = builder.graph
    remap: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "output":
            graph.output(fx.node.map_arg(_single_output(node.args[0]), lambda n: remap[n]))
        elif node.op == "get_attr":
            tensor = _attr(gm, str(node.target))
            name = _unique(str(node.target).replace(".", "_"), builder.constants)
            builder.constants[name] = tensor.detach() if isinstance(tensor, torch.Tensor) else tensor
            remap[node] = graph.get_attr(name)
            remap[node].meta = dict(node.meta)
        else:
            remap[node] = graph.node_copy(node, lambda n: remap[n])
    return builder


def _single_output(value: Any) -> Any:
    while isinstance(value, (tuple, list)) and len(value) == 1:
        value = value[0]
    if isinstance(value, (tuple, list)):
        raise ValueError(f"LRP needs a model with one output (the logits); this graph returns {len(value)}")
    return value


def _attr(gm: fx.GraphModule, target: str) -> Any:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _unique(hint: str, taken: dict[str, Any]) -> str:
    name, i = hint or "c", 1
    while name in taken:
        name, i = f"{hint}_{i}", i + 1
    return name


def _calls(builder: _Builder) -> list[fx.Node]:
    return [n for n in builder.graph.nodes if n.op == "call_function"]


def _drop_guards(builder: _Builder) -> None:
    """torch.export's `_guards_fn` call_module checks shapes; our copy carries no submodules."""
    for node in list(builder.graph.nodes):
        if node.op == "call_module":
            if node.users:
                raise ValueError(f"unexpected call_module node {node.name!r} in an ATen graph")
            builder.graph.erase_node(node)


def _functionalise(builder: _Builder) -> None:
    """relu_(a) -> relu(a); later readers of `a` read the new node instead."""
    order = {n: i for i, n in enumerate(builder.graph.nodes)}
    for node in _calls(builder):
        target = node.target
        if not isinstance(target, torch._ops.OpOverload) or not target._schema.is_mutable:
            continue
        name = target.overloadpacket.__name__
        if not name.endswith("_"):
            raise ValueError(f"cannot explain a graph with the mutating op {target}")
        node.target = getattr(getattr(aten, name[:-1]), target._overloadname)
        mutated = node.args[0]
        for user in list(mutated.users):
            if user is not node and order[user] > order[node]:
                user.replace_input_with(mutated, node)


def _single_outputs(builder: _Builder) -> None:
    """Multi-output ops whose extra outputs are unused, as their single-output forms."""
    for node in _calls(builder):
        name = packet(node)
        if name not in ("_native_batch_norm_legit_no_training", "native_layer_norm", "max_pool2d_with_indices"):
            continue
        items = list(node.users)
        if not all(u.target is operator.getitem and u.args[1] == 0 for u in items):
            continue
        args = list(node.args)
        if name == "_native_batch_norm_legit_no_training":
            target, args = aten.batch_norm.default, args[:5] + [False] + args[5:7] + [False]
        elif name == "native_layer_norm":
            target = aten.layer_norm.default
        else:
            target = aten.max_pool2d.default
        with builder.graph.inserting_before(node):
            single = builder.graph.call_function(target, tuple(args), dict(node.kwargs))
        single.meta = dict(node.meta)
        for item in items:
            item.replace_all_uses_with(single)
            builder.graph.erase_node(item)
        builder.graph.erase_node(node)


def _drop_identities(builder: _Builder) -> None:
    """Eval dropout and copies are the identity; views become reshapes (inputs may be NHWC, see engine)."""
    for node in _calls(builder):
        if node.target in (aten.view.default, aten._unsafe_view.default):
            node.target = aten.reshape.default
            continue
        name = packet(node)
        identity = name in _IDENTITY or (name in ("dropout", "feature_dropout") and not bind(node).get("train"))
        if identity and isinstance(node.args[0], fx.Node) and len(node.args) >= 1:
            node.replace_all_uses_with(node.args[0])
            builder.graph.erase_node(node)


def _fold_constants(builder: _Builder) -> None:
    """Nodes computed from constants only become constants (e.g. transposed weights of ONNX Gemm)."""
    for node in _calls(builder):
        inputs = node.all_input_nodes
        if not inputs or not all(is_constant(n) for n in inputs):
            continue
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), builder.value)
        with torch.no_grad():
            value = node.target(*args, **kwargs)
        if not isinstance(value, torch.Tensor):
            continue
        const = builder.constant(value, node, node.name)
        const.meta = dict(node.meta)
        node.replace_all_uses_with(const)
        builder.graph.erase_node(node)


def _as_linear(builder: _Builder) -> None:
    """x @ W (+ b) with a constant 2-D W as aten.linear, so it gets the linear rules."""
    for node in _calls(builder):
        name = packet(node)
        if name not in ("mm", "matmul", "addmm"):
            continue
        x, w = (node.args[1], node.args[2]) if name == "addmm" else (node.args[0], node.args[1])
        bias = node.args[0] if name == "addmm" else None
        if name == "addmm" and (node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1):
            continue
        if not is_constant(w) or builder.value(w).ndim != 2 or (bias is not None and not is_constant(bias)):
            continue
        weight = builder.constant(builder.value(w).t().contiguous(), node, f"{node.name}_weight")
        _replace(builder, node, aten.linear.default, (x, weight, bias))


def _replace(builder: _Builder, node: fx.Node, target: Callable, args: tuple) -> fx.Node:
    with builder.graph.inserting_before(node):
        new = builder.graph.call_function(target, args)
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    builder.graph.erase_node(node)
    return new


def _merge_bias_adds(builder: _Builder) -> None:
    """conv/linear without bias followed by `+ constant` (ONNX MatMul+Add, TorchScript conv + bias)."""
    for node in _calls(builder):
        if packet(node) != "add" or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
            continue
        layer, const = node.args if is_constant(node.args[1]) else node.args[::-1]
        if not (isinstance(layer, fx.Node) and is_constant(const) and kind(layer) in ("conv", "linear")):
            continue
        if len(layer.users) != 1 or bind(layer).get("bias") is not None:
            continue
        bias = _as_bias(builder.value(const), layer, builder)
        if bias is None:
            continue
        _set_arg(layer, "bias", builder.constant(bias, layer, f"{layer.name}_bias"))
        layer.meta.setdefault("lrp_aliases", []).extend(_own_names(node))
        node.replace_all_uses_with(layer)
        builder.graph.erase_node(node)


def _as_bias(value: torch.Tensor, layer: fx.Node, builder: _Builder) -> torch.Tensor | None:
    channels = _out_channels(layer, builder)
    if value.numel() != channels:
        return None
    if kind(layer) == "linear":
        return value.reshape(-1) if value.shape[-1] == channels else None
    out = layer.meta.get("val")
    trailing = value.shape[-(out.ndim - 2):] if out is not None and out.ndim > 2 else ()
    return value.reshape(-1) if all(s == 1 for s in trailing) and value.ndim >= len(trailing) + 1 else None


def _out_channels(layer: fx.Node, builder: _Builder) -> int:
    args = bind(layer)
    weight = builder.value(args["weight"])
    if kind(layer) == "linear" or not _transposed(layer):
        return weight.shape[0]
    return weight.shape[1] * args.get("groups", 1)


def _transposed(layer: fx.Node) -> bool:
    name = packet(layer)
    return name.startswith("conv_transpose") or bool(bind(layer).get("transposed", False))


def _set_arg(node: fx.Node, name: str, value: Any) -> None:
    names = [a.name for a in node.target._schema.arguments]  # type: ignore[union-attr]
    index = names.index(name)
    if index < len(node.args):
        node.update_arg(index, value)
    else:
        node.update_kwarg(name, value)


def _own_names(node: fx.Node) -> list[str]:
    """Names by which a node that is folded away stays reachable (as aliases of its absorber)."""
    paths = module_paths(node)
    own = [p for p in paths if p not in node.meta.get("lrp_aliases", ())]
    return [node.name] + own[-1:] + list(node.meta.get("lrp_aliases", ()))


def _fold_batch_norms(builder: _Builder) -> None:
    for node in _calls(builder):
        if packet(node) != "batch_norm":
            continue
        args = bind(node)
        layer = args["input"]
        if args.get("training") or not _foldable(layer, args, builder):
            continue
        weight, bias = _folded(layer, args, builder)
        _set_arg(layer, "weight", builder.constant(weight, layer, f"{layer.name}_weight"))
        _set_arg(layer, "bias", builder.constant(bias, layer, f"{layer.name}_bias"))
        layer.meta.setdefault("lrp_aliases", []).extend(_own_names(node))
        node.replace_all_uses_with(layer)
        builder.graph.erase_node(node)


def _foldable(layer: Any, args: dict[str, Any], builder: _Builder) -> bool:
    if not isinstance(layer, fx.Node) or kind(layer) not in ("conv", "linear") or len(layer.users) != 1:
        return False
    stats = [args.get(k) for k in ("weight", "bias", "running_mean", "running_var")]
    if not all(s is None or is_constant(s) for s in stats) or args.get("running_mean") is None:
        return False
    bias = bind(layer).get("bias")
    if bias is not None and not is_constant(bias):
        return False
    if kind(layer) == "linear":  # BatchNorm1d normalises dim 1: the features only for 2-D outputs
        out = layer.meta.get("val")
        return out is not None and out.ndim == 2
    return True


def _folded(layer: fx.Node, args: dict[str, Any], builder: _Builder) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of conv/linear followed by eval BatchNorm, as one layer."""
    get = lambda key: builder.value(args[key]) if args.get(key) is not None else None  # noqa: E731
    mean, var, gamma, beta = get("running_mean"), get("running_var"), get("weight"), get("bias")
    scale = (gamma if gamma is not None else 1.0) / torch.sqrt(var + args["eps"])
    layer_args = bind(layer)
    weight = builder.value(layer_args["weight"])
    old_bias = builder.value(layer_args["bias"]) if layer_args.get("bias") is not None else torch.zeros_like(mean)
    if kind(layer) == "conv" and _transposed(layer):
        groups = layer_args.get("groups", 1)
        shaped = weight.reshape(groups, weight.shape[0] // groups, weight.shape[1], *weight.shape[2:])
        new_weight = (shaped * scale.reshape(groups, 1, -1, *[1] * (weight.ndim - 2))).reshape(weight.shape)
    else:
        new_weight = weight * scale.reshape(-1, *[1] * (weight.ndim - 1))
    new_bias = (old_bias - mean) * scale + (beta if beta is not None else 0.0)
    return new_weight.contiguous(), new_bias
