"""ONNX -> canonical graph: an nn.Module that interprets the ONNX nodes with torch calls,
traced by torch.export with a dynamic batch (so shape arithmetic on the batch stays symbolic
and everything else folds to constants), then normalised like any other model."""
from __future__ import annotations

from pathlib import Path

import onnx
import torch
import torch.fx.traceback as fx_traceback
from torch import fx, nn

from ..errors import UsageError
from .canonical import from_exported
from .naming import module_scopes
from .onnx_program import Program, load_program, parameter_names, run_node
from .trace import export_batch_dynamic


class OnnxModule(nn.Module):
    """Runs a `Program`: weights are parameters/buffers under their layer names, other
    constants stay plain tensors (folded into the graph as constants when traced)."""

    def __init__(self, program: Program):
        super().__init__()
        self._program = program
        self._paths = parameter_names(program)
        # Resize's scales as numbers, read here: a float tensor read while torch.export traces is data-dependent
        self._numbers = {name: program.consts[name].tolist() for node in program.nodes if node.op == "Resize"
                         for name in node.inputs[1:3] if name in program.consts}
        for name, (path, is_buffer) in self._paths.items():
            value = program.consts[name]
            _set(self, path, value if is_buffer else nn.Parameter(value, requires_grad=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        program = self._program  # constants stay in the program: tensor attributes would be traced
        env = {n: _python_value(v) for n, v in program.consts.items() if n not in self._paths}
        env.update({name: self.get_buffer(path) if buf else self.get_parameter(path) for name, (path, buf) in self._paths.items()})
        env.update(self._numbers)
        env[program.input] = x
        for node in program.nodes:
            values = [env[name] if name else None for name in node.inputs]
            with fx_traceback.annotate({"xai_scope": node.scope}):
                outputs = run_node(program, node, values, batch=x.shape[0])
            env.update(zip(node.outputs, outputs))
        return env[program.output]


def _python_value(value: torch.Tensor):
    """Small integer constants (shapes, axes, indices) and one-element float constants as
    Python values: torch.export fakes tensors, and shape arguments must stay readable; the
    graph then reads `mul(x, 0.5)` rather than a lifted tensor constant."""
    small_int = not value.is_floating_point() and value.numel() <= 64
    if value.dim() <= 1 and (small_int or value.numel() == 1):
        return value.tolist()
    return value


def _set(root: nn.Module, path: str, value: torch.Tensor) -> None:
    *parents, leaf = path.split(".")
    module = root
    for part in parents:
        if not hasattr(module, part):
            module.add_module(part, nn.Module())
        module = getattr(module, part)
    if isinstance(value, nn.Parameter):
        module.register_parameter(leaf, value)
    else:
        module.register_buffer(leaf, value)


def from_onnx(model: onnx.ModelProto | str | Path, example: torch.Tensor | None = None) -> fx.GraphModule:
    """Convert an ONNX classifier (opset 13-21) to the canonical graph. `example` fixes the
    non-batch input size where the ONNX input leaves it symbolic."""
    program = load_program(model)
    module = OnnxModule(program)
    with fx_traceback.preserve_node_meta():
        ep = export_batch_dynamic(module, _example(program, example))
    return from_exported(ep, module_scopes)


def _example(program: Program, example: torch.Tensor | None) -> torch.Tensor:
    if example is not None:
        return example
    dims = program.input_shape[1:]
    if not dims or any(d is None for d in dims):
        raise UsageError(f"the ONNX input {program.input!r} has symbolic sizes {program.input_shape}; pass an example input")
    return torch.zeros(2, *dims)
