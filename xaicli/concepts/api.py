"""`xai concepts` as a function: a concept atlas (and prototypes) of a model over a dataset.

    result = concepts("model.pt", ["photos/"], layers=["features.28"], output="atlas/", top=8, prototypes=2)

1. One streaming run of the method `concept_scores` (one LRP pass per batch, the run machinery:
   engines, devices, resume, errors.jsonl, run.json, the output lock) writes each input's channel
   vectors to `arrays/concepts/<input>.npz`. An interrupted run resumes where it stopped.
2. The atlas is built from those vectors, plus those of `merge` folders (shards of the same
   dataset and model): atlas.json, stats.npz.
3. References: each channel's top-N inputs by relevance, cropped to the channel's conditional
   heatmap and overlaid (references/<layer>/<channel>.png), from one CRP call per input.
4. With `prototypes` K: prototypes.json and outliers.csv (xaicli.concepts.prototypes).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import json

from ..errors import UsageError
from ..outdir import OutputLock
from ..plan import make_plan
from ..progress import Progress
from ..recipe import from_mapping
from ..registry import default_registry
from ..render import colormap
from ..run import RunResult, run_plan
from . import atlas as atlas_mod
from . import prototypes as pcx
from .conditional import MODES, ConditionalLRP
from .engines import Rules, crp_engine
from .references import render


@dataclass
class ConceptsResult:
    """The run (None when only merging), the output folder and what was written."""

    out_dir: Path
    run: RunResult | None
    layers: list[str]
    inputs: int
    files: list[Path]

    @property
    def exit_code(self) -> int:
        return self.run.exit_code if self.run is not None else 0


def concepts(model: str | Path, inputs: Sequence[str | Path], *, layers: Sequence[str] = (),
             output: str | Path = "xai-concepts", top: int = 8, mode: str = "relevance", prototypes: int = 0,
             merge: Sequence[str | Path] = (), references: bool = True, sets: Sequence[str] = (),
             progress: Progress | None = None, **keys: Any) -> ConceptsResult:
    """Build the atlas of `model` over `inputs` (and the vectors of `merge` folders) into `output`."""
    if top < 1:
        raise UsageError(f"--top must be at least 1; got {top}")
    if mode not in MODES:
        raise UsageError(f"--mode must be one of {', '.join(MODES)}; got {mode!r}")
    if prototypes < 0:
        raise UsageError(f"--prototypes must be >= 0; got {prototypes}")
    out_dir = Path(output)
    paths = [str(Path(i).resolve()) for i in inputs] or _merged_inputs(merge)
    data: dict[str, Any] = {
        "model": str(model), "inputs": paths, "output": str(out_dir),
        "methods": {atlas_mod.OUTPUT: {"method": "concept_scores", "layers": list(layers)}},
        "writers": {"npz": {}}, **keys,
    }
    recipe = from_mapping(data, sets=sets, registry=default_registry())
    plan = make_plan(recipe, default_registry())
    run = run_plan(plan, progress) if inputs else None
    if run is not None and (run.interrupted or run.storage_error):
        return ConceptsResult(out_dir, run, list(layers), 0, [])
    sources = ([atlas_mod.open_source(out_dir)] if run is not None else []) + [atlas_mod.open_source(Path(m)) for m in merge]
    if not sources:
        raise UsageError("no inputs and nothing to --merge: give INPUT paths or --merge run folders")
    found = [s.layers for s in sources if s.layers]
    if not found:
        raise UsageError(f"no input of {', '.join(str(s.out_dir) for s in sources)} has concept vectors")
    names = found[0]
    for source in sources:
        if source.layers and source.layers != names:
            raise UsageError(f"--merge {source.out_dir}: its layers {source.layers} differ from {names}")
    return _write(plan, out_dir, sources, names, top, mode, prototypes, references, run)


def _merged_inputs(merge: Sequence[str | Path]) -> list[str]:
    """The inputs of the first --merge folder's run: the recipe a merge-only call validates (nothing runs)."""
    if not merge:
        raise UsageError("no inputs and nothing to --merge: give INPUT paths or --merge run folders")
    manifest = Path(merge[0]) / "run.json"
    if not manifest.is_file():
        raise UsageError(f"--merge {merge[0]}: no run.json; not the output folder of an `xai concepts` run")
    return list(json.loads(manifest.read_text())["recipe"]["inputs"])


def _write(plan: Any, out_dir: Path, sources: list[atlas_mod.Source], layers: list[str], top: int, mode: str,
           prototypes: int, references: bool, run: RunResult | None) -> ConceptsResult:
    from ..engines import devices, load_model

    out_dir.mkdir(parents=True, exist_ok=True)
    with OutputLock(out_dir):
        atlas = atlas_mod.build(sources, layers, top, mode, keep=layers[0] if prototypes else None)
        model = load_model(plan, devices(plan.recipe.device)[0]) if references or prototypes else None
        written: dict[tuple[str, int], str] = {}
        if references and model is not None:
            engines = _engines(model, plan.methods[atlas_mod.OUTPUT].params)
            written = render(atlas, engines, model.spec, model.device, out_dir, colormap("bwr"), plan.limits)
        labels = model.labels if model is not None else None
        atlas_mod.write(atlas, out_dir, labels, written)
        files = [out_dir / "atlas.json", out_dir / "stats.npz"] + [out_dir / p for p in written.values()]
        if prototypes:
            found, outliers = pcx.fit(atlas.kept, prototypes, plan.recipe.seed)
            pcx.write(out_dir, layers[0], prototypes, plan.recipe.seed, found, outliers, atlas.kept_relpaths)
            files += [out_dir / "prototypes.json", out_dir / "outliers.csv"]
    return ConceptsResult(out_dir, run, layers, atlas.inputs, files)


def _engines(model: Any, params: dict[str, Any]) -> Callable[[str], ConditionalLRP]:
    """The CRP engine of a layer with the run's composite and rule options."""
    return lambda layer: crp_engine(model, layer, None, Rules.of(params))
