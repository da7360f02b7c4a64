"""Thumbnails of a run as sprite sheets: few files, however many inputs.

Heatmaps are stored once per method as 8-bit gray sheets whose value is the colormap index
(render.normalise, symmetric: 128 = zero relevance); the page colours them with an SVG filter per
colormap, so switching colormaps costs no extra files. Inputs (for overlays) are RGB JPEG sheets,
from the NPZ `input` arrays or, when those were not stored, from the original image files.
Sheet s holds rows s*PER_SHEET ... of the run's input order, COLUMNS tiles a row.
"""
from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..data import discover, escaped, load_image, preprocess
from ..errors import InputError
from ..io import atomic_write
from ..model import InputSpec
from ..npz import read_npz
from ..render import denormalise, normalise
from .collect import Run

PER_SHEET = 100
COLUMNS = 10


@dataclass
class Table:
    """Per input (run order): what the gallery shows and filters on, read from the NPZ files."""

    target: list[int]  # -1: no arrays
    predicted: list[int]  # -1: not stored (runs before `predicted` was an NPZ key)
    prob: dict[str, list[float | None]]  # method -> probability of the target
    present: dict[str, list[bool]]  # method -> has a heatmap
    inputs: list[bool]  # has an input thumbnail
    problems: list[str] = field(default_factory=list)


def sheets(count: int) -> int:
    return math.ceil(count / PER_SHEET)


def write_thumbnails(run: Run, out: Path, tile: int, root: Path) -> Table:
    """Write thumbs/heat/<method index>/<sheet>.png and thumbs/input/<sheet>.jpg under `out`."""
    n = len(run.keys)
    table = Table([-1] * n, [-1] * n, {m: [None] * n for m in run.methods}, {m: [False] * n for m in run.methods}, [False] * n)
    pictures: dict[int, np.ndarray] = {}  # input thumbnails of the current sheet
    spec = _spec(run.manifest)
    originals: dict[str, Path] | None = None
    for s in range(sheets(n)):
        rows = range(s * PER_SHEET, min(n, (s + 1) * PER_SHEET))
        pictures.clear()
        for m, method in enumerate(run.methods):
            canvas = np.full((_rows(len(rows)) * tile, COLUMNS * tile), 128, np.uint8)
            for i in rows:
                arrays = _load(run, method, run.keys[i], table)
                if arrays is None:
                    continue
                _record(table, method, i, arrays)
                values = normalise(arrays["relevance"])[0]
                _paste(canvas, i % PER_SHEET, tile, _fit(values, tile))
                if i not in pictures and "input" in arrays and spec is not None:
                    pictures[i] = _fit_rgb(denormalise(arrays["input"][None], spec.mean, spec.std)[0], tile)
            _save(out / "thumbs" / "heat" / str(m) / f"{s}.png", Image.fromarray(canvas, "L"), root)
        missing = [i for i in rows if i not in pictures]
        if missing and spec is not None:
            originals = _originals(run) if originals is None else originals
            for i in missing:
                picture = _original(originals.get(run.keys[i]), spec, tile)
                if picture is not None:
                    pictures[i] = picture
        if pictures:
            canvas = np.zeros((_rows(len(rows)) * tile, COLUMNS * tile, 3), np.uint8)
            for i, picture in pictures.items():
                _paste(canvas, i % PER_SHEET, tile, picture)
                table.inputs[i] = True
            _save(out / "thumbs" / "input" / f"{s}.jpg", Image.fromarray(canvas, "RGB"), root, "JPEG")
    return table


def _rows(count: int) -> int:
    return max(1, math.ceil(count / COLUMNS))


def _load(run: Run, method: str, key: str, table: Table) -> dict[str, np.ndarray] | None:
    path = run.files[method].get(key)
    if path is None:
        return None
    try:
        arrays = read_npz(path, ("relevance", "target", "prob", "predicted", "input"))
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        table.problems.append(f"{escaped(str(path))}: cannot be read ({type(exc).__name__}: {exc})")
        return None
    relevance = arrays.get("relevance")
    if relevance is None or relevance.ndim not in (2, 3):
        table.problems.append(f"{escaped(str(path))}: no CxHxW 'relevance' array")
        return None
    return arrays


