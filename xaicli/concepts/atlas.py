"""The concept atlas: per layer and channel, the inputs where the channel is most relevant and most
active, and per class the mean concept-relevance vector.

It is built from the per-input vectors a `concept_scores` run wrote (`arrays/<output>/<stem>.npz`:
`channel_relevance:<layer>` [C] and friends), streamed file by file into running top-N tables
(xaicli.concepts.heaps): memory is channels × N, not the number of inputs. The vectors of any
number of runs (shards, or a run resumed after an interrupt) build the same atlas as one pass, since
top-N and class sums depend only on the set of inputs; an input found in two sources counts once.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..data import discover
from ..descriptors import InputItem
from ..errors import UsageError
from ..io import atomic_write, atomic_write_json
from ..npz import npz_keys, read_npz
from .heaps import TopN

OUTPUT = "concepts"
"""The method output (arrays/<OUTPUT>/) a concepts run writes its vectors to."""
KINDS = ("relevance", "activation")


@dataclass
class Source:
    """One run folder's vectors: the inputs it discovered (stem -> item) and its layers."""

    out_dir: Path
    items: list[InputItem]
    layers: list[str]

    def file(self, item: InputItem) -> Path:
        return self.out_dir / "arrays" / OUTPUT / f"{item.stem}.npz"


def open_source(out_dir: Path) -> Source:
    """A concepts run folder, from its run.json (inputs re-discovered, layers from its vectors)."""
    manifest_path = out_dir / "run.json"
    if not manifest_path.is_file():
        raise UsageError(f"{out_dir}: no run.json; not the output folder of an `xai concepts` run")
    recipe = json.loads(manifest_path.read_text())["recipe"]
    if OUTPUT not in recipe.get("methods", {}):
        raise UsageError(f"{out_dir}: run.json has no '{OUTPUT}' method; not an `xai concepts` run")
    items = discover(recipe["inputs"], exclude=[out_dir])
    layers: list[str] = []
    for item in items:
        path = out_dir / "arrays" / OUTPUT / f"{item.stem}.npz"
        if path.is_file():
            layers = [k.split(":", 1)[1] for k in npz_keys(path) if k.startswith("channel_relevance:")]
            break
    return Source(out_dir, items, layers)


@dataclass
class Row:
    """One input's vectors: its path (the atlas's name for it), relpath, class, and per layer the channel scores."""

    name: str
    relpath: str
    label: int
    scores: dict[str, dict[str, np.ndarray]]  # layer -> relevance | relevance_max | activation -> [C]


def rows(sources: list[Source], layers: list[str]) -> Iterator[Row]:
    """Every input's vectors across sources, once each (the first source holding an input wins)."""
    seen: set[str] = set()
    for source in sources:
        for item in source.items:
            name = str(item.path.resolve())
            path = source.file(item)
            if name in seen or not path.is_file():
                continue
            seen.add(name)
            data = read_npz(path)
            scores = {layer: {"relevance": data[f"channel_relevance:{layer}"],
                              "relevance_max": data[f"channel_relevance_max:{layer}"],
                              "activation": data[f"channel_activation:{layer}"]} for layer in layers}
            label = int(data["target"])
            yield Row(name, item.relpath, label, scores)


def shares(vector: np.ndarray) -> np.ndarray:
    """A channel-relevance vector as shares of its total (signed; 0 when the total is 0)."""
    total = float(np.sum(vector, dtype=np.float64))
    return np.zeros(len(vector)) if total == 0 else np.asarray(vector, np.float64) / total


