"""ONNX operators as torch calls, for the ONNX->torch converter (`onnx_convert`).

A value is a tensor, or - for shape arithmetic (Shape -> Gather -> Concat -> Reshape) - a
Python list of ints (1-D), a Python number (0-D), or a numpy int array (2-D and more: the
exporters' F.pad spelling reshapes pads to [n, 2], reverses and transposes them). Entries may be torch.SymInt: the batch
size while torch.export traces, which is how the batch stays dynamic. Small integer
constants arrive as lists already (see `onnx_convert`). Each handler takes
`(a: Attrs, *inputs)`; inputs that moved from attributes to inputs across opsets 13-21 are
read from either.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

Value = Any  # torch.Tensor | list | int | float | torch.SymInt | None

ONNX_DTYPES = {
    1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32, 7: torch.int64,
    9: torch.bool, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16,
}


class UnsupportedForm(ValueError):
    """A supported op used in a form the converter does not handle; reported with the op and node."""


class Attrs(dict):
    """A node's attributes plus what some ops need to know about the model: the batch size
    baked into a fixed-batch export (`fixed_batch`) and the batch size of this run (`batch`)."""

    fixed_batch: int | None = None
    batch: Any = None


# ---------------------------------------------------------------- value helpers

def is_listy(v: Value) -> bool:
    """A shape-arithmetic value (list or number), not a tensor."""
    return isinstance(v, (list, int, float, torch.SymInt, torch.SymFloat, np.ndarray)) and not isinstance(v, bool)


def ints(v: Value) -> list:
    """A shape-like input as a list of (Sym)ints."""
    if isinstance(v, torch.Tensor):
        return [int(i) for i in v.reshape(-1).tolist()]
    if isinstance(v, np.ndarray):
        return [int(i) for i in v.reshape(-1)]
    return list(v) if isinstance(v, (list, tuple)) else [v]


def as_list(v: Value) -> list | int | float:
    """Shape-arithmetic view of a value: list for 1-D, number for 0-D."""
    if isinstance(v, torch.Tensor):
        if v.dim() > 1:
            raise ValueError("shape arithmetic on tensors of rank > 1")
        return v.tolist()
    if isinstance(v, np.ndarray):
        if v.ndim > 1:
            raise ValueError("shape arithmetic on tensors of rank > 1")
        return v.tolist()
    return v


def static_array(v: Value) -> np.ndarray | None:
    """A shape value with no symbolic entry as a numpy array (None if it holds a SymInt)."""
    if isinstance(v, np.ndarray):
        return v
    flat = v if isinstance(v, list) else [v]
    if all(isinstance(i, (int, float)) and not isinstance(i, bool) for i in flat):
        return np.array(v)
    return None


def as_tensor_arg(v: Value, like: torch.Tensor) -> Any:
    """A list/number meeting a tensor: a Python scalar when it has one element, else a tensor."""
    if isinstance(v, list):
        return v[0] if len(v) == 1 else torch.tensor(v, dtype=like.dtype)
    return v


def scalar(v: Value, default: float | None = None) -> float | None:
    if v is None:
        return default
    if isinstance(v, torch.Tensor):
        return v.item()
    return v[0] if isinstance(v, list) else v


def _spread(v: Value, n: int) -> list:
    v = v if isinstance(v, list) else [v]
    return v * n if len(v) == 1 else v


def _elementwise(fn: Callable, *vs: Value) -> Value:
    """fn over lists/numbers with length-1 broadcasting."""
    if not any(isinstance(v, list) for v in vs):
        return fn(*vs)
    n = max(len(v) for v in vs if isinstance(v, list))
    return [fn(*items) for items in zip(*(_spread(v, n) for v in vs))]


# ---------------------------------------------------------------- elementwise

def binary(torch_fn: Callable, list_fn: Callable, number_first: bool = True) -> Callable:
    """An elementwise op on tensors, or on lists/numbers; `number_first`: torch_fn accepts a
    Python number as its first argument (add, mul, ...; not maximum or comparisons)."""
    def op(a: Attrs, x: Value, y: Value) -> Value:
        if is_listy(x) and is_listy(y):
            return _elementwise(list_fn, as_list(x), as_list(y))
        if is_listy(x):
            x = as_tensor_arg(x, y)
            x = x if number_first or isinstance(x, torch.Tensor) else torch.tensor(x, dtype=y.dtype)
        if is_listy(y):
            y = as_tensor_arg(y, x)
        return torch_fn(x, y)

    return op


def _div(x: Any, y: Any) -> Any:
    if isinstance(x, torch.Tensor) and not x.is_floating_point():
        return torch.div(x, y, rounding_mode="trunc")
    return torch.div(x, y)


def _list_div(x: Any, y: Any) -> Any:
    return x / y if isinstance(x, (float, torch.SymFloat)) or isinstance(y, (float, torch.SymFloat)) else x // y


def unary(torch_fn: Callable, list_fn: Callable | None = None) -> Callable:
    def op(a: Attrs, x: Value) -> Value:
        if is_listy(x) and list_fn is not None:
            return [list_fn(v) for v in x] if isinstance(x, list) else list_fn(x)
        return torch_fn(x)

    return op


def variadic(torch_fn: Callable, list_fn: Callable) -> Callable:
    def op(a: Attrs, *xs: Value) -> Value:
        out = xs[0]
        for x in xs[1:]:
            out = binary(torch_fn, list_fn, number_first=False)(a, out, x)
        return out

    return op


def _to_float(v: Any) -> Any:
    return v * 1.0 if isinstance(v, torch.SymInt) else float(v)


def _to_int(v: Any) -> Any:
    """int() would pin a symbolic batch to its traced value; keep (Sym)ints as they are."""
    if isinstance(v, (int, torch.SymInt)):
        return int(v) if isinstance(v, bool) else v
    return torch.sym_int(v) if isinstance(v, torch.SymFloat) else int(v)


def cast(a: Attrs, x: Value) -> Value:
    dtype = ONNX_DTYPES[a["to"]]
    if isinstance(x, np.ndarray):
        return x.astype(np.float64 if dtype.is_floating_point else np.int64)
    if is_listy(x):
        conv = _to_float if dtype.is_floating_point else (bool if dtype == torch.bool else _to_int)
        return [conv(v) for v in x] if isinstance(x, list) else conv(x)
    return x if x.dtype == dtype else x.to(dtype)


def where(a: Attrs, cond: Value, x: Value, y: Value) -> Value:
    if all(is_listy(v) for v in (cond, x, y)):
        return _elementwise(lambda c, u, w: u if c else w, cond, x, y)
    ref = next(v for v in (x, y, cond) if isinstance(v, torch.Tensor))
    cond = torch.tensor(cond, dtype=torch.bool) if is_listy(cond) else cond
    x, y = as_tensor_arg(x, ref), as_tensor_arg(y, ref)
    return torch.where(cond, x, y)


def clip(a: Attrs, x: Value, low: Value = None, high: Value = None) -> Value:
    low, high = scalar(low, a.get("min")), scalar(high, a.get("max"))
    if is_listy(x):  # shape arithmetic ("same" padding sizes: max(0, ...))
        return _elementwise(lambda v: clamp_size(v, low, high), as_list(x))
    if low is not None and high is not None:
        return F.hardtanh(x, low, high)
    if low == 0 and high is None:
        return torch.relu(x)
    return torch.clamp(x, low, high)


def clamp_size(v: Any, low: Any, high: Any) -> Any:
    """clamp on a size (None: no bound). Numbers keep Python's max/min (an int stays an int); a symbolic
    size takes sym_max/sym_min, which add no guard. Shared with graph.trace (TorchScript size arithmetic)."""
    symbolic = isinstance(v, (torch.SymInt, torch.SymFloat))
    upper, lower = (torch.sym_max, torch.sym_min) if symbolic else (max, min)
    v = v if low is None else upper(v, low)
    return v if high is None else lower(v, high)


def hard_sigmoid(a: Attrs, x: torch.Tensor) -> torch.Tensor:
    alpha, beta = a.get("alpha", 0.2), a.get("beta", 0.5)
    if math.isclose(alpha, 1 / 6, rel_tol=1e-5) and beta == 0.5:
        return F.hardsigmoid(x)
    return torch.clamp(x * alpha + beta, 0.0, 1.0)


def gelu(a: Attrs, x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate=a.get("approximate", "none"))


def softmax(fn: Callable) -> Callable:
    def op(a: Attrs, x: torch.Tensor) -> torch.Tensor:
        return fn(x, a.get("axis", -1))

    return op


def prelu(a: Attrs, x: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, x, x * slope)


# ---------------------------------------------------------------- layers

def _pads(a: Attrs, x: torch.Tensor, kernel: list[int], strides: list[int], dilations: list[int]) -> list[int]:
    """ONNX pads [b1, b2, .., e1, e2, ..], resolving auto_pad from the (static) spatial size."""
    n = len(kernel)
    mode = a.get("auto_pad", "NOTSET")
    if mode == "NOTSET":
        return list(a.get("pads", [0] * 2 * n))
    if mode == "VALID":
        return [0] * 2 * n
    begin, end = [], []
    for size, k, s, d in zip(x.shape[2:], kernel, strides, dilations):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        lower = mode == "SAME_LOWER"
        begin.append(large if lower else small)
        end.append(small if lower else large)
    return begin + end


def _symmetric(x: torch.Tensor, pads: list[int], value: float = 0.0) -> tuple[torch.Tensor, list[int]]:
    """Padding per spatial dim for a torch op; asymmetric pads become an explicit F.pad."""
    n = len(pads) // 2
    begin, end = pads[:n], pads[n:]
    if begin == end:
        return x, begin
    torch_pads = [p for b, e in zip(reversed(begin), reversed(end)) for p in (b, e)]
    return F.pad(x, torch_pads, value=value), [0] * n


CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def conv(a: Attrs, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    n = w.dim() - 2
    kernel = list(a.get("kernel_shape", w.shape[2:]))
    strides, dilations = list(a.get("strides", [1] * n)), list(a.get("dilations", [1] * n))
    x, padding = _symmetric(x, _pads(a, x, kernel, strides, dilations))
    return CONV[n](x, w, b, strides, padding, dilations, a.get("group", 1))


def conv_transpose(a: Attrs, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    n = w.dim() - 2
    if "output_shape" in a or a.get("auto_pad", "NOTSET") != "NOTSET":
        raise UnsupportedForm("ConvTranspose with output_shape or auto_pad")
    strides, dilations = list(a.get("strides", [1] * n)), list(a.get("dilations", [1] * n))
    pads = list(a.get("pads", [0] * 2 * n))
    begin, end = pads[:n], pads[n:]
    out = CONV_T[n](x, w, b, strides, 0, list(a.get("output_padding", [0] * n)), a.get("group", 1), dilations)
    if any(begin) or any(end):
        index = [slice(None), slice(None)] + [slice(p, out.shape[2 + i] - q) for i, (p, q) in enumerate(zip(begin, end))]
        out = out[tuple(index)]
    return out


def gemm(a: Attrs, x: torch.Tensor, w: torch.Tensor, c: Value = None) -> torch.Tensor:
    x = x.t() if a.get("transA", 0) else x
    w = w.t() if a.get("transB", 0) else w
    y = torch.matmul(x, w)
    if a.get("alpha", 1.0) != 1.0:
        y = y * a["alpha"]
    if c is not None:
        y = y + (c * a["beta"] if a.get("beta", 1.0) != 1.0 else c)
    return y


def linear(a: Attrs, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """Not an ONNX op: Gemm and MatMul+Add with constant weights, rewritten (see onnx_program)."""
    return F.linear(x, w, b)


def batch_norm(a: Attrs, x, scale, bias, mean, var, outputs: int = 1) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Inference mode with running statistics; training mode normalises with the input's own statistics
    (nf-nets standardise their weights so) and can also give the updated running mean and variance."""
    eps = a.get("epsilon", 1e-5)
    if not a.get("training_mode", 0):
        return F.batch_norm(x, mean, var, scale, bias, False, 0.0, eps)
    y = F.batch_norm(x, None, None, scale, bias, True, 0.0, eps)
    if outputs == 1:
        return y
    axes = [d for d in range(x.dim()) if d != 1]
    momentum = a.get("momentum", 0.9)
    current_var, current_mean = torch.var_mean(x, axes, correction=0)
    return y, mean * momentum + current_mean * (1 - momentum), var * momentum + current_var * (1 - momentum)