def _record(table: Table, method: str, i: int, arrays: dict[str, np.ndarray]) -> None:
    table.present[method][i] = True
    if "prob" in arrays and arrays["prob"].size == 1 and math.isfinite(float(arrays["prob"])):
        table.prob[method][i] = round(float(arrays["prob"]), 4)
    if table.target[i] < 0 and "target" in arrays and arrays["target"].size == 1:
        table.target[i] = int(arrays["target"])
    if table.predicted[i] < 0 and "predicted" in arrays and arrays["predicted"].size == 1:
        table.predicted[i] = int(arrays["predicted"])


def _box(h: int, w: int, tile: int) -> tuple[int, int]:
    """Size of an h×w picture fitted into a tile, aspect kept."""
    scale = tile / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def _fit(values: np.ndarray, tile: int) -> np.ndarray:
    """uint8 colormap indices (floor(256 v), as render.Colormap) of values in [0, 1], fitted into a tile."""
    h, w = _box(*values.shape, tile)
    small = np.asarray(Image.fromarray(values.astype(np.float32), "F").resize((w, h), Image.BILINEAR))
    return np.clip(np.floor(small * 256.0), 0, 255).astype(np.uint8)


def _fit_rgb(picture: np.ndarray, tile: int) -> np.ndarray:
    h, w = _box(*picture.shape[:2], tile)
    return np.asarray(Image.fromarray(picture, "RGB").resize((w, h), Image.BILINEAR))


def _paste(canvas: np.ndarray, slot: int, tile: int, picture: np.ndarray) -> None:
    """Centre `picture` in tile `slot` of a sheet."""
    top = (slot // COLUMNS) * tile + (tile - picture.shape[0]) // 2
    left = (slot % COLUMNS) * tile + (tile - picture.shape[1]) // 2
    canvas[top : top + picture.shape[0], left : left + picture.shape[1]] = picture


def _save(path: Path, image: Image.Image, root: Path, fmt: str = "PNG") -> None:
    options: dict[str, Any] = {"compress_level": 3} if fmt == "PNG" else {"quality": 85}
    atomic_write(path, lambda fh: image.save(fh, format=fmt, **options), root=root)


def _spec(manifest: dict[str, Any]) -> InputSpec | None:
    """The model input spec run.json recorded (de-normalises inputs), or None."""
    spec = (manifest.get("model") or {}).get("input") or {}
    try:
        return InputSpec(size=tuple(spec["size"]), channels=int(spec["channels"]), mean=tuple(spec["mean"]),
                         std=tuple(spec["std"]), interpolation=spec.get("interpolation", "bilinear"),
                         crop_pct=float(spec.get("crop_pct", 1.0)))
    except (KeyError, TypeError, ValueError):
        return None


def _originals(run: Run) -> dict[str, Path]:
    """stem -> image file of the run's inputs, when they are still where the recipe says."""
    inputs = [str(p) for p in (run.manifest.get("recipe") or {}).get("inputs", []) if Path(str(p)).exists()]
    if not inputs:
        return {}
    try:
        return {escaped(item.stem): item.path for item in discover(inputs, exclude=[run.folder])}
    except Exception:  # noqa: BLE001 - inputs that moved or broke only cost the overlay
        return {}


def _original(path: Path | None, spec: InputSpec, tile: int) -> np.ndarray | None:
    """The model's view of an original image (resized, cropped), fitted into a tile."""
    if path is None:
        return None
    try:
        pixels, _ = load_image(path, spec.channels)
    except (InputError, OSError):
        return None
    x, _, _ = preprocess(pixels, spec)
    return _fit_rgb(denormalise(x.numpy()[None], spec.mean, spec.std)[0], tile)

