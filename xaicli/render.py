"""Relevance as pictures: colormaps from a small text spec, relevance -> RGB, overlays on the
input, and the way back from model-input size to the original photo.

Conventions (as Zennit's imgify): a heatmap is one value per pixel, obtained by reducing the
channels of the relevance (`sum` by default); symmetric scaling maps [-m, m] with m = max|R| to
[0, 1], so zero relevance lands on the colormap's centre (white for `bwr`) and the sign stays
readable; non-symmetric scaling maps [min, max] to [0, 1]. Each map is scaled on its own.
"""
from __future__ import annotations

import functools
import re
from typing import Sequence

import numpy as np
from PIL import Image

from .suggest import did_you_mean

COLORMAPS: dict[str, str] = {
    "gray": "000,fff",
    "wred": "fff,f00",
    "wblue": "fff,00f",
    "hot": "000,f00,ff0,fff",
    "cold": "000,00f,0ff",
    "coldnhot": "0ff,00f,80:000,f00,ff0,fff",
    "bwr": "00f,80:fff,f00",
    "france": "0055a4,80:fff,ef4135",
    "seismic": "0000d0,80:d0d0d0,d00000",
    # matplotlib's perceptually uniform maps, as knots picked greedily (add the position of the
    # largest error until every channel is within 2.5/255 of matplotlib's 256-entry table)
    "cividis": "00:00224e,15:003170,17:013271,1c:123570,22:1e3a6f,34:36466c,54:565c6d,7e:7b7a78,"
    "93:8f8a78,b3:aea371,cd:c9b965,e8:e7d150,fb:fde334,ff:fee838",
    "viridis": "00:440154,1d:482979,39:3e4a89,5a:2e6d8e,81:20928c,8f:1f9f88,9a:23a983,aa:35b779,"
    "bc:56c667,d0:84d44b,ee:d2e21b,f6:e7e419,ff:fde725",
}
REDUCTIONS = ("sum", "abs_sum", "max_abs")

_NODE = re.compile(r"(?:([0-9a-f]{1,2}):)?([0-9a-f]{6}|[0-9a-f]{3})", re.IGNORECASE)
_HEX = re.compile(r"[0-9a-f]+", re.IGNORECASE)


class Colormap:
    """A piecewise-linear colormap, compiled to a 256-entry palette.

    Spec: comma-separated colours `[PP:]RGB` or `[PP:]RRGGBB` in hex, `PP` a position 00..ff
    (one digit `8` means `88`). Unpositioned colours are spaced evenly between their positioned
    neighbours; the first defaults to 00 and the last to ff, and the ends hold their colour out
    to 00 and ff. Equal positions make a hard step. Example: `00f,80:fff,f00` (bwr).
    A value v in [0, 1] takes palette entry floor(256 v) (1.0 takes ff), so 0.5 lands exactly
    on position 80, the centre.
    """

    def __init__(self, spec: str, name: str = ""):
        self.spec = spec
        self.name = name or spec
        self.palette = _compile(spec)
        self.palette.flags.writeable = False  # shared between writer threads

    def __call__(self, values: np.ndarray | float) -> np.ndarray:
        """uint8 RGB [..., 3] of values in [0, 1] (clipped; NaN takes the centre)."""
        v = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.5)
        index = np.clip(np.floor(v * 256.0), 0, 255).astype(np.intp)
        return self.palette[index]

    def __repr__(self) -> str:
        return f"Colormap({self.name!r})"


def _compile(spec: str) -> np.ndarray:
    """The 256x3 uint8 palette of a spec (see Colormap)."""
    positions, colours = _parse(spec)
    at = np.array([0.0, *positions, 256.0])  # ends hold their colour; 256 keeps every segment non-empty
    rgb = np.array([colours[0], *colours, colours[-1]], dtype=np.float64)
    k = np.arange(256, dtype=np.float64)
    i = np.searchsorted(at, k, side="right") - 1
    t = ((k - at[i]) / (at[i + 1] - at[i]))[:, None]
    return np.round(rgb[i] + (rgb[i + 1] - rgb[i]) * t).astype(np.uint8)


