"""Normalise a functional ATen graph to the canonical op vocabulary of `xaicli.graph`.

Each pass rewrites one family of equivalent spellings into the one form the LRP engine
knows (batch norm, layer norm, max pooling, convolution, attention, multi-output splits,
no-op copies) and keeps the batch dimension symbolic in reshapes.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Callable

import torch
from torch import fx

aten = torch.ops.aten

NOOPS = {
    aten.clone.default, aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default, aten.contiguous.default,
    aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
}
CHECKS = {
    aten._assert_tensor_metadata.default, aten._assert_scalar.default,
    aten.sym_constrain_range_for_size.default, aten._assert_async.msg,
}
RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


def functionalise(graph: fx.Graph) -> bool:
    """Rewrite in-place ops (relu_, add_) to their functional forms where that is exact: the
    mutated tensor is no view, has no views and is not read after the mutation (export's
    training IR refers to the mutated value through the in-place node). False, with the graph
    untouched, when some op does not qualify (then the caller functionalises with torch).
    Dropout in evaluation mode changes nothing, so its in-place form always qualifies."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    plan = []
    for node in graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable:
            functional = _functional(node)
            if functional is None or not (functional in NOOPS or _safe_to_copy(node, order)):
                return False
            plan.append((node, functional))
    for node, functional in plan:
        node.target = functional
    return True


