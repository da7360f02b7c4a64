"""Reference images of concepts: each channel's top-N inputs cropped to where its conditional
heatmap is, with the heatmap overlaid, as one labelled grid per channel
(`references/<layer>/<channel>.png`).

The crop is the channel's receptive field as its conditional heatmap shows it: the bounding box
of pixels with at least `threshold` of the heatmap's largest positive value, made square and padded.
Each input is explained once, for all channels it is a reference of (one CRP call, K concepts).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from ..data import DecodeLimits, load_image, preprocess
from ..io import atomic_write
from ..model import InputSpec
from ..render import Colormap, denormalise, normalise, overlay
from .atlas import Atlas
from .conditional import ConditionalLRP
from .grid import tile_grid

TILE = 64
THRESHOLD = 0.2


def crop_box(heat: np.ndarray, threshold: float = THRESHOLD, pad: float = 0.1, least: float = 0.25
             ) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a square around the heatmap's relevant region (HxW)."""
    h, w = heat.shape
    positive = np.clip(heat, 0, None)
    weights = positive if positive.max() > 0 else np.abs(heat)
    if weights.max() <= 0:
        return 0, 0, h, w
    ys, xs = np.nonzero(weights >= threshold * weights.max())
    top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    side = max(bottom - top, right - left)
    side = int(min(max(h, w), max(round(side * (1 + 2 * pad)), round(least * min(h, w)), 1)))
    cy, cx = (top + bottom) / 2, (left + right) / 2
    y0 = int(min(max(0, round(cy - side / 2)), max(0, h - side)))
    x0 = int(min(max(0, round(cx - side / 2)), max(0, w - side)))
    return y0, x0, min(side, h), min(side, w)


def reference_tile(x: np.ndarray, relevance: np.ndarray, spec: InputSpec, cmap: Colormap) -> np.ndarray:
    """One reference: the input (CxHxW, normalised) and its conditional heatmap cropped and overlaid, TILE×TILE."""
    heat = relevance.sum(0)
    top, left, height, width = crop_box(heat)
    image = denormalise(x[None], spec.mean, spec.std)[0][top : top + height, left : left + width]
    values, _ = normalise(heat[top : top + height, left : left + width])
    picture = overlay(image, cmap(values), 0.5)
    return np.asarray(Image.fromarray(picture).resize((TILE, TILE), Image.BILINEAR))


def render(atlas: Atlas, engines: Callable[[str], ConditionalLRP], spec: InputSpec, device: torch.device,
           out_dir: Path, cmap: Colormap, limits: DecodeLimits = DecodeLimits()) -> dict[tuple[str, int], str]:
    """Write every channel's reference grid (relevance maximization); returns (layer, channel) -> relative path."""
    written: dict[tuple[str, int], str] = {}
    for layer, tables in atlas.tables.items():
        table = tables["relevance"]
        wanted: dict[str, list[tuple[int, int]]] = {}  # input -> (channel, rank)
        for c in range(table.scores.shape[0]):
            for rank, (_, name, _) in enumerate(table.entries(c)):
                wanted.setdefault(name, []).append((c, rank))
        tiles: dict[int, list[np.ndarray | None]] = {c: [None] * table.n for c in range(table.scores.shape[0])}
        engine = engines(layer)
        for name in sorted(wanted):
            pairs = wanted[name]
            label = int(table.classes[pairs[0][0], pairs[0][1]])
            x = _decode(Path(name), spec, limits).to(device)
            channels = torch.tensor([[c for c, _ in pairs]])
            result = engine(x[None], torch.tensor([label], device=device), lambda r: channels, key="crp-references")
            heat = result.relevance[0].detach().float().cpu().numpy()
            for k, (c, rank) in enumerate(pairs):
                tiles[c][rank] = reference_tile(x.cpu().numpy(), heat[k], spec, cmap)
        for c, found in tiles.items():
            present = [(rank, t) for rank, t in enumerate(found) if t is not None]
            if not present:
                continue
            labels = [f"{rank + 1}: {table.scores[c, rank]:.3g}" for rank, _ in present]
            grid = tile_grid([t for _, t in present], labels, columns=min(len(present), 4))
            relative = f"references/{_safe(layer)}/{c}.png"
            save = lambda fh, grid=grid: Image.fromarray(grid).save(fh, format="PNG")  # noqa: E731
            atomic_write(out_dir / relative, save, root=out_dir)
            written[(layer, c)] = relative
    return written


def _decode(path: Path, spec: InputSpec, limits: DecodeLimits) -> torch.Tensor:
    image, _ = load_image(path, spec.channels, limits)
    x, _, _ = preprocess(image, spec)
    return x


def _safe(layer: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in layer) or "layer"
