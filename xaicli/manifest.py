"""run.json: what a run did, with what, and how fast."""
from __future__ import annotations

import platform
from importlib import metadata
from typing import Any

from . import __version__
from .model import Model
from .plan import Plan

PACKAGES = ("xaicli", "torch", "numpy", "pillow", "onnx", "onnxruntime", "timm", "pluggy", "ray")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def manifest(plan: Plan, model: Model | None, *, inputs: int, counts: dict[str, int], interrupted: bool,
             timings: dict[str, float], scores: list, devices: list[str], batch_size: int,
             chunks: dict[str, int], stats: dict[str, dict[str, dict[str, float]]] | None = None) -> dict[str, Any]:
    """The run manifest; `throughput` is images/s of the loop, model loading excluded. `skipped`: the
    method outputs that could not run on the model and why; `stats`: per method output, each
    statistic its method reports per input (e.g. LRP's `conservation_error`) as mean and max
    over this run's inputs."""
    spec = model.spec if model is not None else None
    elapsed = timings.get("loop", 0.0)
    return {
        "xai": __version__,
        "recipe": plan.resolved_recipe(),
        "seed": plan.recipe.seed,
        "model": {
            "spec": plan.recipe.model, "digest": model.digest if model else "", "device": devices[0] if devices else "",
            "input": {} if spec is None else {
                "size": list(spec.size), "channels": spec.channels, "mean": list(spec.mean), "std": list(spec.std),
                "interpolation": spec.interpolation, "crop_pct": spec.crop_pct},
        },
        "engine": {"name": plan.engine.name, **plan.engine.params, "devices": devices, "batch_size": batch_size, "chunks": chunks},
        "versions": package_versions(),
        "inputs": inputs,
        "counts": counts,
        "interrupted": interrupted,
        "timings": {k: round(v, 4) for k, v in timings.items()},
        "throughput": round(counts["done"] / elapsed, 3) if elapsed > 0 else 0.0,
        "metrics": {name: {"metric": c.name, "higher_is_better": c.plugin.higher_is_better, "family": c.plugin.family}
                    for name, c in plan.metrics.items()},
        "thresholds": plan.recipe.thresholds or {},
        "baseline": {"path": plan.recipe.baseline, "max_regression": plan.recipe.max_regression} if plan.baseline else None,
        "scores": scores,
        "skipped": {out: {"method": call.name, "cause": cause} for out, (call, cause) in plan.skipped.items()},
        "stats": stats or {},
        "resolved": {out: dict(c.resolved) for out, c in plan.methods.items() if c.resolved},
    }


def threshold_violations(plan: Plan, scores: list) -> list[str]:
    """Each threshold of the recipe that the run's mean scores violate, and each regression beyond
    its tolerance against the baseline, as a sentence."""
    if not plan.recipe.thresholds and not plan.recipe.max_regression:
        return []
    from .baseline import compare
    from .summary import check_thresholds, summarize

    summary = summarize(scores, {n: c.plugin.higher_is_better for n, c in plan.metrics.items()})
    found = [v.reason for v in check_thresholds(summary, plan.recipe.thresholds, plan.outputs)]
    if plan.baseline is not None and plan.recipe.max_regression:
        changes = compare(summary, plan.baseline, plan.recipe.max_regression, plan.outputs)
        found += [f"regression: {c.reason}" for c in changes if c.regressed]
    return found
