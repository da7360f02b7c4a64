"""`xai analyze`: a run's npz arrays -> per method output and class, an analysis plugin -> the analysis folder.

Never recomputes an explanation: it reads `arrays/<output>/*.npz` (streaming, pooled rows only),
groups them by class (the npz `target`, or the true label from a CSV), hands each group to the
analysis plugin (`spray` by default), summarises each clustering per cluster (size, mean heatmap,
prototype) and writes the folder described in xaicli.analysis.store.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..descriptors import Analysis, AnalysisGroup, AnalysisOutput
from ..errors import UsageError
from ..outdir import check_output_dir
from ..params import ParamErrors, resolve
from ..registry import Registry, default_registry
from . import clustering, heatmaps, store
from .cache import EmbeddingCache
from ..progress import Progress
from .settings import COMMON, pooled_size

VERSION = 1


@dataclass
class AnalyzeResult:
    """What an analysis run did: where it wrote, the groups analysed, what it skipped."""

    out_dir: Path
    groups: list[dict[str, Any]]
    skipped_files: list[tuple[str, str]] = field(default_factory=list)  # (npz path, cause)
    skipped_groups: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """1 when some npz files could not be read (as `xai explain` with failed inputs), else 0."""
        return 1 if self.skipped_files else 0


def resolve_settings(plugin: Analysis, given: dict[str, Any]) -> dict[str, Any]:
    """The plugin's parameters (COMMON first, then its own) filled in from `given`; UsageError naming the key."""
    declared = {p.name: p for p in (*COMMON, *plugin.params)}
    try:
        params = resolve(tuple(declared.values()), given)
        pooled_size(params["size"])
    except (ParamErrors, ValueError) as exc:
        problems = getattr(exc, "errors", [exc])
        raise UsageError("; ".join(f"analysis.{p}" for p in problems)) from None
    return params


def parse_sets(sets: Sequence[str]) -> dict[str, Any]:
    """`analysis.KEY=VALUE` overrides (YAML values, as `--set` of explain) -> {KEY: value}."""
    from ..recipe import apply_sets

    bad = [s for s in sets if not s.partition("=")[0].strip().startswith("analysis.")]
    if bad:
        raise UsageError(f"--set {bad[0]!r}: analyze takes analysis.KEY=VALUE (see `xai plugins show spray`)")
    data = apply_sets({}, list(sets)).get("analysis", {})
    nested = [k for k, v in data.items() if isinstance(v, dict)]
    if nested:
        raise UsageError(f"--set analysis.{nested[0]}.…: analysis settings are one level deep (analysis.KEY=VALUE)")
    return data


def analyze(
    run_dir: str | Path, output: str | Path | None = None, methods: Sequence[str] = (),
    classes: Sequence[int] | None = None, labels: str | Path | None = None, settings: dict[str, Any] | None = None,
    analysis: str = "spray", progress: Progress | None = None, registry: Registry | None = None,
) -> AnalyzeResult:
    """Analyse a run folder's heatmaps; see the module docstring. `settings` are the analysis
    parameters (`xai plugins show spray`)."""
    run_dir = Path(run_dir)
    registry = registry or default_registry()
    plugin = registry.analysis(analysis)
    params = resolve_settings(plugin, settings or {})
    out_dir = Path(output) if output is not None else run_dir / "analysis"
    outputs = heatmaps.find_outputs(run_dir, methods)
    label_map = heatmaps.read_labels(Path(labels)) if labels else None
    check_output_dir(out_dir)
    progress = progress or Progress()
    size = pooled_size(params["size"])
    names = heatmaps.input_names(run_dir)
    cache = EmbeddingCache(out_dir)
    result = AnalyzeResult(out_dir, [])
    arrays: list[dict[str, Any]] = []
    written: set[str] = set()
    progress.start(sum(len(files) for files in outputs.values()), 0)
    try:
        for output_name, files in outputs.items():
            read = heatmaps.read_heatmaps(output_name, files, run_dir / "arrays" / output_name, size, params["reduce"],
                                          params["normalise"], params["workers"], lambda n: progress.advance(n, 0))
            for path, cause in read.skipped:
                progress.message(f"skipped {path}: {cause}")
            result.skipped_files.extend(read.skipped)
            groups = _classes(read, label_map, names, progress)
            source = "label" if label_map is not None else "target"
            for cls in heatmaps.chosen_classes(groups, classes):
                rows = np.flatnonzero(groups == cls)
                if len(rows) < params["min_group"]:
                    result.skipped_groups.append(f"{output_name} class {cls}: {len(rows)} inputs (min_group "
                                                 f"{params['min_group']})")
                    continue
                progress.message(f"{plugin.name}: {output_name}, class {cls}: {len(rows)} heatmaps")
                group = AnalysisGroup(output_name, int(cls), source, [names.get(read.stems[i], read.stems[i]) for i in rows],
                                      read.rows[rows], size, params["seed"], cached=lambda *a: {})
                group.cached = cache.bind(group)
                found = plugin.analyze(group, **params)
                _check(plugin, group, found)
                record, data = _summarise(out_dir, group, [read.stems[i] for i in rows], rows, found, written)
                result.groups.append(record)
                arrays.append(data)
            del read
    finally:
        progress.close()
    for line in result.skipped_groups:
        progress.message(f"not analysed: {line}")
    if not result.groups:
        if result.skipped_groups:
            more = f" and {len(result.skipped_groups) - 1} more" if len(result.skipped_groups) > 1 else ""
            why = (f"every class has fewer inputs than analysis.min_group ({result.skipped_groups[0]}{more}); "
                   f"explain more inputs per class or lower it, e.g. --set analysis.min_group=3")
        else:
            why = result.skipped_files[0][1] if result.skipped_files else "no inputs of the chosen classes"
        raise UsageError(f"nothing to analyse in {run_dir}: {why}")
    _write(out_dir, run_dir, plugin, params, result, arrays, written, methods, classes, labels)
    return result


