"""The model a run shares: logits on a device, the input spec it expects, optional labels."""
from __future__ import annotations

import copy
import hashlib
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping

import torch

from .errors import UsageError, XaiError

if TYPE_CHECKING:
    from torch import fx

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


DEFAULT_SPEC = InputSpec(crop_pct=0.875)  # a model that states no spec: ImageNet's 224 crop of a 256 resize


def spec_from_config(config: Mapping[str, Any]) -> InputSpec:
    """The input spec a timm data config states (a timm model's `pretrained_cfg`, or what
    `timm.data.resolve_data_config` returns); missing keys take timm's defaults."""
    channels, height, width = config.get("input_size") or (3, 224, 224)
    return InputSpec().override(size=(height, width), channels=channels,
                                mean=config.get("mean") or IMAGENET_MEAN, std=config.get("std") or IMAGENET_STD,
                                interpolation=config.get("interpolation") or "bicubic",
                                crop_pct=config.get("crop_pct") or DEFAULT_SPEC.crop_pct)


class GraphUnavailable(UsageError):
    """The model's torch graph cannot be built (an unsupported ONNX op, a torch.export failure, a
    graph that disagrees with the model): only the methods that need the graph cannot run."""


@dataclass(frozen=True)
class GraphSource:
    """What graph-aware methods build the model's torch graph from (see xaicli.graph): an eager
    or TorchScript `module`, or an ONNX file at `path`."""

    kind: Literal["module", "torchscript", "onnx"]
    module: torch.nn.Module | None = None
    path: Path | None = None

    def __post_init__(self) -> None:
        wanted = ("path",) if self.kind == "onnx" else ("module",)
        given = tuple(name for name in ("module", "path") if getattr(self, name) is not None)
        if given != wanted:
            raise ValueError(f"a graph source of kind {self.kind!r} takes {wanted[0]} only, got {given}")

    @classmethod
    def of_module(cls, module: torch.nn.Module) -> "GraphSource":
        kind = "torchscript" if isinstance(module, torch.jit.ScriptModule) else "module"
        return cls(kind, module=module)