def _parse(spec: str) -> tuple[list[float], list[list[int]]]:
    """Positions (0..255, non-decreasing) and RGB colours of the nodes of a spec."""
    given: list[int | None] = []
    colours: list[list[int]] = []
    for part in (p.strip() for p in spec.split(",")):
        match = _NODE.fullmatch(part)
        if match is None:
            raise ValueError(f"colormap spec {spec!r}: {part!r} is not a colour like 'f00', 'ff0000' or '80:fff'")
        pos, hexcolour = match.groups()
        given.append(int(pos * 2 if len(pos) == 1 else pos, 16) if pos else None)
        pairs = [c * 2 for c in hexcolour] if len(hexcolour) == 3 else [hexcolour[j : j + 2] for j in (0, 2, 4)]
        colours.append([int(p, 16) for p in pairs])
    if len(colours) < 2:
        raise ValueError(f"colormap spec {spec!r}: needs at least two colours, e.g. '00f,80:fff,f00'")
    given[0] = 0 if given[0] is None else given[0]
    given[-1] = 255 if given[-1] is None else given[-1]
    anchors = [j for j, p in enumerate(given) if p is not None]
    positions = [float(p) if p is not None else 0.0 for p in given]
    for a, b in zip(anchors, anchors[1:]):
        positions[a : b + 1] = np.linspace(positions[a], positions[b], b - a + 1).tolist()
    if any(q < p for p, q in zip(positions, positions[1:])):
        raise ValueError(f"colormap spec {spec!r}: positions must not decrease from left to right")
    return positions, colours


@functools.lru_cache(maxsize=64)
def _named_or_spec(name_or_spec: str) -> Colormap:
    if name_or_spec in COLORMAPS:
        return Colormap(COLORMAPS[name_or_spec], name_or_spec)
    if "," in name_or_spec or ":" in name_or_spec or _HEX.fullmatch(name_or_spec):  # names have neither
        return Colormap(name_or_spec)
    raise ValueError(
        f"unknown colormap {name_or_spec!r}{did_you_mean(name_or_spec, COLORMAPS)}; "
        f"named: {', '.join(COLORMAPS)}; or a spec such as '00f,80:fff,f00'"
    )


def colormap(name_or_spec: str | Colormap) -> Colormap:
    """A named colormap (COLORMAPS) or one compiled from a spec; ValueError names the known ones.

    `cividis` and `viridis` approximate matplotlib's tables with 13-14 greedily placed knots
    (every channel within 3/255); the others are Zennit's, with their look.
    """
    return name_or_spec if isinstance(name_or_spec, Colormap) else _named_or_spec(name_or_spec.strip())


def reduce_channels(relevance: np.ndarray, reduce: str = "sum") -> np.ndarray:
    """[..., C, H, W] -> [..., H, W]: `sum` (signed, Zennit's default), `abs_sum`, or `max_abs`
    (the largest magnitude over channels, as Simonyan et al.'s saliency maps)."""
    r = np.asarray(relevance, dtype=np.float32)
    if reduce == "sum":
        return r.sum(axis=-3)
    if reduce == "abs_sum":
        return np.abs(r).sum(axis=-3)
    if reduce == "max_abs":
        return np.abs(r).max(axis=-3)
    raise ValueError(f"unknown channel reduction {reduce!r}{did_you_mean(reduce, REDUCTIONS)}; use one of {', '.join(REDUCTIONS)}")


