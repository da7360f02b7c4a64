"""The model a run shares: logits on a device, the input spec it expects, optional labels."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputSpec:
    """How an image becomes model input: resize the short side to size/crop_pct, center-crop
    to `size` (H, W), scale to [0, 1], normalise with mean/std per channel."""

    size: tuple[int, int] = (224, 224)
    channels: int = 3
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    crop_pct: float = 1.0

    def override(self, **changes: Any) -> "InputSpec":
        """A copy with the given fields replaced (None values are ignored)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if "size" in changes:
            size = changes["size"]
            changes["size"] = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
        for key in ("mean", "std"):
            if key in changes:
                value = changes[key]
                changes[key] = tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
        spec = replace(self, **changes)
        if len(spec.mean) == 1 and spec.channels > 1:
            spec = replace(spec, mean=spec.mean * spec.channels)
        if len(spec.std) == 1 and spec.channels > 1:
            spec = replace(spec, std=spec.std * spec.channels)
        if len(spec.mean) != spec.channels or len(spec.std) != spec.channels:
            raise ValueError(f"mean and std need {spec.channels} values (one per channel); got {spec.mean} and {spec.std}")
        return spec


@dataclass
class Model:
    """One loaded model on one device, shared by every method and metric of a run.

    `module` is a torch module (eager or TorchScript) when the model is differentiable;
    forward-only models (ONNX through onnxruntime) provide `forward_fn` instead.
    `fixed_batch` is the one batch size a forward accepts (fixed-batch ONNX graphs).
    `channels_last` (default: on CPUs) feeds torch models NHWC images, on which oneDNN's
    convolutions run 1.1-1.4x faster; results differ from NCHW by float rounding only.
    """

    name: str
    spec: InputSpec
    device: torch.device
    module: torch.nn.Module | None = None
    forward_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    labels: list[str] | None = None
    digest: str = ""
    source: str = ""  # file path or timm name, for messages and run.json
    fixed_batch: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    channels_last: bool | None = None
    _kept: "KeptForward | None" = field(default=None, init=False, repr=False)

    @property
    def differentiable(self) -> bool:
        """True when gradients w.r.t. the input can flow through `__call__`: a torch module, or
        an ONNX file whose converted graph (`graph()`) carries them."""
        from .graph import graph_source

        return graph_source(self) is not None

    def graph(self) -> torch.fx.GraphModule:
        """The model as one ATen-level torch graph (see xaicli.graph), built on first use and cached."""
        from .graph import to_graph

        return to_graph(self)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, classes] for model input x [B, C, H, W] on `device`. Without a torch
        module, input gradients run through the converted graph, plain forwards through `forward_fn`."""
        if x.ndim == 4 and (self.device.type == "cpu" if self.channels_last is None else self.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        if self.module is not None:
            return self.module(x)
        if torch.is_grad_enabled() and x.requires_grad:
            return self.graph()(x)
        assert self.forward_fn is not None
        if self.fixed_batch is None:
            return self.forward_fn(x)
        chunks = [self.forward_fn(part) for part in x.split(self.fixed_batch)]
        return torch.cat(chunks)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, max_batch: int | None = None) -> torch.Tensor:
        """Logits without gradients, evaluated in chunks of at most `max_batch` inputs."""
        if not max_batch or len(x) <= max_batch:
            return self(x)
        return torch.cat([self(part) for part in x.split(max_batch)])

    def keep_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the batch x, computed with its graph kept so that the first
        `input_gradient(self, x, target)` costs only a backward. `release()` frees the graph."""
        leaf = x.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = self(leaf)
        self._kept = KeptForward(x, leaf, logits)
        return logits.detach()

    def release(self) -> None:
        """Drop what `keep_forward` kept."""
        self._kept = None

    def label(self, index: int) -> str:
        if self.labels and 0 <= index < len(self.labels):
            return self.labels[index]
        return str(index)


def predict_stream(model: Model, make: Callable[[int, int], torch.Tensor], total: int, max_batch: int) -> torch.Tensor:
    """Logits of `total` perturbed inputs built lazily: `make(start, stop)` returns inputs
    [start:stop]; at most `max_batch` exist at once. Returns [total, classes]."""
    outs: list[torch.Tensor] = []
    for start in range(0, total, max_batch):
        stop = min(total, start + max_batch)
        outs.append(model.predict(make(start, stop)))
    return torch.cat(outs)


@dataclass
class KeptForward:
    """A batch's forward pass with its graph, and the input gradients already taken from it."""

    x: torch.Tensor  # the batch as the run hands it to methods (matched by identity)
    leaf: torch.Tensor
    logits: torch.Tensor | None  # None once a backward has consumed the graph
    grads: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def gather_target(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """logits[i, target[i]] for each row: [B]."""
    return logits.gather(1, target.view(-1, 1).to(logits.device)).squeeze(1)


def input_gradient(model: Model, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂f_t/∂x, f_t(x)) for a batch, without touching the model's parameter gradients.
    Reuses the forward `model.keep_forward(x)` kept for this very batch, and its gradients."""
    kept = model._kept
    if kept is not None and kept.x is x:
        key = tuple(target.tolist())
        if key not in kept.grads and kept.logits is not None:
            with torch.enable_grad():
                out = gather_target(kept.logits, target)
                (grad,) = torch.autograd.grad(out.sum(), kept.leaf)
            kept.logits = None
            kept.grads[key] = grad, out.detach()
        if key in kept.grads:
            grad, out = kept.grads[key]
            return grad.clone(), out.clone()
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        out = gather_target(model(x), target)
        (grad,) = torch.autograd.grad(out.sum(), x)
    return grad, out.detach()


def check_needs(model: Model, needs: str, what: str) -> None:
    """Fail up front when a method or metric needs more than the model can give."""
    from .errors import UsageError

    if needs in ("gradient", "graph") and not model.differentiable:
        raise UsageError(
            f"{what} needs input gradients, but model {model.source or model.name} is forward-only "
            f"(no torch module and no ONNX file to convert); use a forward-only method such as occlusion"
        )
    if needs == "graph" or (needs == "gradient" and model.module is None):
        model.graph()  # a model the converter cannot handle fails here, before the run starts

