"""The plugin contract. A plugin is a module with `@hookimpl` functions for some of these hooks,
declared under the entry-point group ``xaicli`` in its package metadata::

    [project.entry-points.xaicli]
    my_method = "my_package.my_module"

Built-in plugins (``xaicli_plugins``) are found through the same group.
"""
from __future__ import annotations

import pluggy

from .descriptors import Analysis, Engine, Loader, Method, Metric, Writer

PROJECT = "xaicli"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def xai_loaders() -> list[Loader]:
    """Return model loaders. A loader's `claims(spec)` says whether it handles a model spec
    such as ``model.pt``, ``timm:resnet50`` or ``model.onnx``; the first that claims it loads it."""


@hookspec
def xai_methods() -> list[Method]:
    """Return explanation methods: `explain(model, x, target, rng, **params) -> Attribution`."""


@hookspec
def xai_metrics() -> list[Metric]:
    """Return explanation-quality metrics: `score(model, x, target, relevance, ctx, **params) -> Tensor[B]`."""


@hookspec
def xai_writers() -> list[Writer]:
    """Return report writers: `open(ctx, **params) -> Sink` with `write(batch)` and `close(run)`."""


@hookspec
def xai_engines() -> list[Engine]:
    """Return engines: where the compute step runs (`run(job) -> Iterator[BatchResult]`, see xaicli.engines)."""


@hookspec
def xai_analyses() -> list[Analysis]:
    """Return dataset-wide analyses: `analyze(group, **params) -> AnalysisOutput`, run by `xai analyze`
    per method output and class on the run's heatmaps (see xaicli.analysis)."""
