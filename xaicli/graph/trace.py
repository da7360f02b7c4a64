"""Eager/timm and TorchScript models -> canonical graph, through torch.export with a dynamic batch."""
from __future__ import annotations

import contextlib
import io
import logging
import math
import operator
import sys
import threading
import warnings
from typing import Any, Iterator

import torch
from torch import fx, nn
from torch.export import Dim, ExportedProgram

from ..errors import UsageError
from .batch import mark_fixed
from .canonical import from_exported
from .naming import module_scopes, param_scopes
from .onnx_ops import clamp_size


def from_module(module: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """Export an eager module (in eval mode; its own mode is restored) for inputs shaped like
    `example` with any batch size."""
    with _eval(module):
        ep = export_batch_dynamic(module, example)
    gm = from_exported(ep, module_scopes)
    mark_fixed(gm)
    return gm


def from_torchscript(module: torch.jit.ScriptModule, example: torch.Tensor) -> fx.GraphModule:
    """Convert a (loaded) TorchScript module with torch's TS2EPConverter, traced with a dynamic
    batch. Layers are named by parameter owners (see `naming`).

    The converter takes traced modules; on scripted ones (control flow, typed attributes) it fails, so
    a module it refuses is traced first, through a wrapper that calls it on the example (which fixes
    its branches to those the example takes; `convert.to_graph` checks the result against the model)."""
    example = _batch_of_two(example)
    hint = "; a model saved with torch.jit.trace rather than torch.jit.script converts more often"
    try:
        ep, scopes, prefix = _convert(module, example), param_scopes, ""
    except UsageError as exc:  # torch.export failed on the converted program
        raise UsageError(f"{exc}{hint}") from exc
    except Exception as exc:
        try:
            ep, scopes, prefix = _convert(_traced(module, example), example), _unwrapped_scopes, _WRAPPER + "."
        except Exception:
            raise UsageError(f"could not convert the TorchScript model to a torch graph: {_first_line(exc)}{hint}") from exc
    gm = from_exported(ep, scopes)
    _restore_parameters(gm, {prefix + name for name, _ in module.named_parameters()})
    mark_fixed(gm)
    return gm


_WRAPPER = "scripted"


class _Calls(nn.Module):
    """A module whose forward calls the TorchScript module (held as `scripted`)."""

    def __init__(self, scripted: torch.jit.ScriptModule):
        super().__init__()
        self.scripted = scripted

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scripted(x)


def _traced(module: torch.jit.ScriptModule, example: torch.Tensor) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(_Calls(module), (example,), check_trace=False)


def _unwrapped_scopes(graph: fx.Graph) -> dict[fx.Node, str]:
    """`param_scopes` without the wrapper's attribute name in front."""
    strip = len(_WRAPPER) + 1
    return {node: scope[strip:] if scope.startswith(_WRAPPER + ".") else "" if scope == _WRAPPER else scope
            for node, scope in param_scopes(graph).items()}


def _convert(module: torch.jit.ScriptModule, example: torch.Tensor) -> ExportedProgram:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _converter()(module, (example,)).convert()


def _converter() -> type:
    from torch._export.converter import TS2EPConverter

    class BatchDynamic(TS2EPConverter):
        """torch's converter retraces with every dimension dynamic; we want the batch only."""

        def retrace_as_exported_program(self, gm: fx.GraphModule, name_to_constant: dict) -> ExportedProgram:
            return export_batch_dynamic(_sizes_as_ints(gm), self.sample_args[0])

    return BatchDynamic


_ATEN = torch.ops.aten
# integer tensor ops TorchScript's traced size arithmetic becomes (NumToTensor), as int ops
_INT_OPS = {_ATEN.mul.Tensor: operator.mul, _ATEN.mul.Scalar: operator.mul, _ATEN.add.Tensor: operator.add,
            _ATEN.add.Scalar: operator.add, _ATEN.sub.Tensor: operator.sub, _ATEN.sub.Scalar: operator.sub,
            _ATEN.floor_divide.default: operator.floordiv, _ATEN.floor_divide.Scalar: operator.floordiv,
            _ATEN.remainder.Scalar: operator.mod, _ATEN.remainder.Tensor: operator.mod,
            # the float steps of "same" padding sizes, ceil(H / s) (maxvit's stem): exact on these small numbers
            _ATEN.div.Tensor: operator.truediv, _ATEN.div.Scalar: operator.truediv, _ATEN.ceil.default: math.ceil,
            _ATEN.floor.default: math.floor}

_READ_BACK = {_ATEN._local_scalar_dense.default, _ATEN.ScalarImplicit.default}  # tensor.item() and implicit

# scripted size arithmetic: aten's scalar overloads (`aten.mul.int`) cast a symbolic size to a plain int,
# which pins the batch; Python's operators keep it symbolic
_SCALAR_OPS = {"mul": operator.mul, "add": operator.add, "sub": operator.sub, "floordiv": operator.floordiv,
               "div": operator.truediv, "remainder": operator.mod, "neg": operator.neg, "ceil": math.ceil,
               "floor": math.floor, "eq": operator.eq, "ne": operator.ne, "lt": operator.lt, "le": operator.le,
               "gt": operator.gt, "ge": operator.ge}


def _sizes_as_ints(gm: fx.GraphModule) -> fx.GraphModule:
    """Size arithmetic of a traced TorchScript model reaches the converter as 0-d int64 tensor ops
    read back by `.item()` (`reshape(B*4, n, -1)` in mobilevit, `H // 7` in twins); torch.export
    makes each `.item()` an unbacked size and fails on a guard. Recompute those sizes as int ops
    on the symbolic sizes (exact for integers), leaving every tensor op in place. A scripted model's
    sizes come as aten's scalar overloads (`aten.mul.int`), which cast to int and pin the batch: those
    become Python's operators."""
    ints: dict[fx.Node, Any] = {}

    def as_int(arg: Any) -> Any:
        if isinstance(arg, fx.Node):
            if arg in ints:
                return ints[arg]
            if arg.op == "call_function" and arg.target in (_ATEN.sym_size, _ATEN.sym_size.int):
                return arg
            value = getattr(gm, arg.target, None) if arg.op == "get_attr" else None
            if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point() \
                    and value.dtype != torch.bool:
                return int(value)
            raise LookupError
        if isinstance(arg, int) and not isinstance(arg, bool):
            return arg
        raise LookupError

    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if _on_scalars(node.target) and node.target.__name__.split(".")[0] in _SCALAR_OPS:
            node.target = _SCALAR_OPS[node.target.__name__.split(".")[0]]
            continue
        try:
            with graph.inserting_before(node):
                if node.target in (_ATEN.scalar_tensor, _ATEN.scalar_tensor.default) and _integral(node, torch.float32):
                    ints[node] = as_int(node.args[0])
                elif node.target == _ATEN._to_copy.default and _integral(node, torch.int64):  # no dtype: the input's
                    ints[node] = graph.call_function(_whole, (as_int(node.args[0]),))
                elif node.target == _ATEN.clamp.default:
                    bounds = [*node.args[1:3], None, None][:2]
                    low, high = (node.kwargs.get(k, b) for k, b in zip(("min", "max"), bounds))
                    ints[node] = graph.call_function(clamp_size, (as_int(node.args[0]), *(None if b is None else as_int(b)
                                                                                    for b in (low, high))))
                elif node.target == _ATEN.rsub.Scalar and _alpha(node) == 1:  # other - self
                    ints[node] = graph.call_function(operator.sub, (as_int(node.args[1]), as_int(node.args[0])))
                elif node.target in _INT_OPS and _alpha(node) == 1:
                    ints[node] = graph.call_function(_INT_OPS[node.target], tuple(as_int(a) for a in node.args[:2]))
                elif node.target in _READ_BACK and node.args[0] in ints:
                    _replace_uses(node, ints[node.args[0]])
        except LookupError:
            continue
    graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _on_scalars(target: Any) -> bool:
    """An aten overload whose arguments are all numbers (`aten.mul.int`, `aten.ceil.float`)."""
    if not isinstance(target, torch._ops.OpOverload):
        return False
    arguments = target._schema.arguments
    return bool(arguments) and all(str(a.type) in ("int", "float", "number", "Scalar", "bool") for a in arguments)


def _integral(node: fx.Node, default: torch.dtype) -> bool:
    """The op's `dtype` argument (else `default`) is an integer type."""
    dtype = node.kwargs.get("dtype") or default
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def _whole(v: Any) -> Any:
    """A cast to an integer dtype: ints (symbolic ones too) as they are, floats truncated like torch's cast."""
    return v if isinstance(v, (int, torch.SymInt)) else int(v)


def _alpha(node: fx.Node) -> Any:
    return node.kwargs.get("alpha", node.args[2] if len(node.args) > 2 else 1)


def _replace_uses(node: fx.Node, value: Any) -> None:
    """Every use of `node` reads `value` (a node or a plain int) instead."""
    for user in list(node.users):
        user.args = fx.node.map_arg(user.args, lambda n: value if n is node else n)
        user.kwargs = fx.node.map_arg(user.kwargs, lambda n: value if n is node else n)


def _restore_parameters(gm: fx.GraphModule, names: set[str]) -> None:
    """The converter turns parameters into buffers; make the model's parameters parameters again."""
    for name in names & {n for n, _ in gm.named_buffers()}:
        owner, _, leaf = name.rpartition(".")
        module = gm.get_submodule(owner)
        module.register_parameter(leaf, nn.Parameter(module._buffers.pop(leaf), requires_grad=False))


def export_batch_dynamic(module: nn.Module, example: torch.Tensor) -> ExportedProgram:
    """torch.export with dim 0 of the single input symbolic (other dims fixed to the example's). A model
    that pins the batch to a number (torch.export: "Constraints violated") is exported at the example's
    batch instead; its graph then runs in padded chunks of that many rows (see `batch`)."""
    example = _batch_of_two(example)
    try:
        with _quiet():
            try:
                return torch.export.export(module, (example,), dynamic_shapes=({0: Dim("batch")},), strict=False)
            except Exception as exc:
                if "Constraints violated" not in str(exc):
                    raise
                return torch.export.export(module, (example,), strict=False)
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"torch.export could not trace the model: {_first_line(exc)}") from exc


def _batch_of_two(example: torch.Tensor) -> torch.Tensor:
    """Export specialises sizes 0 and 1, so trace with a batch of at least two."""
    example = example.detach()
    return example if len(example) >= 2 else example[:1].expand(2, *example.shape[1:]).clone()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No warnings, torch log records or stderr prints while tracing: a failed torch.export prints
    its partial graph to stderr (hundreds of lines) and logs symbolic_shapes' "Unable to find user
    code"; the cause reaches the user as one error. What a successful trace writes is passed on.
    One trace at a time (replica threads may build graphs together): sys.stderr is process-wide, and
    torch.export's own state is not safe across threads either."""
    loggers = [logging.getLogger(name) for name in _TORCH_LOGGERS]
    captured = io.StringIO()
    with _TRACING, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        levels = [logger.level for logger in loggers]
        for logger in loggers:
            logger.setLevel(logging.CRITICAL)
        try:
            with contextlib.redirect_stderr(captured):
                yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)
    sys.stderr.write(captured.getvalue())


_TRACING = threading.RLock()
_TORCH_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch.export", "torch._export", "torch._dynamo")


@contextlib.contextmanager
def _eval(module: nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