def layer_norm(a: Attrs, x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    axis = a.get("axis", -1) % x.dim()
    return F.layer_norm(x, list(x.shape[axis:]), scale, bias, a.get("epsilon", 1e-5))


def instance_norm(a: Attrs, x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.instance_norm(x, weight=scale, bias=bias, eps=a.get("epsilon", 1e-5))


def max_pool(a: Attrs, x: torch.Tensor) -> torch.Tensor:
    kernel = list(a["kernel_shape"])
    n = len(kernel)
    strides, dilations = list(a.get("strides", [1] * n)), list(a.get("dilations", [1] * n))
    x, padding = _symmetric(x, _pads(a, x, kernel, strides, dilations), value=-math.inf)
    return MAX_POOL[n](x, kernel, strides, padding, dilations, ceil_mode=bool(a.get("ceil_mode", 0)))


def avg_pool(a: Attrs, x: torch.Tensor) -> torch.Tensor:
    kernel = list(a["kernel_shape"])
    n = len(kernel)
    strides = list(a.get("strides", [1] * n))
    pads = _pads(a, x, kernel, strides, [1] * n)
    include = bool(a.get("count_include_pad", 0))
    if pads[:n] != pads[n:] and not include:
        raise UnsupportedForm("AveragePool with asymmetric pads and count_include_pad=0")
    x, padding = _symmetric(x, pads)
    return AVG_POOL[n](x, kernel, strides, padding, bool(a.get("ceil_mode", 0)), include)


def global_avg_pool(a: Attrs, x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 4:
        return F.adaptive_avg_pool2d(x, 1)
    return x.mean(dim=list(range(2, x.dim())), keepdim=True)


def global_max_pool(a: Attrs, x: torch.Tensor) -> torch.Tensor:
    return x.amax(dim=list(range(2, x.dim())), keepdim=True)


def reduce(torch_fn: Callable, list_fn: Callable | None = None) -> Callable:
    def op(a: Attrs, x: Value, axes: Value = None) -> Value:
        axes = ints(axes) if axes is not None else a.get("axes")
        keep = bool(a.get("keepdims", 1))
        if is_listy(x) and list_fn is not None:
            return list_fn(as_list(x)) if not keep else [list_fn(as_list(x))]
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        return torch_fn(x, dim=list(axes), keepdim=keep)

    return op


# ---------------------------------------------------------------- shapes and indexing

def shape(a: Attrs, x: Value) -> list:
    dims = list(x.shape) if isinstance(x, (torch.Tensor, np.ndarray)) else [len(x)] if isinstance(x, list) else []
    start, end = a.get("start", 0), a.get("end")
    return dims[start:end]


def size(a: Attrs, x: torch.Tensor) -> Any:
    return math.prod(x.shape)


def _keep_batch(a: Attrs, dims: list, batched: bool) -> list:
    """A model exported with a fixed batch B0 bakes B0 into reshape/expand sizes; a leading B0
    (on a tensor that carries the batch, for reshapes) means 'the batch' again."""
    if a.fixed_batch and a.batch is not None and dims and batched and isinstance(dims[0], int) and dims[0] == a.fixed_batch:
        return [a.batch, *dims[1:]]
    return dims


def _batched(x: torch.Tensor) -> bool:
    return x.dim() > 0 and isinstance(x.shape[0], torch.SymInt)


def reshape(a: Attrs, x: Value, target: Value) -> Value:
    dims = ints(target)
    if is_listy(x):
        array = static_array(x)
        if array is not None and not (len(dims) == 1 and array.ndim <= 1):
            return _shape_value(array.reshape(dims))
        values = as_list(x)
        values = values if isinstance(values, list) else [values]  # a number (gcvit's window count) to [1]
        if dims == [] and len(values) == 1:
            return values[0]
        return values if dims in ([-1], [len(values)]) else _unsupported_shape_math("Reshape")
    if not a.get("allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(_keep_batch(a, dims, _batched(x)))


def _shape_value(array: np.ndarray) -> Value:
    """A numpy result of shape arithmetic in the usual form: a list for 1-D, a number for 0-D."""
    return array.tolist() if array.ndim <= 1 else array


def flatten(a: Attrs, x: torch.Tensor) -> torch.Tensor:
    """[d0..dn] -> [d0*..*d(axis-1), d(axis)*..*dn]."""
    axis = a.get("axis", 1)
    axis = axis + x.dim() if axis < 0 else axis
    if axis == 0:
        return x.reshape(1, -1)
    inner = x.flatten(axis) if axis < x.dim() else x.unsqueeze(-1)
    return inner if axis == 1 else inner.flatten(0, axis - 1)


def transpose(a: Attrs, x: torch.Tensor) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return _shape_value(x.transpose(a.get("perm")))
    perm = a.get("perm", list(reversed(range(x.dim()))))
    return x.permute(list(perm))


def concat(a: Attrs, *xs: Value) -> Value:
    xs = [x for x in xs if x is not None]
    if any(is_listy(x) for x in xs):
        out: list = []
        for x in xs:
            v = as_list(x)
            out.extend(v if isinstance(v, list) else [v])
        return out
    return torch.cat(xs, a.get("axis", 0)) if len(xs) > 1 else xs[0]


def split(a: Attrs, x: torch.Tensor, sizes: Value = None, *, outputs: int) -> tuple:
    axis = a.get("axis", 0)
    sizes = ints(sizes) if sizes is not None else a.get("split")
    if sizes is None:
        total = x.shape[axis]
        chunk = -(-total // (a.get("num_outputs") or outputs))
        sizes = [min(chunk, total - i) for i in range(0, total, chunk)]
    return torch.split(x, list(sizes), axis)


def _index_list(starts, ends, axes, steps, rank) -> list:
    index = [slice(None)] * rank
    for s, e, ax, st in zip(starts, ends, axes, steps):
        index[ax] = slice(s, e, st)
    return index


def slice_(a: Attrs, x: Value, starts: Value = None, ends: Value = None, axes: Value = None, steps: Value = None) -> Value:
    starts = ints(starts) if starts is not None else list(a["starts"])
    ends = ints(ends) if ends is not None else list(a["ends"])
    rank = x.dim() if isinstance(x, torch.Tensor) else x.ndim if isinstance(x, np.ndarray) else 1
    axes = [ax % rank for ax in (ints(axes) if axes is not None else a.get("axes", range(len(starts))))]
    steps = ints(steps) if steps is not None else [1] * len(starts)
    if isinstance(x, np.ndarray):
        return _shape_value(x[tuple(_index_list(starts, ends, axes, steps, rank))])
    if is_listy(x):
        return as_list(x)[_index_list(starts, ends, axes, steps, 1)[0]]
    for i, (ax, st) in enumerate(zip(axes, steps)):
        if st < 0:  # torch slices forward only: reverse the axis and slice it forward
            x, starts[i], ends[i], steps[i] = x.flip(ax), *_reversed_range(starts[i], ends[i], st, x.shape[ax])
    ends = [min(e, x.shape[ax]) if isinstance(x.shape[ax], int) else e for e, ax in zip(ends, axes)]
    ends = [None if e >= 2**62 else e for e in ends]
    return x[tuple(_index_list(starts, ends, axes, steps, rank))]


def _reversed_range(start: int, end: int, step: int, n: int) -> tuple[int, int, int]:
    """ONNX's backward slice start:end:step (step < 0) of an axis of size n, as a forward slice
    of the flipped axis: (start, end, step) there."""
    start = min(start + n if start < 0 else start, n - 1)
    end = -1 if end < -n else max(end + n if end < 0 else end, -1)
    end = min(end, n - 1)
    return n - 1 - start, n - 1 - end, -step


def gather(a: Attrs, x: Value, indices: Value) -> Value:
    axis = a.get("axis", 0)
    if is_listy(x):
        xs, idx = as_list(x), as_list(indices)
        return [xs[i] for i in idx] if isinstance(idx, list) else xs[idx]
    if isinstance(indices, int):
        return x.select(axis, indices)
    idx = indices if isinstance(indices, torch.Tensor) else torch.tensor(indices)
    size_ = x.shape[axis]
    idx = torch.where(idx < 0, idx + size_, idx)
    picked = x.index_select(axis, idx.reshape(-1))
    return picked.reshape(*x.shape[:axis], *idx.shape, *x.shape[axis + 1:]) if idx.dim() != 1 else picked


def gather_nd(a: Attrs, x: torch.Tensor, indices: Value) -> torch.Tensor:
    """x[i0, i1, ..] for the index tuples in the last axis of `indices` (batch_dims = 0)."""
    if a.get("batch_dims", 0):
        raise UnsupportedForm("GatherND with batch_dims > 0")
    idx = indices if isinstance(indices, torch.Tensor) else torch.tensor(indices)
    return x[tuple(idx[..., i] for i in range(idx.shape[-1]))]


def squeeze(a: Attrs, x: Value, axes: Value = None) -> Value:
    axes = ints(axes) if axes is not None else a.get("axes")
    if is_listy(x):
        v = as_list(x)
        return v[0] if isinstance(v, list) else v
    if axes is None:
        axes = [i for i, d in enumerate(x.shape) if isinstance(d, int) and d == 1]
    return x.squeeze(tuple(ax % x.dim() for ax in axes))


def unsqueeze(a: Attrs, x: Value, axes: Value = None) -> Value:
    axes = ints(axes) if axes is not None else list(a["axes"])
    if is_listy(x):
        v = as_list(x)
        if not isinstance(v, list):
            return [v]
        if not all(isinstance(i, (int, float)) for i in v):
            return _unsupported_shape_math("Unsqueeze")
        x = torch.tensor(v)  # a static 1-D value (Range of fixed sizes: xcit's positions) made 2-D
    rank = x.dim() + len(axes)
    for ax in sorted(ax % rank for ax in axes):
        x = x.unsqueeze(ax)
    return x


def expand(a: Attrs, x: Value, target: Value) -> torch.Tensor:
    """Bidirectional broadcast of x to `target` (ONNX Expand)."""
    dims = _keep_batch(a, ints(target), True)
    if is_listy(x):
        x = torch.tensor(as_list(x))
    dims = [1] * (x.dim() - len(dims)) + dims
    new = len(dims) - x.dim()
    return x.expand(*[d if i < new or not (isinstance(d, int) and d == 1) else -1 for i, d in enumerate(dims)])


def tile(a: Attrs, x: torch.Tensor, repeats: Value) -> torch.Tensor:
    return x.repeat(ints(repeats))


def pad(a: Attrs, x: torch.Tensor, pads: Value = None, value: Value = None, axes: Value = None) -> torch.Tensor:
    pads = ints(pads) if pads is not None else list(a["pads"])
    n = len(pads) // 2
    axes = [ax % x.dim() for ax in ints(axes)] if axes is not None else list(range(x.dim()))[-n:] if n < x.dim() else list(range(x.dim()))
    per_axis = {ax: (pads[i], pads[i + n]) for i, ax in enumerate(axes)}
    last = max(per_axis)
    torch_pads = [p for ax in range(last, min(per_axis) - 1, -1) for p in per_axis.get(ax, (0, 0))]
    mode = a.get("mode", "constant")
    if mode == "constant":
        return F.pad(x, torch_pads, value=scalar(value, a.get("value", 0.0)))
    return F.pad(x, torch_pads, mode={"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode])


def constant_of_shape(a: Attrs, dims: Value) -> Value:
    value = a.get("value")  # a numpy array
    fill = value.reshape(-1)[0].item() if value is not None else 0.0
    dtype = getattr(torch, value.dtype.name) if value is not None else torch.float32
    dims = ints(dims)
    if len(dims) == 1 and isinstance(dims[0], int) and dims[0] <= 8 and not dtype.is_floating_point:
        return [int(fill)] * dims[0]
    return torch.full(dims, fill, dtype=dtype)


def range_(a: Attrs, start: Value, limit: Value, delta: Value) -> Value:
    start, limit, delta = scalar(start), scalar(limit), scalar(delta)
    if all(isinstance(v, int) for v in (start, limit, delta)) and (limit - start) // delta <= 8:
        return list(range(start, limit, delta))
    return torch.arange(start, limit, delta)


INTERPOLATION = {  # (mode, coordinate_transformation_mode) -> (torch mode, align_corners)
    ("linear", "half_pixel"): ("linear", False), ("linear", "pytorch_half_pixel"): ("linear", False),
    ("linear", "align_corners"): ("linear", True), ("cubic", "half_pixel"): ("cubic", False),
    ("cubic", "pytorch_half_pixel"): ("cubic", False), ("cubic", "align_corners"): ("cubic", True),
    ("nearest", "asymmetric"): ("nearest", None),
}
TORCH_MODES = {("linear", 3): "linear", ("linear", 4): "bilinear", ("linear", 5): "trilinear", ("cubic", 4): "bicubic",
               ("nearest", 3): "nearest", ("nearest", 4): "nearest", ("nearest", 5): "nearest"}


def resize(a: Attrs, x: torch.Tensor, roi: Value = None, scales: Value = None, sizes: Value = None) -> torch.Tensor:
    """ONNX Resize of the spatial axes as F.interpolate (the forms torch.onnx writes)."""
    mode, coords = a.get("mode", "nearest"), a.get("coordinate_transformation_mode", "half_pixel")
    nearest_mode = a.get("nearest_mode", "round_prefer_floor")
    if a.get("antialias", 0) or a.get("axes") is not None or (mode == "nearest" and nearest_mode != "floor"):
        raise UnsupportedForm(f"Resize with mode {mode!r}, nearest_mode {nearest_mode!r}, antialias or axes")
    if (mode, coords) not in INTERPOLATION or (mode, x.dim()) not in TORCH_MODES:
        raise UnsupportedForm(f"Resize with mode {mode!r} and coordinate_transformation_mode {coords!r} on {x.dim()}-D input")
    if mode == "cubic" and not math.isclose(a.get("cubic_coeff_a", -0.75), -0.75):
        raise UnsupportedForm("Resize with cubic_coeff_a other than -0.75")
    align = INTERPOLATION[mode, coords][1]
    sizes_ = ints(sizes) if sizes is not None and not (isinstance(sizes, torch.Tensor) and sizes.numel() == 0) else []
    scales_ = [float(v) for v in ints_or_floats(scales)] if scales is not None and not sizes_ else []
    if sizes_:
        if any(isinstance(d, int) and isinstance(s, int) and d != s for d, s in zip(sizes_[:2], x.shape[:2])):
            raise UnsupportedForm("Resize of the batch or channel axis")
        kwargs: dict = {"size": list(sizes_[2:])}
    elif scales_:
        if scales_[:2] != [1.0, 1.0]:
            raise UnsupportedForm("Resize of the batch or channel axis")
        kwargs = {"scale_factor": scales_[2:], "recompute_scale_factor": False}
    else:
        raise UnsupportedForm("Resize without scales or sizes")
    return F.interpolate(x, mode=TORCH_MODES[mode, x.dim()], align_corners=align, **kwargs)


def ints_or_floats(v: Value) -> list:
    if isinstance(v, torch.Tensor):
        return v.reshape(-1).tolist()
    return list(v) if isinstance(v, (list, tuple, np.ndarray)) else [v]


def cumsum(a: Attrs, x: Value, axis: Value) -> torch.Tensor:
    """Running sums along `axis` (edgenext's Fourier positional encoding); `exclusive` leaves each
    element out of its own sum, `reverse` runs from the end."""
    x = x if isinstance(x, torch.Tensor) else torch.tensor(x)
    dim, reverse = int(scalar(axis)), a.get("reverse", 0)
    x = x.flip(dim) if reverse else x
    out = x.cumsum(dim)
    out = out - x if a.get("exclusive", 0) else out
    return out.flip(dim) if reverse else out


def one_hot(a: Attrs, indices: Value, depth: Value, values: Value) -> torch.Tensor:
    """values[1] where the new `axis` equals the index (negative ones count from the end), values[0]
    elsewhere; an index outside [-depth, depth) gives a row of values[0], as ONNX defines. On shape
    arithmetic (the legacy exporter spells `repeat(1, B, ...)` as a Tile by a one-hot of [1, B]) it stays
    shape arithmetic."""
    n, axis = int(scalar(depth)), a.get("axis", -1)
    static = static_array(indices) if is_listy(indices) else None
    if static is not None and is_listy(values):
        off, on = as_list(values)
        index = np.where(static < 0, static + n, static)
        hot = np.moveaxis(index[..., None] == np.arange(n), -1, axis if axis >= 0 else axis + index.ndim + 1)
        return _shape_value(np.where(hot, np.array(on, dtype=object), np.array(off, dtype=object)))
    indices = (indices if isinstance(indices, torch.Tensor) else torch.tensor(indices)).long()
    values = values if isinstance(values, torch.Tensor) else torch.tensor(values)
    indices = torch.where(indices < 0, indices + n, indices)
    hot = indices.unsqueeze(-1) == torch.arange(n, device=indices.device)
    hot = hot.movedim(-1, axis if axis >= 0 else axis + hot.dim())
    return torch.where(hot, values[1], values[0])


def identity(a: Attrs, x: Value) -> Value:
    return x


def dropout(a: Attrs, x: Value, *rest: Value) -> Value:
    return x


def einsum(a: Attrs, *xs: torch.Tensor) -> torch.Tensor:
    return torch.einsum(a["equation"], *xs)


def _unsupported_shape_math(op: str):
    raise UnsupportedForm(f"{op} on shape values of this form")


def _bool(fn: Callable) -> Callable:
    return lambda x, y: bool(fn(x, y))


OPS: dict[str, Callable] = {
    "Add": binary(torch.add, operator.add),
    "Sub": binary(torch.sub, operator.sub),
    "Mul": binary(torch.mul, operator.mul),
    "Div": binary(_div, _list_div),
    "Pow": binary(torch.pow, operator.pow),
    "Mod": binary(torch.remainder, operator.mod),
    "Equal": binary(torch.eq, _bool(operator.eq), False),
    "Less": binary(torch.lt, _bool(operator.lt), False),
    "LessOrEqual": binary(torch.le, _bool(operator.le), False),
    "Greater": binary(torch.gt, _bool(operator.gt), False),
    "GreaterOrEqual": binary(torch.ge, _bool(operator.ge), False),
    "And": binary(torch.logical_and, _bool(lambda x, y: x and y), False),
    "Or": binary(torch.logical_or, _bool(lambda x, y: x or y), False),
    "Max": variadic(torch.maximum, max),
    "Min": variadic(torch.minimum, min),
    "Sum": variadic(torch.add, operator.add),
    "Not": unary(torch.logical_not, lambda v: not v),
    "Neg": unary(torch.neg, operator.neg),
    "Abs": unary(torch.abs, abs),
    "Sqrt": unary(torch.sqrt, math.sqrt),
    "Exp": unary(torch.exp, math.exp),
    "Log": unary(torch.log, math.log),
    "Reciprocal": unary(torch.reciprocal, lambda v: 1.0 / v),
    "Floor": unary(torch.floor, math.floor),
    "Ceil": unary(torch.ceil, math.ceil),
    "Erf": unary(torch.erf, math.erf),
    "Relu": unary(torch.relu),
    "Sigmoid": unary(torch.sigmoid),
    "Tanh": unary(torch.tanh),
    "HardSwish": unary(F.hardswish),
    "Softplus": unary(F.softplus),
    "Sin": unary(torch.sin, math.sin),
    "Cos": unary(torch.cos, math.cos),
    "LeakyRelu": lambda a, x: F.leaky_relu(x, a.get("alpha", 0.01)),
    "Elu": lambda a, x: F.elu(x, a.get("alpha", 1.0)),
    "Selu": lambda a, x: F.selu(x),
    "Celu": lambda a, x: F.celu(x, a.get("alpha", 1.0)),
    "HardSigmoid": hard_sigmoid,
    "Gelu": gelu,
    "PRelu": prelu,
    "Clip": clip,
    "Cast": cast,
    "CastLike": lambda a, x, like: cast(Attrs(to={v: k for k, v in ONNX_DTYPES.items()}[like.dtype]), x),
    "Where": where,
    "Softmax": softmax(torch.softmax),
    "LogSoftmax": softmax(torch.log_softmax),
    "Conv": conv,
    "ConvTranspose": conv_transpose,
    "Gemm": gemm,
    "MatMul": lambda a, x, y: torch.matmul(x, y),
    "Linear": linear,
    "Silu": unary(F.silu),
    "Einsum": einsum,
    "BatchNormalization": batch_norm,
    "LayerNormalization": layer_norm,
    "InstanceNormalization": instance_norm,
    "MaxPool": max_pool,
    "AveragePool": avg_pool,
    "GlobalAveragePool": global_avg_pool,
    "GlobalMaxPool": global_max_pool,
    "ReduceMean": reduce(torch.mean),
    "ReduceSum": reduce(torch.sum, sum),
    "ReduceMax": reduce(torch.amax, max),
    "ReduceMin": reduce(torch.amin, min),
    "ReduceProd": reduce(lambda x, dim, keepdim: x.prod(dim[0], keepdim=keepdim), math.prod),
    "ReduceL1": reduce(lambda x, dim, keepdim: torch.linalg.vector_norm(x, 1, dim=dim, keepdim=keepdim)),
    "ReduceL2": reduce(lambda x, dim, keepdim: torch.linalg.vector_norm(x, 2, dim=dim, keepdim=keepdim)),
    "ReduceSumSquare": reduce(lambda x, dim, keepdim: (x * x).sum(dim, keepdim=keepdim)),
    "Shape": shape,
    "Size": size,
    "Reshape": reshape,
    "Flatten": flatten,
    "Transpose": transpose,
    "Concat": concat,
    "Split": split,
    "Slice": slice_,
    "Gather": gather,
    "GatherND": gather_nd,
    "Squeeze": squeeze,
    "Unsqueeze": unsqueeze,
    "Expand": expand,
    "Tile": tile,
    "Pad": pad,
    "ConstantOfShape": constant_of_shape,
    "Range": range_,
    "CumSum": cumsum,
    "OneHot": one_hot,
    "Identity": identity,
    "Resize": resize,
    "Dropout": dropout,
}
MULTI_OUTPUT = {"Split", "BatchNormalization"}
SYNTHETIC = {"Linear", "Silu"}  # written by onnx_program's rewrites, not ONNX ops