@dataclass
class Atlas:
    """Top-N tables per layer and kind, class sums of the share vectors, and the inputs' share vectors
    of one layer for prototypes (kept only when asked for)."""

    n: int
    mode: str
    tables: dict[str, dict[str, TopN]] = field(default_factory=dict)
    sums: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)
    counts: dict[int, int] = field(default_factory=dict)
    relpaths: dict[str, str] = field(default_factory=dict)  # name -> relpath, for the inputs in the tables
    kept: list[tuple[str, int, np.ndarray]] = field(default_factory=list)
    kept_relpaths: dict[str, str] = field(default_factory=dict)
    inputs: int = 0

    def add(self, batch: list[Row], keep: str | None = None) -> None:
        """Fold in a batch of rows; `keep` names a layer whose share vectors are kept (prototypes)."""
        if not batch:
            return
        names, labels = [r.name for r in batch], np.array([r.label for r in batch])
        for layer in batch[0].scores:
            relevance = np.stack([r.scores[layer]["relevance" if self.mode == "relevance" else "relevance_max"]
                                  for r in batch])
            activation = np.stack([r.scores[layer]["activation"] for r in batch])
            tables = self.tables.setdefault(layer, {k: TopN.empty(relevance.shape[1], self.n) for k in KINDS})
            tables["relevance"] = tables["relevance"].update(relevance, names, labels)
            tables["activation"] = tables["activation"].update(activation, names, labels)
            sums = self.sums.setdefault(layer, {})
            for row in batch:
                vector = shares(row.scores[layer]["relevance"])
                sums[row.label] = sums[row.label] + vector if row.label in sums else vector
                if layer == keep:
                    self.kept.append((row.name, row.label, vector))
                    self.kept_relpaths[row.name] = row.relpath
        for row in batch:
            self.counts[row.label] = self.counts.get(row.label, 0) + 1
        self.inputs += len(batch)
        listed = {str(m) for t in self.tables.values() for table in t.values() for m in table.names.ravel() if m}
        self.relpaths = {k: v for k, v in self.relpaths.items() if k in listed}
        self.relpaths.update({r.name: r.relpath for r in batch if r.name in listed})


def build(sources: list[Source], layers: list[str], n: int, mode: str, keep: str | None = None,
          batch: int = 256) -> Atlas:
    """Stream every source's vectors into an Atlas."""
    atlas = Atlas(n, mode)
    pending: list[Row] = []
    for row in rows(sources, layers):
        pending.append(row)
        if len(pending) == batch:
            atlas.add(pending, keep)
            pending = []
    atlas.add(pending, keep)
    return atlas


def to_json(atlas: Atlas, labels: list[str] | None, references: dict[tuple[str, int], str]) -> dict[str, Any]:
    """atlas.json: per layer and channel the top-N inputs (path, relpath, score, class) by relevance and activation."""
    layers: dict[str, Any] = {}
    for layer, tables in atlas.tables.items():
        channels = []
        for c in range(tables["relevance"].scores.shape[0]):
            entry: dict[str, Any] = {"channel": c}
            for kind in KINDS:
                entry[kind] = [{"path": name, "input": atlas.relpaths.get(name, ""), "score": score,
                                "class": label, **({"label": labels[label]} if labels and 0 <= label < len(labels) else {})}
                               for score, name, label in tables[kind].entries(c)]
            if (layer, c) in references:
                entry["reference"] = references[(layer, c)]
            channels.append(entry)
        layers[layer] = {"channels": len(channels), "concepts": channels}
    return {"top": atlas.n, "mode": atlas.mode, "inputs": atlas.inputs,
            "classes": {str(k): v for k, v in sorted(atlas.counts.items())}, "layers": layers}


def write(atlas: Atlas, out_dir: Path, labels: list[str] | None, references: dict[tuple[str, int], str]) -> None:
    """atlas.json and stats.npz (classes, count, `mean:<layer>` [classes, C]: mean share vectors)."""
    atomic_write_json(out_dir / "atlas.json", to_json(atlas, labels, references), root=out_dir)
    classes = sorted(atlas.counts)
    arrays: dict[str, np.ndarray] = {"classes": np.array(classes, dtype=np.int64),
                                     "count": np.array([atlas.counts[k] for k in classes], dtype=np.int64)}
    for layer, sums in atlas.sums.items():
        arrays[f"mean:{layer}"] = np.stack([sums[k] / atlas.counts[k] for k in classes]).astype(np.float32)
    atomic_write(out_dir / "stats.npz", lambda fh: np.savez(fh, **arrays), root=out_dir)
