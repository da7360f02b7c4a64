"""Model copies for randomisation and axiomatic metrics. The user's model is never modified:
layers are randomised on a deep copy (eager or TorchScript), and input shifts wrap the model."""
from __future__ import annotations

import copy
import math
from dataclasses import replace

import torch
from torch import nn

from xaicli.model import Model


def torch_copy(model: Model) -> tuple[Model, nn.Module]:
    """A Model sharing everything with `model` but running a deep copy of its torch module."""
    if model.module is None:
        raise ValueError(f"randomising layers needs a torch model; {model.source or model.name} is forward-only (ONNX)")
    module = copy.deepcopy(model.module).eval()
    return replace(model, module=module), module


def weighted_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that own parameters, in definition order (input to output), as Quantus lists them."""
    return [(name or "model", m) for name, m in module.named_modules() if next(m.parameters(recurse=False), None) is not None]


@torch.no_grad()
def randomise(layer: nn.Module, seed: int) -> None:
    """Re-initialise one layer in place, reproducibly, without touching the global random state.

    Eager layers use their own `reset_parameters` after seeding with seed + 1 (exactly what Quantus
    does, so eager models randomise identically). TorchScript layers have no such method: tensors
    with ≥ 2 dims (and the layer's biases) get torch's default U(±1/√fan_in); layers with only 1-D
    weights (normalisation) get weight 1, bias 0 and reset running statistics, as reset_parameters does.
    """
    device = next(layer.parameters()).device
    if hasattr(layer, "reset_parameters"):
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed + 1)
            layer.reset_parameters()
        return
    generator = torch.Generator().manual_seed(seed + 1)
    params = dict(layer.named_parameters(recurse=False))
    matrices = [p for p in params.values() if p.dim() >= 2]
    bound = 1 / math.sqrt(matrices[0][0].numel()) if matrices else 0.0
    for name, p in params.items():
        if p.dim() >= 2 or matrices:
            p.copy_((torch.rand(p.shape, generator=generator) * 2 - 1) * bound)
        else:
            p.fill_(1.0 if name == "weight" else 0.0)
    for name, buffer in layer.named_buffers(recurse=False):
        if name in ("running_mean", "num_batches_tracked"):
            buffer.zero_()
        elif name == "running_var":
            buffer.fill_(1.0)


class _Shifted(nn.Module):
    """f(x − shift): the model that sees x + shift exactly as the original sees x."""

    def __init__(self, inner: nn.Module, shift: float):
        super().__init__()
        self.inner = inner
        self.shift = shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x - self.shift)


def shifted(model: Model, shift: float) -> Model:
    """A Model with f'(x + shift) = f(x) for every x (Kindermans et al.'s input-invariance setup)."""
    if model.module is not None:
        return replace(model, module=_Shifted(model.module, shift).eval())
    if model.differentiable:  # ONNX: shift in front of xai's torch graph, so gradients flow too
        return replace(model, module=_Shifted(model.graph(), shift).eval())
    forward = model.forward_fn
    assert forward is not None
    return replace(model, forward_fn=lambda x: forward(x - shift))
