"""What plugins hand to the registry: loaders, methods, metrics and writers, as plain data.

A plugin module returns these from its hooks (see hookspecs.py). Each declares its parameters
(`Param`), so recipes are validated and `xai plugins show NAME` can print them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Protocol

import numpy as np
import torch

from .params import Param

if TYPE_CHECKING:
    from .model import InputSpec, Model
    from .rng import BatchRNG

Needs = Literal["forward", "gradient", "graph"]
"""What a method or metric needs of a model: forward passes only, input gradients, or the torch graph (LRP)."""


@dataclass
class Attribution:
    """What a method returns for a batch: relevance [B,C,H,W] plus optional per-input extras.

    `extras` values have the batch as first dimension; the npz writer stores them under their
    key (e.g. IG's `completeness_gap`, LIME's `segments` and `coefficients`). `stats` are per-input
    numbers [B] the run reports in run.json (`stats`) as mean and max over inputs, not written per input
    (e.g. LRP's relative conservation error).
    """

    relevance: torch.Tensor
    extras: dict[str, torch.Tensor | np.ndarray] = field(default_factory=dict)
    stats: dict[str, torch.Tensor | np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class Loader:
    """Claims a model spec (`claims(spec)`) and loads it: `load(spec, device, **params) -> Model`."""

    name: str
    description: str
    claims: Callable[[str], bool]
    load: Callable[..., "Model"]
    params: tuple[Param, ...] = ()


@dataclass(frozen=True)
class Method:
    """An explanation method: `explain(model, x, target, rng, **params) -> Attribution`.

    x is [B,C,H,W] on the model's device (normalised model input), target a LongTensor [B].
    `rng` holds the per-input random streams; deterministic methods ignore it.
    `reuses_forward`: explain takes `input_gradient(model, x, target)` of the batch itself, so the
    run keeps the graph of its target forward for it (one forward per batch instead of two).
    `check(model, params)`: validates resolved parameters against the loaded model (layer names)
    before any input runs; raises UsageError naming the parameter. It may return a dict of what it
    resolved on the model (Grad-CAM's layer), which run.json records under `resolved`.
    """

    name: str
    description: str
    explain: Callable[..., Attribution]
    params: tuple[Param, ...] = ()
    needs: Needs = "gradient"
    reuses_forward: bool = False
    check: Callable[["Model", dict[str, Any]], "dict[str, Any] | None"] | None = None


@dataclass(frozen=True)
class Metric:
    """A quality metric of explanations: `score(model, x, target, relevance, ctx, **params) -> Tensor[B]`.

    `ctx` is a MetricContext. `family` is one of faithfulness, robustness, localisation,
    complexity, randomisation, axiomatic.
    """

    name: str
    description: str
    family: str
    score: Callable[..., torch.Tensor]
    higher_is_better: bool
    params: tuple[Param, ...] = ()
    needs: Needs = "forward"
    needs_masks: bool = False
    needs_explain: bool = False


@dataclass
class MetricContext:
    """What a metric may use beyond the arrays: re-explaining, masks, random streams.

    `explain(x, target, model=None, rng=None)` re-runs the method under evaluation (same
    parameters) on new inputs, optionally on another model (randomisation metrics); without `rng`,
    rows of x are taken as input-major copies ([B, k] flattened) and get per-copy streams. `masks` is [B,1,H,W] bool.
    A metric with more than one number per input (MPRT's per-layer similarities) returns its
    headline score and adds the others to `details` (name -> Tensor[B]); they are reported as
    `<metric>/<name>`.
    """

    explain: Callable[..., torch.Tensor] | None
    masks: torch.Tensor | None
    rng: "BatchRNG"
    details: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class InputItem:
    """One input file: where it is and the name its outputs get."""

    path: Path
    relpath: str  # posix path relative to its input root (`a/b.jpg`); the input's stable id (seeds, resume, CSV rows)
    stem: str = ""  # output base name: relpath without extension (`a/b`), or the relpath when two inputs share a stem
    todo: tuple[str, ...] | None = None  # method outputs still to compute (a resumed run); None: every output

    def __post_init__(self) -> None:
        if not self.stem:
            self.stem = self.relpath.rsplit(".", 1)[0] if "." in self.relpath.rsplit("/", 1)[-1] else self.relpath


@dataclass
class BatchOutput:
    """One method's results on one batch, on the CPU, as handed to writers."""

    output: str  # the recipe's name for this method entry (key of `methods:`)
    method: str  # the method plugin's name
    params: dict[str, Any]
    items: list[InputItem]
    inputs: np.ndarray  # [B,C,H,W] float32 preprocessed model input
    images: list[np.ndarray]  # original decoded images, HxWx3 uint8 (for overlays at original size)
    crops: list[tuple[int, int, int, int]]  # per input: (top, left, height, width) of the model input within the resized image
    resized: list[tuple[int, int]]  # per input: (height, width) of the image after resizing, before the crop
    target: np.ndarray  # [B] int64
    logit: np.ndarray  # [B] float32
    prob: np.ndarray  # [B] float32
    relevance: np.ndarray  # [B,C,H,W] float32
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # metric name -> [B]
    predicted: np.ndarray | None = None  # [B] int64 top class of the model (may differ from target)
    stats: dict[str, np.ndarray] = field(default_factory=dict)  # per-input numbers [B] the run averages (Attribution.stats)


class Sink(Protocol):
    """A writer's open stream for one run. Called from writer threads; files differ per call."""

    def expected(self, item: InputItem, output: str) -> list[Path]:
        """Files this sink writes for one input and method output (used to resume runs)."""

    def write(self, batch: BatchOutput) -> None:
        """Write one batch's results (atomically, file by file)."""

    def close(self, run: dict[str, Any]) -> None:
        """Finish: `run` is the run manifest (counts, timings, recipe, scores summary)."""


@dataclass
class WriterContext:
    """What a writer gets when the run opens it."""

    out_dir: Path
    labels: list[str] | None = None
    spec: "InputSpec | None" = None  # the model's input spec: de-normalises inputs for overlays


@dataclass(frozen=True)
class Writer:
    """A report writer: `open(ctx, **params) -> Sink`.

    `per_input`: the sink writes files of its own per input from the batch's arrays (png, npz), so an
    engine may run it where the batch was computed (the ray engine's actors do). Other sinks gather
    over the run from scores and predictions; the arrays of the batches they get may be empty.
    """

    name: str
    description: str
    open: Callable[..., Sink]
    params: tuple[Param, ...] = ()
    per_input: bool = False


@dataclass(frozen=True)
class Engine:
    """Where the compute step runs: `run(job) -> Iterator[BatchResult]` (see xaicli.engines).

    An engine takes the plan and the inputs still to do, runs the compute step on its devices
    or cluster, and yields each batch's results to the orchestration, which writes them.
    """

    name: str
    description: str
    run: Callable[..., Any]
    params: tuple[Param, ...] = ()


@dataclass
class AnalysisGroup:
    """What an analysis gets: the heatmaps of one method output and class, one row per input.

    `heatmaps` is [N, h*w] float32 (channel-summed, pooled to `shape`, normalised; see
    xaicli.analysis.heatmaps). `cached(name, settings, compute)` returns `compute()` or, when this
    group's heatmaps and `settings` were seen before, its stored result (a dict of arrays); each
    call appends (name, reused) to `cache_log`.
    """

    method: str
    cls: int
    class_source: str  # "target" or "label"
    inputs: list[str]
    heatmaps: np.ndarray
    shape: tuple[int, int]
    seed: int
    cached: Callable[[str, dict[str, Any], Callable[[], dict[str, np.ndarray]]], dict[str, np.ndarray]]
    cache_log: list[tuple[str, bool]] = field(default_factory=list)


@dataclass
class AnalysisOutput:
    """What an analysis returns for a group. Every array has one row per input.

    `embeddings`: name -> [N, d] (the first one is what clusterings ran on); `eigenvalues` belong to
    the first embedding when it is spectral. `clusterings`: name -> int labels [N] (-1 = noise);
    `suggested` names the one to show first. `views`: name -> [N, 2] for plotting.
    """

    embeddings: dict[str, np.ndarray]
    clusterings: dict[str, np.ndarray]
    views: dict[str, np.ndarray] = field(default_factory=dict)
    eigenvalues: np.ndarray | None = None
    eigengap: int | None = None
    suggested: str = ""


@dataclass(frozen=True)
class Analysis:
    """A dataset-wide analysis of a run's heatmaps: `analyze(group, **params) -> AnalysisOutput`,
    called per method output and class by `xai analyze`."""

    name: str
    description: str
    analyze: Callable[..., AnalysisOutput]
    params: tuple[Param, ...] = ()
