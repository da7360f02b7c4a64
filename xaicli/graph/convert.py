"""Build a model's graph from its source (module, TorchScript or ONNX file) and check it against
the model's own forward. The Model caches the result (`Model.graph()`); this package never
imports xaicli.model: it receives only what it needs."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol

import torch
from torch import fx

from ..errors import UsageError
from .batch import run
from .onnx_convert import from_onnx
from .trace import from_module, from_torchscript

TOLERANCE = 1e-3  # max |graph - model| relative to max |logit| on the check input


class Source(Protocol):
    """What a graph is built from (`xaicli.model.GraphSource`): kind "module" or "torchscript"
    with `module`, kind "onnx" with `path`."""

    @property
    def kind(self) -> str: ...

    @property
    def module(self) -> torch.nn.Module | None: ...

    @property
    def path(self) -> Path | None: ...


def to_graph(source: Source, example: torch.Tensor, forward: Callable[[torch.Tensor], torch.Tensor],
             name: str) -> fx.GraphModule:
    """The canonical graph (see `xaicli.graph`) of `source` on `example`'s device, traced with
    `example` (a batch > 1: export needs it) and checked against `forward`, the model's own logits;
    UsageError naming model `name` if they disagree."""
    if source.kind == "onnx":
        assert source.path is not None
        gm = from_onnx(source.path, example.cpu()).to(example.device)
    elif source.kind == "torchscript":
        assert isinstance(source.module, torch.jit.ScriptModule)
        gm = from_torchscript(source.module, example)
    else:
        assert source.module is not None
        gm = from_module(source.module, example)
    _check(name, forward, gm, example)
    return gm


@torch.no_grad()
def _check(name: str, forward: Callable[[torch.Tensor], torch.Tensor], gm: fx.GraphModule, example: torch.Tensor) -> None:
    """A wrong graph would give silently wrong explanations: refuse it instead."""
    want = forward(example)
    got = run(gm, example)
    scale = want.abs().max().clamp_min(1e-12)
    error = ((got - want).abs().max() / scale).item() if got.shape == want.shape else float("inf")
    if not error <= TOLERANCE:
        raise UsageError(
            f"the torch graph of model {name} disagrees with the model "
            f"(relative error {error:.2g}, shapes {tuple(got.shape)} vs {tuple(want.shape)}); "
            "graph-based methods cannot explain it"
        )
