"""The plan: a recipe validated once against the registry, every plugin resolved and typed.

Everything downstream (orchestration, engines, the compute step) receives a `Plan`, never a raw
mapping. A plan holds plugin descriptors and plain parameters, so it pickles (cloudpickle) and
travels to a Ray actor or another device as it is.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .baseline import read_baseline
from .data import DecodeLimits
from .descriptors import Engine, Loader, Method, Metric, Writer
from .errors import UsageError
from .params import ParamErrors, resolve
from .recipe import Problem, Recipe, RecipeError, dump_recipe, validate_plugins
from .registry import Registry

REPORT_WRITERS = ("metrics_csv", "summary", "junit")  # added to every run that computes metrics


@dataclass(frozen=True)
class Call:
    """One method or metric entry of a recipe: its output name, the plugin and its resolved parameters."""

    output: str
    plugin: Any  # Method, Metric, Writer or Engine
    params: dict[str, Any]
    resolved: dict[str, Any] = field(default_factory=dict)  # what the method's check chose on the model (run.json)

    @property
    def name(self) -> str:
        return self.plugin.name


@dataclass
class Plan:
    """A validated run: the recipe, resolved plugins, writers, engine and model options."""

    recipe: Recipe
    methods: dict[str, Call]
    metrics: dict[str, Call]
    writers: dict[str, Call]
    engine: Call
    loader: Loader | None  # None when the API was handed a model object
    model_options: dict[str, Any]
    limits: DecodeLimits = field(default_factory=DecodeLimits)
    previous: dict[str, Any] | None = None  # manifest of the run whose arrays are reused (--from)
    module: torch.nn.Module | None = None  # a model object handed to the Python API (a private copy)
    baseline: dict[str, Any] | None = None  # summary.json of the evaluation this one is compared with
    skipped: dict[str, tuple[Call, str]] = field(default_factory=dict)  # output -> (call, why it cannot run)

    def without(self, causes: dict[str, str]) -> "Plan":
        """This plan without the method outputs in `causes` (output -> why it cannot run on the model),
        which `skipped` keeps for run.json and errors.jsonl."""
        skipped = {**self.skipped, **{out: (self.methods[out], cause) for out, cause in causes.items() if out in self.methods}}
        methods = {out: call for out, call in self.methods.items() if out not in causes}
        return replace(self, methods=methods, skipped=skipped)

    @property
    def reuse_forward(self) -> bool:
        """One forward per batch serves the targets and the gradient methods that opt in."""
        return self.previous is None and any(c.plugin.reuses_forward for c in self.methods.values())

    @property
    def outputs(self) -> list[str]:
        return list(self.methods)

    def resolved_recipe(self) -> dict[str, Any]:
        """The recipe as run.json records it: every plugin with its resolved parameters."""
        import yaml

        data = yaml.safe_load(dump_recipe(self.recipe))
        calls = {**self.methods, **{out: call for out, (call, _) in self.skipped.items()}}
        data["methods"] = {out: {"method": c.name, **c.params} for out, c in calls.items()}
        data["writers"] = {name: c.params for name, c in self.writers.items()}
        data["engine"] = {"name": self.engine.name, **self.engine.params}
        if self.metrics:
            data["metrics"] = {out: {"metric": c.name, **c.params} for out, c in self.metrics.items()}
        return data


def make_plan(recipe: Recipe, registry: Registry, module: torch.nn.Module | None = None) -> Plan:
    """Resolve a recipe's plugins against `registry`; raise UsageError before any input is touched."""
    resolved = recipe.resolved if recipe.resolved is not None else validate_plugins(recipe, registry)
    previous = _previous_run(Path(recipe.from_run)) if recipe.from_run else None
    methods = resolved["methods"]
    if previous is not None:
        methods = _reused_methods(previous, methods, Path(recipe.from_run))
    if not methods and not recipe.from_run:
        raise UsageError("no methods to run: add one with -m METHOD (list them with `xai plugins`)")
    writers = dict(resolved["writers"])
    if resolved.get("metrics"):  # an evaluation always reports its scores
        for name in REPORT_WRITERS:
            writers.setdefault(name, resolve(registry.writer(name).params, {}))
    return Plan(
        recipe=recipe,
        methods={out: _call(out, registry.method(p["method"]), p, "method") for out, p in methods.items()},
        metrics={out: _call(out, registry.metric(p["metric"]), p, "metric") for out, p in resolved.get("metrics", {}).items()},
        writers={name: Call(name, registry.writer(name), params) for name, params in writers.items()},
        engine=_engine(recipe, registry),
        loader=None if module is not None else registry.loader_for(recipe.model),
        model_options=resolved.get("model_options", {}),
        limits=DecodeLimits(**recipe.limits),
        previous=previous,
        module=module,
        baseline=read_baseline(recipe.baseline) if recipe.baseline else None,
    )


def _engine(recipe: Recipe, registry: Registry) -> Call:
    """The recipe's engine with its options checked against the engine's parameters."""
    engine: Engine = registry.get("engine", recipe.engine_name)  # type: ignore[assignment]
    try:
        params = resolve(engine.params, recipe.engine_options)
    except ParamErrors as exc:
        source = str(recipe.source) if recipe.source else None
        raise RecipeError([Problem(f"engine.{e.key}", recipe.lines.get(f"engine.{e.key}"), e.message, source)
                           for e in exc.errors]) from None
    return Call(engine.name, engine, params)


def _call(out: str, plugin: Method | Metric, params: dict[str, Any], alias: str) -> Call:
    return Call(out, plugin, {k: v for k, v in params.items() if k != alias})


def _previous_run(folder: Path) -> dict[str, Any]:
    """The manifest of an earlier run whose arrays are evaluated."""
    path = folder / "run.json"
    if not path.is_file():
        raise UsageError(f"--from {folder}: no run.json there; point it at the output folder of `xai explain`")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"--from {folder}: run.json is not valid JSON: {exc}") from exc


def _reused_methods(previous: dict[str, Any], asked: dict[str, dict], folder: Path) -> dict[str, dict]:
    """The earlier run's methods (with their parameters), narrowed to those asked for, if any."""
    done = previous.get("recipe", {}).get("methods", {})
    skipped = previous.get("skipped") or {}  # outputs the earlier run could not make (no graph)
    missing = [name for name in asked if name not in done]
    if missing:
        raise UsageError(f"--from {folder}: the earlier run has no method output {missing[0]!r}; it has {', '.join(done)}")
    unmade = [name for name in asked if name in skipped]
    if unmade:
        raise UsageError(f"--from {folder}: the earlier run could not compute {unmade[0]!r}: {skipped[unmade[0]].get('cause', '')}")
    return {name: done[name] for name in (asked or [n for n in done if n not in skipped])}