def _classes(read: heatmaps.Heatmaps, label_map: dict[str, int] | None, names: dict[str, str],
             progress: Progress) -> np.ndarray:
    if label_map is None:
        return read.classes
    classes, missing = heatmaps.relabel(read, label_map, names)
    if missing:
        progress.message(f"{len(missing)} inputs of {read.output} have no row in the labels CSV "
                         f"(e.g. {missing[0]}); left out")
    return classes


def _check(plugin: Analysis, group: AnalysisGroup, found: AnalysisOutput) -> None:
    """A plugin's output has one row per input everywhere; UsageError naming the plugin otherwise."""
    n = len(group.inputs)
    parts = {**{f"embedding {k}": v for k, v in found.embeddings.items()},
             **{f"clustering {k}": v for k, v in found.clusterings.items()},
             **{f"view {k}": v for k, v in found.views.items()}}
    for what, values in parts.items():
        if len(np.asarray(values)) != n:
            raise UsageError(f"analysis {plugin.name!r} returned {what} with {len(np.asarray(values))} rows "
                             f"for {n} inputs ({group.method}, class {group.cls})")


def _summarise(out_dir: Path, group: AnalysisGroup, stems: list[str], index: np.ndarray, found: AnalysisOutput,
               written: set[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The analysis.json record of one group, and the arrays for analysis.h5."""
    clusterings: dict[str, Any] = {}
    for name, labels in found.clusterings.items():
        labels = np.asarray(labels, dtype=np.int64)
        entry: dict[str, Any] = {"labels": labels.tolist(), "sizes": {}, "prototypes": {}, "means": {}}
        for c, (proto, mean) in clustering.prototypes(group.heatmaps, labels).items():
            entry["sizes"][str(c)] = int((labels == c).sum())
            entry["prototypes"][str(c)] = group.inputs[proto]
            rel = store.write_mean(out_dir, group.method, group.cls, name, c, mean, group.shape)
            entry["means"][str(c)] = rel
            written.add(rel)
        noise = int((labels < 0).sum())
        if noise:
            entry["noise"] = noise
        clusterings[name] = entry
    record = {
        "method": group.method, "class": group.cls, "class_source": group.class_source,
        "inputs": group.inputs, "stems": stems,
        "eigenvalues": [] if found.eigenvalues is None else [float(v) for v in found.eigenvalues],
        "eigengap": found.eigengap, "suggested": found.suggested or next(iter(clusterings), ""),
        "clusterings": clusterings,
        "views": {k: np.round(np.asarray(v, dtype=np.float64), 4).tolist() for k, v in found.views.items()},
        "cache": {name: ("reused" if hit else "computed") for name, hit in group.cache_log},
    }
    data = {"index": index, "embeddings": found.embeddings, "eigenvalues": found.eigenvalues,
            "views": found.views, "labels": found.clusterings}
    return record, data


def _write(out_dir: Path, run_dir: Path, plugin: Analysis, params: dict[str, Any], result: AnalyzeResult,
           arrays: list[dict[str, Any]], written: set[str], methods: Sequence[str], classes: Sequence[int] | None,
           labels: str | Path | None) -> None:
    settings = {"analysis": plugin.name, **params, "methods": list(methods), "classes": list(classes or []),
                "labels": str(labels) if labels else None}
    store.write_csv(out_dir, result.groups)
    store.write_h5(out_dir, result.groups, arrays)
    store.remove_stale_means(out_dir, written)
    skipped = [{"path": p, "cause": c} for p, c in result.skipped_files]
    document = {"version": VERSION, "run_dir": str(run_dir), "settings": settings, "groups": result.groups,
                "skipped": skipped, "not_analysed": result.skipped_groups}
    store.write_json(out_dir, document)
