"""Reading a run's relevance arrays as small heatmaps, streaming: one npz at a time, none kept.

Each `arrays/<output>/<stem>.npz` becomes one row: the relevance (CxHxW) reduced over channels
(signed sum by default, as the png writer and SpRAy do), area-pooled to `size` (each output pixel
the mean of the input pixels it covers; PIL's box filter, exact for non-integer ratios too), then
normalised so heatmaps of different scale compare by shape:

- `max_abs` (default): divided by max |R| of the pooled map, so values lie in [-1, 1];
- `sum_abs`: divided by sum |R| (CoRelAy's examples divide by the sum of the map);
- `none`: as computed.

A map that is all zero stays zero. Only the pooled rows are kept: memory is N x h x w float32
(100,000 heatmaps at 32x32 take 400 MB) whatever the size of the npz files.
"""
from __future__ import annotations

import csv
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from ..errors import UsageError
from ..npz import read_npz
from ..render import REDUCTIONS, reduce_channels

NORMALISATIONS = ("max_abs", "sum_abs", "none")
CHUNK = 256  # files read per round of the thread pool: bounds the arrays in flight


@dataclass
class Heatmaps:
    """The pooled heatmaps of one method output: row i belongs to `stems[i]`, class `classes[i]`."""

    output: str
    stems: list[str]
    classes: np.ndarray  # int64 [N]
    rows: np.ndarray  # float32 [N, h*w]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (npz path, cause)


def pool(relevance: np.ndarray, size: tuple[int, int], reduce: str = "sum", normalise: str = "max_abs") -> np.ndarray:
    """One h*w float32 row of a CxHxW (or HxW) relevance array; see the module docstring."""
    r = np.asarray(relevance, dtype=np.float32)
    if r.ndim not in (2, 3) or 0 in r.shape:
        raise ValueError(f"relevance has shape {r.shape}; expected CxHxW")
    maps = reduce_channels(r, reduce) if r.ndim == 3 else r
    maps = np.nan_to_num(maps, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)
    h, w = size
    if maps.shape == (h, w):
        small = maps
    elif maps.shape[0] % h == 0 and maps.shape[1] % w == 0:
        fh, fw = maps.shape[0] // h, maps.shape[1] // w
        small = maps.reshape(h, fh, w, fw).mean(axis=(1, 3))
    else:
        small = np.asarray(Image.fromarray(maps, mode="F").resize((w, h), Image.Resampling.BOX), dtype=np.float32)
    if normalise == "max_abs":
        scale = float(np.abs(small).max())
    elif normalise == "sum_abs":
        scale = float(np.abs(small).sum())
    else:
        scale = 1.0
    return (small / scale if scale > 0 else small).reshape(-1).astype(np.float32)


def find_outputs(run_dir: Path, methods: Sequence[str] = ()) -> dict[str, list[Path]]:
    """The npz files per method output of a run (sorted); UsageError when there are none."""
    arrays = Path(run_dir) / "arrays"
    if not Path(run_dir).is_dir():
        raise UsageError(f"run folder {run_dir} does not exist")
    if not arrays.is_dir():
        raise UsageError(f"{run_dir} has no arrays/ folder: analyze reads the npz arrays of an `xai explain` "
                         "or `xai evaluate` run (with the npz writer)")
    found = sorted(p.name for p in arrays.iterdir() if p.is_dir())
    chosen = list(methods) or found
    missing = [m for m in chosen if m not in found]
    if missing:
        raise UsageError(f"--method {missing[0]}: no arrays/{missing[0]}/ in {run_dir}; "
                         f"the run has: {', '.join(found) or 'none'}")
    outputs = {m: sorted((arrays / m).rglob("*.npz")) for m in chosen}
    outputs = {m: files for m, files in outputs.items() if files}
    if not outputs:
        raise UsageError(f"{arrays} holds no .npz files to analyze")
    return outputs


