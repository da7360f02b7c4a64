"""Pictures of concepts: a grid of labelled tiles (conditional heatmaps, reference crops)."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..render import Colormap, normalise, overlay

LABEL = 12  # pixels of the label strip above each tile
GAP = 2  # pixels between tiles
MIN_TILE = 64  # small inputs are enlarged (nearest) so labels and pixels stay readable


def tile_grid(tiles: Sequence[np.ndarray], labels: Sequence[str], columns: int | None = None) -> np.ndarray:
    """HxWx3 uint8 tiles (same size) side by side, `columns` per row (default: about square), each under its label."""
    if not tiles:
        return np.full((LABEL + MIN_TILE, MIN_TILE, 3), 255, np.uint8)
    h, w = tiles[0].shape[:2]
    zoom = max(1, math.ceil(MIN_TILE / max(1, min(h, w))))
    h, w = h * zoom, w * zoom
    columns = columns or math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    canvas = Image.new("RGB", (columns * (w + GAP) - GAP, rows * (h + LABEL + GAP) - GAP), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i, (tile, label) in enumerate(zip(tiles, labels)):
        top, left = (i // columns) * (h + LABEL + GAP), (i % columns) * (w + GAP)
        picture = Image.fromarray(tile).resize((w, h), Image.NEAREST)
        canvas.paste(picture, (left, top + LABEL))
        draw.text((left + 1, top), label, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def concept_grid(relevance: np.ndarray, concepts: Sequence[int], share: Sequence[float], cmap: Colormap,
                 symmetric: bool = True, reduce: str = "sum", level: float = 1.0,
                 image: np.ndarray | None = None, alpha: float = 0.5) -> np.ndarray:
    """One input's K conditional heatmaps [K, C, H, W] as a grid labelled `#channel share%`, each scaled
    on its own; overlaid on `image` (HxWx3 uint8 at input size) when given."""
    values, _ = normalise(relevance, symmetric, reduce, level)
    pictures = cmap(values)
    if image is not None:
        pictures = np.stack([overlay(image, p, alpha) for p in pictures])
    labels = [f"#{int(c)} {100 * float(s):.1f}%" for c, s in zip(concepts, share)]
    return tile_grid(list(pictures), labels)