@dataclass
class Model:
    """One loaded model on one device, shared by every method and metric of a run.

    `module` is a torch module (eager or TorchScript) when the model is differentiable;
    forward-only models (ONNX through onnxruntime) provide `forward_fn` instead.
    `graph_source` is what `graph()` is built from: a torch `module` always is its own (set
    here, also when `dataclasses.replace` swaps the module); forward-only loaders name a file.
    `fixed_batch` is the one batch size `forward_fn` accepts (ONNX files exported with a fixed batch):
    forwards run in chunks of it, padded (`xaicli.graph.batch.in_chunks`).
    `channels_last` (default: on CPUs) feeds torch models NHWC images, on which oneDNN's
    convolutions run 1.1-1.4x faster; results differ from NCHW by float rounding only.
    `unavailable`: the run's method outputs that cannot run on this model (output -> cause), set
    by `xaicli.engines.check_methods` when the graph they need cannot be built.
    """

    name: str
    spec: InputSpec
    device: torch.device
    module: torch.nn.Module | None = None
    forward_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    labels: list[str] | None = None
    digest: str = ""
    source: str = ""  # file path or timm name, for messages and run.json
    graph_source: GraphSource | None = None
    fixed_batch: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    channels_last: bool | None = None
    unavailable: dict[str, str] = field(default_factory=dict)
    _kept: "KeptForward | None" = field(default=None, init=False, repr=False)
    _graph: "tuple[GraphSource, fx.GraphModule | GraphUnavailable] | None" = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.module is not None:
            self.graph_source = GraphSource.of_module(self.module)

    @property
    def differentiable(self) -> bool:
        """True when gradients w.r.t. the input can flow through `__call__`: a torch module, or
        an ONNX file whose converted graph (`graph()`) carries them."""
        return self.graph_source is not None

    def graph(self) -> "fx.GraphModule":
        """The model as one ATen-level torch graph (see xaicli.graph), built on first use, checked
        against the model's own forward, and cached for as long as `graph_source` stays the same.
        A graph that cannot be built raises GraphUnavailable naming the cause, every time, without
        trying again (a failed torch.export is slow)."""
        source = self.graph_source
        if source is None:
            raise UsageError(f"model {self.source or self.name} has neither a torch module nor an ONNX file to build a graph from")
        if self._graph is None or self._graph[0] != source:
            self._graph = source, self._build_graph(source)
        built = self._graph[1]
        if isinstance(built, GraphUnavailable):
            raise GraphUnavailable(str(built))
        return built

    def _build_graph(self, source: GraphSource) -> "fx.GraphModule | GraphUnavailable":
        from .graph import to_graph
        from .graph.batch import fixed_batch

        # a fixed pseudo-random input of the model's size (batch 2: export needs a batch > 1)
        example = torch.randn(2, self.spec.channels, *self.spec.size, generator=torch.Generator().manual_seed(0))
        name = self.source or self.name
        try:
            graph = to_graph(source, example.to(self.device), self.predict, name)
            rows = fixed_batch(graph)
            if rows is not None:
                print(f"note: model {name} pins its batch size when traced (torch.export cannot keep it free): its "
                      f"graph runs {rows} inputs at a time, padded; results are the same", file=sys.stderr, flush=True)
            return graph
        except XaiError as exc:  # the converter's own message names the op and node
            return GraphUnavailable(str(exc))
        except Exception as exc:  # torch.export and TorchScript conversion raise many types
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            cause = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
            return GraphUnavailable(f"the torch graph of model {name} cannot be built ({source.kind}): {cause}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, classes] for model input x [B, C, H, W] on `device`. Without a torch
        module, input gradients run through the converted graph, plain forwards through `forward_fn`."""
        if x.ndim == 4 and (self.device.type == "cpu" if self.channels_last is None else self.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        if self.module is not None:
            return self.module(x)
        from .graph.batch import in_chunks, run  # not at the top: xaicli.graph imports torch.export and onnx

        if torch.is_grad_enabled() and x.requires_grad:
            return run(self.graph(), x)
        forward = self.forward_fn
        assert forward is not None
        return in_chunks(self.fixed_batch, lambda rows, live: forward(rows), x)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits without gradients (chunked: `xaicli.chunking.predict_rows`)."""
        return self(x)

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


def model_from_module(module: torch.nn.Module, device: torch.device, spec: InputSpec | None = None,
                      labels: list[str] | None = None) -> Model:
    """A Model that explains the user's own module (the Python API's `model=` argument) without
    ever changing it: xai explains a deep copy, moved to `device` and put in eval mode, so the
    module's parameters, buffers (BatchNorm statistics), hooks, requires_grad flags and training
    mode stay as they were, even when it is passed in training mode. The copy costs the module's
    memory once more; hooks registered on the module run on the copy as they would on it.

    Input spec: `spec`, else a timm model's `pretrained_cfg` (or `default_cfg`), else DEFAULT_SPEC.
    The digest hashes the state dict (names, dtypes, shapes, bytes), so a rerun resumes."""
    what = f"model {type(module).__qualname__}"
    try:
        copied = copy.deepcopy(module)
    except Exception as exc:  # deepcopy raises whatever an uncopyable attribute (lock, file, ...) raises
        raise UsageError(f"{what}: xai explains a copy so as never to change your module, "
                         f"but it cannot be copied: {exc}") from exc
    if spec is None:
        config = getattr(module, "pretrained_cfg", None) or getattr(module, "default_cfg", None)
        try:
            spec = spec_from_config(config) if isinstance(config, Mapping) else DEFAULT_SPEC
        except (TypeError, ValueError) as exc:
            raise UsageError(f"{what}: its pretrained_cfg states no usable input spec ({exc}); "
                             "give preprocess size, mean and std") from exc
    copied = copied.to(device).eval()
    return Model(name=type(module).__name__, spec=spec, device=device, module=copied, labels=labels,
                 digest=state_digest(copied), source=f"python:{type(module).__qualname__}")


def state_digest(module: torch.nn.Module) -> str:
    """'sha256:<hex>' over the module's state dict: every tensor's name, dtype, shape and bytes."""
    sha = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        sha.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        sha.update(data.view(torch.uint8).numpy().data)
    return f"sha256:{sha.hexdigest()}"


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


def needs_graph(model: Model, needs: str) -> bool:
    """True when what a method or metric `needs` takes the model's torch graph: LRP-style methods
    always, input gradients when there is no torch module (an ONNX file: through its converted graph)."""
    return needs == "graph" or (needs == "gradient" and model.module is None)


def check_needs(model: Model, needs: str, what: str) -> None:
    """Fail up front when a method or metric needs more than the model can give: UsageError, or
    GraphUnavailable (a UsageError) naming `what` when the graph it needs cannot be built."""
    if needs in ("gradient", "graph") and not model.differentiable:
        raise UsageError(
            f"{what} needs input gradients, but model {model.source or model.name} is forward-only "
            f"(no torch module and no ONNX file to convert); use a forward-only method such as occlusion"
        )
    if needs_graph(model, needs):
        try:
            model.graph()  # a model the converter cannot handle fails here, before the run starts
        except GraphUnavailable as exc:
            raise GraphUnavailable(f"{what} needs the model's torch graph: {exc}") from None