def read_labels(path: Path) -> dict[str, int]:
    """A CSV with columns input,label: input relpath (or its stem) -> class index."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or not {"input", "label"} <= set(reader.fieldnames):
                raise UsageError(f"--labels {path}: expected a header with columns input,label; "
                                 f"got {', '.join(reader.fieldnames or []) or 'an empty file'}")
            labels: dict[str, int] = {}
            for line, row in enumerate(reader, 2):
                try:
                    label = int(str(row["label"]).strip())
                except ValueError:
                    raise UsageError(f"--labels {path}:{line}: label {row['label']!r} is not a class index") from None
                name = str(row["input"]).strip()
                labels[name] = label
                labels.setdefault(stem_of(name), label)
            return labels
    except OSError as exc:
        raise UsageError(f"--labels {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"--labels {path}: not a UTF-8 text file") from None


def stem_of(relpath: str) -> str:
    """An input's output stem: its relative path without the extension (as xaicli.descriptors.InputItem)."""
    last = relpath.rsplit("/", 1)[-1]
    return relpath.rsplit(".", 1)[0] if "." in last else relpath


def input_names(run_dir: Path) -> dict[str, str]:
    """stem -> input relpath, from the run's metrics.csv (an `xai evaluate` run); empty otherwise."""
    path = Path(run_dir) / "metrics.csv"
    names: dict[str, str] = {}
    if not path.is_file():
        return names
    try:
        with open(path, newline="", encoding="utf-8", errors="replace") as fh:
            for row in csv.DictReader(fh):
                if row.get("input"):
                    names.setdefault(stem_of(row["input"]), row["input"])
    except (OSError, csv.Error):
        return {}
    return names


def _load(path: Path, size: tuple[int, int], reduce: str, normalise: str) -> tuple[int, np.ndarray] | str:
    """(target, row) of one npz, or the reason it cannot be used."""
    try:
        if not zipfile.is_zipfile(path):
            return "not an npz archive (empty, truncated or corrupt)"
        data = read_npz(path, ("relevance", "target"))
        if "relevance" not in data or "target" not in data:
            return "no 'relevance' or 'target' array (not an xai npz)"
        target = int(np.asarray(data["target"]).reshape(-1)[0])
        return target, pool(data["relevance"], size, reduce, normalise)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError, IndexError) as exc:
        return f"unreadable npz: {str(exc).strip() or type(exc).__name__}"


def read_heatmaps(
    output: str, files: Sequence[Path], root: Path, size: tuple[int, int], reduce: str = "sum",
    normalise: str = "max_abs", workers: int = 4, advance: Callable[[int], None] = lambda n: None,
) -> Heatmaps:
    """Pool every file of one output into a preallocated [N, h*w] buffer, CHUNK files at a time;
    bad files are listed in `skipped` with their cause and left out."""
    if reduce not in REDUCTIONS:
        raise UsageError(f"analysis.reduce: must be one of {', '.join(REDUCTIONS)}; got {reduce!r}")
    rows = np.empty((len(files), size[0] * size[1]), dtype=np.float32)
    classes = np.empty(len(files), dtype=np.int64)
    stems: list[str] = []
    skipped: list[tuple[str, str]] = []
    n = 0
    with ThreadPoolExecutor(max(1, workers)) as pool_:
        for chunk in _chunks(files, CHUNK):
            for path, result in zip(chunk, pool_.map(lambda p: _load(p, size, reduce, normalise), chunk)):
                if isinstance(result, str):
                    skipped.append((str(path), result))
                    continue
                classes[n], rows[n] = result
                stems.append(path.relative_to(root).with_suffix("").as_posix())
                n += 1
            advance(len(chunk))
    if n < len(files):  # shrink in place rather than copy: the buffer may be most of the memory
        rows.resize((n, rows.shape[1]), refcheck=False)
        classes = classes[:n].copy()
    return Heatmaps(output, stems, classes, rows, skipped)


def _chunks(items: Sequence[Path], n: int) -> Iterator[Sequence[Path]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def relabel(heatmaps: Heatmaps, labels: dict[str, int], names: dict[str, str]) -> tuple[np.ndarray, list[str]]:
    """Classes from a labels CSV (by relpath or stem); -1 marks inputs the CSV does not name.
    Returns (classes, stems not found)."""
    classes = np.full(len(heatmaps.stems), -1, dtype=np.int64)
    missing = []
    for i, stem in enumerate(heatmaps.stems):
        label = labels.get(names.get(stem, stem), labels.get(stem))
        if label is None:
            missing.append(stem)
        else:
            classes[i] = label
    return classes, missing


def chosen_classes(classes: Iterable[int], wanted: Sequence[int] | None) -> list[int]:
    """The classes to analyse: every class present (sorted), or those of `wanted` that are present."""
    present = sorted({int(c) for c in classes if c >= 0})
    return present if not wanted else [c for c in sorted(set(wanted)) if c in present]
