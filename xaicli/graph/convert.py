"""A Model's graph: pick the converter for its format, check the graph against the model once,
cache it on the Model."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import fx

from ..errors import UsageError
from ..model import Model
from .onnx_convert import from_onnx
from .trace import from_module, from_torchscript

CACHE = "_graph"  # instance attribute: dataclasses.replace(model, ...) copies fields, not this
TOLERANCE = 1e-3  # max |graph - model| relative to max |logit| on the check input


def graph_source(model: Model) -> torch.nn.Module | Path | None:
    """What the graph is built from: the torch module, else the ONNX file, else None."""
    if model.module is not None:
        return model.module
    path = model.extra.get("onnx_path") or model.source
    return Path(path) if path and str(path).lower().endswith(".onnx") else None

def to_graph(model: Model, example: torch.Tensor | None = None) -> fx.GraphModule:
    """The model's canonical graph (see `xaicli.graph`) on `model.device`, built on first use,
    checked against the model's own forward (UsageError if they disagree), then cached on the
    Model instance for as long as its source (module or ONNX file) stays the same."""
    source = graph_source(model)
    cached = getattr(model, CACHE, None)
    if cached is not None and (cached[0] is source or isinstance(source, Path) and cached[0] == source):
        return cached[1]
    example = _example(model) if example is None else example.to(model.device)
    if source is None:
        raise UsageError(f"model {model.source or model.name} has neither a torch module nor an ONNX file to build a graph from")
    if isinstance(source, Path):
        gm = from_onnx(source, example.cpu()).to(model.device)
    elif isinstance(source, torch.jit.ScriptModule):
        gm = from_torchscript(source, example)
    else:
        gm = from_module(source, example)
    _check(model, gm, example)
    setattr(model, CACHE, (source, gm))
    return gm


def _example(model: Model) -> torch.Tensor:
    """A fixed pseudo-random input of the model's size (batch 2: export needs a batch > 1)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, model.spec.channels, *model.spec.size, generator=generator)
    return x.to(model.device)


@torch.no_grad()
def _check(model: Model, gm: fx.GraphModule, example: torch.Tensor) -> None:
    """A wrong graph would give silently wrong explanations: refuse it instead."""
    want = model.predict(example)
    got = gm(example)
    scale = want.abs().max().clamp_min(1e-12)
    error = ((got - want).abs().max() / scale).item() if got.shape == want.shape else float("inf")
    if not error <= TOLERANCE:
        raise UsageError(
            f"the torch graph of model {model.source or model.name} disagrees with the model "
            f"(relative error {error:.2g}, shapes {tuple(got.shape)} vs {tuple(want.shape)}); "
            "graph-based methods cannot explain it"
        )
