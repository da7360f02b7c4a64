"""Eager/timm and TorchScript models -> canonical graph, through torch.export with a dynamic batch."""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import torch
from torch import fx, nn
from torch.export import Dim, ExportedProgram

from ..errors import UsageError
from .canonical import from_exported
from .naming import module_scopes, param_scopes


def from_module(module: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """Export an eager module (in eval mode; its own mode is restored) for inputs shaped like
    `example` with any batch size."""
    with _eval(module):
        ep = export_batch_dynamic(module, example)
    return from_exported(ep, module_scopes)


def from_torchscript(module: torch.jit.ScriptModule, example: torch.Tensor) -> fx.GraphModule:
    """Convert a (loaded) TorchScript module with torch's TS2EPConverter, traced with a dynamic
    batch. Layers are named by parameter owners (see `naming`)."""
    example = _batch_of_two(example)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = _converter()(module, (example,)).convert()
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"could not convert the TorchScript model to a torch graph: {_first_line(exc)}") from exc
    gm = from_exported(ep, param_scopes)
    _restore_parameters(gm, {name for name, _ in module.named_parameters()})
    return gm


def _converter() -> type:
    from torch._export.converter import TS2EPConverter

    class BatchDynamic(TS2EPConverter):
        """torch's converter retraces with every dimension dynamic; we want the batch only."""

        def retrace_as_exported_program(self, gm: fx.GraphModule, name_to_constant: dict) -> ExportedProgram:
            return export_batch_dynamic(gm, self.sample_args[0])

    return BatchDynamic


def _restore_parameters(gm: fx.GraphModule, names: set[str]) -> None:
    """The converter turns parameters into buffers; make the model's parameters parameters again."""
    for name in names & {n for n, _ in gm.named_buffers()}:
        owner, _, leaf = name.rpartition(".")
        module = gm.get_submodule(owner)
        module.register_parameter(leaf, nn.Parameter(module._buffers.pop(leaf), requires_grad=False))


def export_batch_dynamic(module: nn.Module, example: torch.Tensor) -> ExportedProgram:
    """torch.export with dim 0 of the single input symbolic (other dims fixed to the example's)."""
    example = _batch_of_two(example)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(module, (example,), dynamic_shapes=({0: Dim("batch")},), strict=False)
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"torch.export could not trace the model with a dynamic batch: {_first_line(exc)}") from exc


def _batch_of_two(example: torch.Tensor) -> torch.Tensor:
    """Export specialises sizes 0 and 1, so trace with a batch of at least two."""
    example = example.detach()
    return example if len(example) >= 2 else example[:1].expand(2, *example.shape[1:]).clone()


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
