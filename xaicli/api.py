"""The Python API: what the CLI and notebooks call.

    import xaicli
    result = xaicli.explain("model.pt", ["photos/"], methods=["saliency", "lrp"], output="out/")
    result = xaicli.explain(my_module, "photos/", methods=["gradcam"])   # an nn.Module: never changed
    result = xaicli.evaluate("model.pt", "photos/", methods=["saliency"], metrics=["pixel_flipping"])
    result = xaicli.run_file("recipes/quickstart.yaml")

Each returns a RunResult (output folder, manifest, failed inputs, threshold violations, exit code).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import UsageError
from .plan import make_plan
from .progress import Progress
from .recipe import MODULE_SCHEME, Recipe, from_mapping, load_recipe
from .registry import Registry, default_registry
from .run import RunResult, run_plan


def explain(
    model: str | Path | torch.nn.Module,
    inputs: str | Path | Sequence[str | Path],
    *,
    methods: Sequence[str] | dict[str, dict] | None = None,
    output: str | Path | None = None,
    sets: Sequence[str] = (),
    progress: Progress | None = None,
    **keys: Any,
) -> RunResult:
    """Explain `inputs` with `model`: the Python form of `xai explain`.

    `model` is a model file, `timm:NAME`, or an `nn.Module` (a timm model object included): a
    module is explained as a private copy in eval mode, so its parameters, buffers, hooks,
    training mode and requires_grad flags are never changed. `methods` is a list of method names
    or a recipe-style mapping; any other recipe key (`seed`, `batch_size`, `writers`, `metrics`,
    `preprocess`, ...) can be passed as a keyword.
    """
    module = model if isinstance(model, torch.nn.Module) else None
    data: dict[str, Any] = {
        "model": f"{MODULE_SCHEME}{type(module).__qualname__}" if module is not None else str(model),
        "inputs": [str(i) for i in ([inputs] if isinstance(inputs, (str, Path)) else inputs)],
    }
    if methods is not None:
        data["methods"] = dict(methods) if isinstance(methods, dict) else {m: {} for m in methods}
    if output is not None:
        data["output"] = str(output)
    data.update(keys)
    return run_recipe(from_mapping(data, sets=sets, registry=default_registry()), progress=progress, module=module)


def evaluate(
    model: str | Path | torch.nn.Module,
    inputs: str | Path | Sequence[str | Path],
    *,
    metrics: Sequence[str] | dict[str, dict],
    methods: Sequence[str] | dict[str, dict] | None = None,
    masks: str | Path | None = None,
    from_run: str | Path | None = None,
    thresholds: dict[str, dict[str, float]] | None = None,
    baseline: str | Path | None = None,
    max_regression: dict[str, float] | None = None,
    **keys: Any,
) -> RunResult:
    """Score explanation methods with metrics: the Python form of `xai evaluate`.

    Scores only by default (metrics.csv, summary.json/.md, junit.xml); `writers=` adds heatmaps.
    `from_run` scores an earlier run's arrays instead of explaining again. `baseline` compares the
    means with an earlier evaluation; `max_regression` (metric -> delta) fails the run (exit 1) when
    one got worse by more than its delta.
    """
    if not metrics:
        raise UsageError("no metrics to compute: add one with --metric METRIC (list them with `xai plugins`)")
    keys.setdefault("writers", {})
    keys.setdefault("overwrite", True)
    keys["metrics"] = dict(metrics) if isinstance(metrics, dict) else {m: {} for m in metrics}
    optional = {"masks": masks, "from_run": from_run, "thresholds": thresholds, "baseline": baseline,
                "max_regression": max_regression}
    keys.update({k: str(v) if isinstance(v, Path) else v for k, v in optional.items() if v})
    return explain(model, inputs, methods=methods, **keys)


def run_file(path: str | Path, sets: Sequence[str] = (), progress: Progress | None = None) -> RunResult:
    """Run a YAML recipe: the Python form of `xai run`."""
    return run_recipe(load_recipe(path, sets=sets, registry=default_registry()), progress=progress)


def run_recipe(recipe: Recipe, registry: Registry | None = None, progress: Progress | None = None,
               module: torch.nn.Module | None = None) -> RunResult:
    """Execute a validated recipe; raises UsageError before any input is touched."""
    return run_plan(make_plan(recipe, registry or default_registry(), module=module), progress)