def normalise(
    relevance: np.ndarray, symmetric: bool = True, reduce: str = "sum", level: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Colormap values [..., H, W] in [0, 1] of relevance [..., C, H, W] (or HxW), and per map the
    value zero relevance takes (the fill outside a crop).

    A map without range draws at the centre (symmetric) or at 0 (non-symmetric) rather than
    dividing by zero; non-finite relevance counts as zero. `level` works as Zennit's: values
    move away from the centre by that factor and clip, so level > 1 saturates sooner.
    """
    r = np.asarray(relevance, dtype=np.float32)
    maps = reduce_channels(r, reduce) if r.ndim >= 3 else r
    maps = np.nan_to_num(maps, nan=0.0, posinf=0.0, neginf=0.0)
    axes = (-2, -1)
    if symmetric:
        m = np.abs(maps).max(axis=axes, keepdims=True)
        values = 0.5 + maps / (2.0 * np.where(m > 0, m, 1.0))
        zero = np.full(m.shape, 0.5)
    else:
        lo, hi = maps.min(axis=axes, keepdims=True), maps.max(axis=axes, keepdims=True)
        span = np.where(hi > lo, hi - lo, 1.0)
        values = np.where(hi > lo, (maps - lo) / span, 0.0)
        zero = np.where(hi > lo, -lo / span, 0.0)
    values, zero = (np.clip(0.5 + (v - 0.5) * level, 0.0, 1.0) for v in (values, zero))
    return values.astype(np.float32), zero[..., 0, 0].astype(np.float32)


def heatmap(
    relevance: np.ndarray, cmap: str | Colormap = "bwr", symmetric: bool = True, reduce: str = "sum", level: float = 1.0
) -> np.ndarray:
    """uint8 RGB [..., H, W, 3] of relevance CxHxW, HxW or a batch BxCxHxW (see `normalise`)."""
    values, _ = normalise(relevance, symmetric, reduce, level)
    return colormap(cmap)(values)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """(1 - alpha) * image + alpha * heat, both HxWx3 uint8 (a gray HxW or HxWx1 image is spread to RGB)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1]; got {alpha}")
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[:2] != heat.shape[:2]:
        raise ValueError(f"overlay needs equal sizes: image {image.shape[:2]}, heatmap {heat.shape[:2]}")
    blend = (1.0 - alpha) * image.astype(np.float32) + alpha * heat.astype(np.float32)
    return np.clip(np.round(blend), 0, 255).astype(np.uint8)


def denormalise(inputs: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 RGB [B, H, W, 3] of normalised model inputs [B, C, H, W] (C = 1 is shown as gray)."""
    x = np.asarray(inputs, dtype=np.float32)
    if x.shape[1] not in (1, 3):
        raise ValueError(f"cannot show a {x.shape[1]}-channel input as an image (1 or 3 channels)")
    shape = (1, -1, 1, 1)
    x = x * np.asarray(std, dtype=np.float32).reshape(shape) + np.asarray(mean, dtype=np.float32).reshape(shape)
    rgb = np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8).transpose(0, 2, 3, 1)
    return np.repeat(rgb, 3, axis=3) if rgb.shape[3] == 1 else rgb


def to_original(
    heat: np.ndarray,
    resized: tuple[int, int],
    crop: tuple[int, int, int, int],
    original_size: tuple[int, int],
    fill: float | Sequence[float] = 0.5,
) -> np.ndarray:
    """A model-input-sized map (HxW or HxWxC) put back where its center crop came from inside the
    resized image, then resized (bilinear) to the original (height, width), so it lines up with
    the original photo.

    Outside the crop is `fill`: by default 0.5, zero relevance on symmetric `normalise` values
    (the colormap's centre); pass `normalise`'s zero, or a colour for an RGB image. The dtype is kept.
    """
    top, left, h, w = crop
    if heat.shape[:2] != (h, w):
        raise ValueError(f"heatmap is {heat.shape[:2]} but the crop is {(h, w)}")
    if top < 0 or left < 0 or top + h > resized[0] or left + w > resized[1]:
        raise ValueError(f"crop {crop} does not fit in the resized image {resized}")
    planes = heat.astype(np.float32).reshape(h, w, -1)
    canvas = np.empty((resized[0], resized[1], planes.shape[2]), dtype=np.float32)
    canvas[...] = np.broadcast_to(np.asarray(fill, dtype=np.float32), (planes.shape[2],))
    canvas[top : top + h, left : left + w] = planes
    size = (int(original_size[1]), int(original_size[0]))  # PIL wants (width, height)
    out = np.stack(
        [np.asarray(Image.fromarray(np.ascontiguousarray(canvas[..., c])).resize(size, Image.Resampling.BILINEAR)) for c in range(canvas.shape[2])],
        axis=-1,
    )
    if np.issubdtype(heat.dtype, np.integer):
        info = np.iinfo(heat.dtype)
        out = np.clip(np.round(out), info.min, info.max)
    return out.astype(heat.dtype).reshape(out.shape[:2] + heat.shape[2:])