def _functional(node: fx.Node) -> Any:
    """relu_.default -> relu.default: the op writing only its first argument, without the `_`."""
    schema = node.target._schema
    written = [a for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    name = node.target._opname
    if len(written) != 1 or written[0] is not schema.arguments[0] or not name.endswith("_"):
        return None
    packet = getattr(aten, name[:-1], None)
    return getattr(packet, node.target._overloadname, None) if packet is not None else None


def _safe_to_copy(node: fx.Node, order: dict[fx.Node, int]) -> bool:
    target = node.args[0]
    if not isinstance(target, fx.Node) or target.op != "call_function" or _is_view(target):
        return False
    return all(user is node or (order[user] < order[node] and not _is_view(user)) for user in target.users)


def _is_view(node: fx.Node) -> bool:
    """A view op (its output aliases an input); in-place ops return their input, not a view."""
    op = node.target
    if not isinstance(op, torch._ops.OpOverload) or op._schema.is_mutable:
        return False
    return any(r.alias_info is not None for r in op._schema.returns)


def normalise(graph: fx.Graph) -> None:
    """Apply every pass in place, then drop what became dead."""
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in CHECKS:
            graph.erase_node(node)
        elif node.target in NOOPS:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        elif node.target in PASSES:
            PASSES[node.target](node)
    graph.eliminate_dead_code()
    graph.lint()


def _emit(at: fx.Node, target: Any, args: tuple, meta_from: fx.Node | None = None) -> fx.Node:
    """A new call_function node before `at`, carrying the metadata of `meta_from` (or `at`)."""
    with at.graph.inserting_before(at):
        new = at.graph.call_function(target, args)
    new.meta.update(at.meta)
    if meta_from is not None and "val" in meta_from.meta:
        new.meta["val"] = meta_from.meta["val"]
    return new


def _replace(node: fx.Node, target: Any, args: tuple) -> fx.Node:
    new = _emit(node, target, args)
    node.replace_all_uses_with(new)
    node.graph.erase_node(node)
    return new


def _outputs(node: fx.Node) -> dict[int, fx.Node]:
    """The getitem users of a multi-output node, by index."""
    return {user.args[1]: user for user in list(node.users) if user.target is operator.getitem}


def _first_output(node: fx.Node, target: Any, args: tuple) -> None:
    """Replace a multi-output op whose only used output is [0] by a single-output op."""
    outs = _outputs(node)
    if set(outs) - {0} and any(outs[i].users for i in set(outs) - {0}):
        return
    first = outs.get(0)
    new = _emit(node, target, args, meta_from=first)
    if first is not None:
        first.replace_all_uses_with(new)
    for user in outs.values():
        node.graph.erase_node(user)
    node.graph.erase_node(node)


def _batch_norm_legit(node: fx.Node) -> None:
    x, w, b, mean, var, momentum, eps = node.args
    _first_output(node, aten.batch_norm.default, (x, w, b, mean, var, False, momentum, eps, True))


def _native_batch_norm(node: fx.Node) -> None:
    x, w, b, mean, var, training, momentum, eps = node.args
    if not training:
        _first_output(node, aten.batch_norm.default, (x, w, b, mean, var, False, momentum, eps, True))


def _native_layer_norm(node: fx.Node) -> None:
    x, shape, w, b, eps = node.args
    _first_output(node, aten.layer_norm.default, (x, shape, w, b, eps, True))


def _max_pool_indices(node: fx.Node) -> None:
    _first_output(node, aten.max_pool2d.default, tuple(node.args))


def _softmax(node: fx.Node) -> None:
    x, dim, _half_to_float = node.args
    _replace(node, aten.softmax.int, (x, dim))


def _convolution(node: fx.Node) -> None:
    x, w, b, stride, padding, dilation, transposed, output_padding, groups = node.args
    rank = _rank(w)
    if transposed and rank == 4:
        _replace(node, aten.conv_transpose2d.input, (x, w, b, stride, padding, output_padding, groups, dilation))
    elif not transposed and rank in (3, 4, 5):
        target = {3: aten.conv1d.default, 4: aten.conv2d.default, 5: aten.conv3d.default}[rank]
        _replace(node, target, (x, w, b, stride, padding, dilation, groups))


def _attention(node: fx.Node) -> None:
    """scaled_dot_product_attention -> softmax(q·kᵀ·scale [+ mask])·v as explicit nodes,
    so that matmul and softmax get their own rules (and ONNX graphs look the same)."""
    q, k, v, *rest = node.args
    opts = dict(zip(("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"), rest)) | dict(node.kwargs)
    mask = opts.get("attn_mask")
    if opts.get("is_causal") or opts.get("enable_gqa") or (mask is not None and _dtype(mask) == torch.bool):
        return
    scale = opts.get("scale") or 1.0 / math.sqrt(_shape(q)[-1])
    kt = _emit(node, aten.permute.default, (k, _swap_last(_rank(k))))
    scores = _emit(node, aten.mul.Tensor, (_emit(node, aten.matmul.default, (q, kt)), scale))
    if mask is not None:
        scores = _emit(node, aten.add.Tensor, (scores, mask))
    weights = _emit(node, aten.softmax.int, (scores, -1))
    _replace(node, aten.matmul.default, (weights, v))
    for new in (kt, scores, weights):
        new.meta.pop("val", None)


def _unbind(node: fx.Node) -> None:
    """unbind + getitem[i] -> select(dim, i)."""
    x, dim = (*node.args, 0)[:2]
    for index, user in _outputs(node).items():
        _replace(user, aten.select.int, (x, dim, index))
    node.graph.erase_node(node)


def _split(node: fx.Node) -> None:
    """split / split_with_sizes + getitem[i] -> slice(dim, start, end)."""
    x, sizes, dim = (*node.args, 0)[:3]
    if isinstance(sizes, int):
        total = _shape(x)[dim]
        sizes = [min(sizes, total - start) for start in range(0, total, sizes)]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    for index, user in _outputs(node).items():
        _replace(user, aten.slice.Tensor, (x, dim, starts[index], starts[index] + sizes[index]))
    node.graph.erase_node(node)


def _reshape(node: fx.Node) -> None:
    """view/_unsafe_view -> reshape (rewrites may change memory layout, e.g. attention). A size
    list holding one symbolic entry (the batch) gets -1 there instead, so the graph needs no
    shape arithmetic for it."""
    x, shape = node.args[:2]
    symbolic = [i for i, s in enumerate(shape) if isinstance(s, fx.Node)]
    if len(symbolic) == 1 and -1 not in shape:
        shape = list(shape)
        shape[symbolic[0]] = -1
    _replace(node, aten.reshape.default, (x, list(shape)))


def _transpose(node: fx.Node) -> None:
    """transpose / t -> permute, the one spelling of axis reorders."""
    x, *dims = node.args
    rank = _rank(x)
    d0, d1 = (dims[0] % rank, dims[1] % rank) if dims else (0, 1)
    perm = list(range(rank))
    perm[d0], perm[d1] = perm[d1], perm[d0]
    _replace(node, aten.permute.default, (x, perm))


def _swap_last(rank: int) -> list[int]:
    return [*range(rank - 2), rank - 1, rank - 2]


def _slice(node: fx.Node) -> None:
    """A slice over the whole dimension is a no-op (exporters emit them)."""
    x, dim, start, end, step = (*node.args, *(None, 0, None, None, 1)[len(node.args):])
    size = _shape(x)[dim]
    whole = end is None or (isinstance(end, int) and (end >= 2**62 or (isinstance(size, int) and end >= size)))
    if start in (0, None) and step == 1 and whole:
        node.replace_all_uses_with(x)
        node.graph.erase_node(node)


def _squeeze(node: fx.Node) -> None:
    """squeeze(slice(x, d, i, i+1), [d]) -> select(x, d, i): how ONNX Split+Squeeze reads
    torch's unbind."""
    src, dims = node.args
    if not isinstance(src, fx.Node) or src.target != aten.slice.Tensor or len(dims) != 1 or len(src.users) != 1:
        return
    data, dim, start, end, step = (*src.args, *(None, 0, None, None, 1)[len(src.args):])
    single = isinstance(start, int) and isinstance(end, int) and end - start == 1 and step == 1
    if single and dim % _rank(data) == dims[0] % _rank(data):
        _replace(node, aten.select.int, (data, dim, start))


def _flatten(node: fx.Node) -> None:
    """flatten -> reshape to its output size, the batch as -1 (what export makes of flatten)."""
    sizes = [s if isinstance(s, int) else -1 for s in _shape(node)]
    if sizes.count(-1) <= 1:
        _replace(node, aten.reshape.default, (node.args[0], sizes))


def _mean(node: fx.Node) -> None:
    """A kept-dim mean over H and W of a 4-D tensor is global average pooling; say so (ONNX's
    ReduceMean and torch's AdaptiveAvgPool2d(1) then agree)."""
    x, dims, keepdim = (*node.args, False)[:3]
    if keepdim and _rank(x) == 4 and sorted(d % 4 for d in dims) == [2, 3] and not node.kwargs.get("dtype"):
        _replace(node, aten.adaptive_avg_pool2d.default, (x, [1, 1]))


def _shape(node: fx.Node) -> tuple:
    return tuple(node.meta["val"].shape)


def _rank(node: fx.Node) -> int:
    return len(_shape(node))


def _dtype(node: fx.Node) -> torch.dtype:
    return node.meta["val"].dtype


PASSES: dict[Any, Callable[[fx.Node], None]] = {
    aten._native_batch_norm_legit_no_training.default: _batch_norm_legit,
    aten.native_batch_norm.default: _native_batch_norm,
    aten.native_layer_norm.default: _native_layer_norm,
    aten.max_pool2d_with_indices.default: _max_pool_indices,
    aten._softmax.default: _softmax,
    aten.convolution.default: _convolution,
    aten.scaled_dot_product_attention.default: _attention,
    aten.unbind.int: _unbind,
    aten.transpose.int: _transpose,
    aten.t.default: _transpose,
    aten.slice.Tensor: _slice,
    aten.flatten.using_ints: _flatten,
    aten.mean.dim: _mean,
    aten.squeeze.dims: _squeeze,
    aten.split.Tensor: _split,
    aten.split_with_sizes.default: _split,
    **{target: _reshape for target in RESHAPES},
}
