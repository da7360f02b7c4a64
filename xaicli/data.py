"""Inputs: finding image files, decoding them as users expect, preprocessing, streaming in threads.

Decoding follows Pillow's conventions (EXIF orientation applied, alpha dropped as in
`convert("RGB")`), but 16-bit and float images keep their precision in the float array.
Preprocessing follows timm/torchvision eval transforms: resize to `floor(size / crop_pct)`,
center crop, normalise. The geometry (resized size, crop box) comes back with the tensor so
heatmaps can be mapped onto the original image.
"""
from __future__ import annotations

import glob
import math
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .descriptors import InputItem
from .errors import InputError, UsageError
from .model import InputSpec

SUPPORTED = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
INTERPOLATION = {"bilinear": "bilinear", "bicubic": "bicubic", "lanczos": "bicubic", "nearest": "nearest-exact"}


# -- discovery ------------------------------------------------------------------------------------

def discover(inputs: Sequence[str | Path]) -> list[InputItem]:
    """Every image file named by `inputs` (files, folders walked recursively, globs), in a stable order.

    The same file reached twice is kept once; relpaths that clash across roots get their root
    folder's name as prefix; stems shared by two inputs (`a.jpg`, `a.png`) fall back to relpaths.
    """
    found: list[tuple[Path, Path]] = []  # (root, file)
    for raw in inputs:
        found.extend(_expand(str(raw)))
    found = _unique_files(found)
    relpaths = _relpaths(found)
    stems = _stems(relpaths)
    return [InputItem(path=file, relpath=rel, stem=stem) for (_, file), rel, stem in zip(found, relpaths, stems)]


def _expand(raw: str) -> list[tuple[Path, Path]]:
    """(root, file) pairs of one input; a literal path wins over a glob reading of the same text."""
    path = Path(raw)
    if path.is_dir():
        return [(path, f) for f in _walk(path)]
    if path.exists():
        return [(path.parent, path)]
    if glob.has_magic(raw):
        root = _glob_root(raw)
        pairs = [(root, f) for m in sorted(glob.glob(raw, recursive=True)) for f in _matched(Path(m))]
        if not pairs:
            raise UsageError(f"no image files ({', '.join(SUPPORTED)}) match {raw!r}")
        return pairs
    raise UsageError(f"input not found: {raw}")


def _walk(folder: Path) -> Iterator[Path]:
    """Supported, non-hidden files under `folder`, depth first in name order (symlinked folders not followed)."""
    try:
        entries = sorted(folder.iterdir(), key=lambda p: p.name)
    except OSError as err:
        raise UsageError(f"cannot read folder {folder}: {err.strerror or err}") from None
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if not entry.is_symlink():
                yield from _walk(entry)
        elif entry.suffix.lower() in SUPPORTED and entry.is_file():
            yield entry


def _matched(match: Path) -> list[Path]:
    """Image files of one glob match: a folder is walked; a file is kept if its extension is supported."""
    if match.is_dir():
        return list(_walk(match))
    return [match] if match.suffix.lower() in SUPPORTED and match.is_file() else []


def _glob_root(pattern: str) -> Path:
    """The pattern's leading folders before the first component with a wildcard."""
    parts = Path(pattern).parts
    literal = parts[: next(i for i, p in enumerate(parts) if glob.has_magic(p))]
    return Path(*literal) if literal else Path(".")


def _unique_files(found: list[tuple[Path, Path]]) -> list[tuple[Path, Path]]:
    """Drop later occurrences of a file already found (compared after resolving links and `..`)."""
    seen: set[Path] = set()
    unique = []
    for root, file in found:
        key = file.resolve()
        if key not in seen:
            seen.add(key)
            unique.append((root, file))
    return unique


def _relpaths(found: list[tuple[Path, Path]]) -> list[str]:
    """Posix paths relative to each root; clashing ones are prefixed by as many root folder names as needed."""
    base = [file.relative_to(root).as_posix() for root, file in found]
    ancestors = [root.resolve().parts[1:] for root, _ in found]
    rels, depth = list(base), [0] * len(base)
    while True:
        counts = Counter(rels)
        clashing = [i for i, rel in enumerate(rels) if counts[rel] > 1 and depth[i] < len(ancestors[i])]
        if not clashing:
            return rels
        for i in clashing:
            depth[i] += 1
            rels[i] = "/".join((*ancestors[i][-depth[i]:], base[i]))


def _stems(relpaths: list[str]) -> list[str]:
    """Output base names: relpath without extension, or the whole relpath where stems would collide.

    Compared case-insensitively, so outputs stay distinct on case-insensitive file systems too.
    """
    stems = [InputItem(Path(rel), rel).stem for rel in relpaths]
    while True:
        counts = Counter(s.casefold() for s in stems)
        clashing = [i for i, s in enumerate(stems) if counts[s.casefold()] > 1 and s != relpaths[i]]
        if not clashing:
            return stems
        for i in clashing:
            stems[i] = relpaths[i]


# -- decoding -------------------------------------------------------------------------------------

def load_image(path: Path, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """(float32 HxWxC in [0, 1], uint8 HxWx3 RGB preview) of an image file, `channels` 1 (luma) or 3 (RGB).

    Raises InputError(stage="decode") with the cause in user terms; stage "read" when the
    file itself cannot be read.
    """
    _check_channels(channels)
    im = _open(Path(path))
    try:
        im.load()
        im = ImageOps.exif_transpose(im)
        return _pixels(im, channels)
    except InputError:
        raise
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, struct.error... on bad data
        raise InputError(_describe(err), stage="decode") from None
    finally:
        im.close()


def _open(path: Path) -> Image.Image:
    """Open (header only) with the failure modes a user can act on spelled out."""
    try:
        if path.stat().st_size == 0:
            raise InputError("empty file (0 bytes)", stage="decode")
        im = Image.open(path)
    except (FileNotFoundError, PermissionError, IsADirectoryError) as err:
        raise InputError(f"cannot read file ({err.strerror or err})", stage="read") from None
    except Image.DecompressionBombError as err:
        raise InputError(f"image too large ({err})", stage="decode") from None
    except InputError:
        raise
    except Exception as err:
        raise InputError(_describe(err), stage="decode") from None
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and im.width * im.height > limit:
        im.close()
        raise InputError(f"image too large ({im.width}x{im.height} pixels exceeds the limit of {limit} pixels)", stage="decode")
    return im


def _describe(err: Exception) -> str:
    """A Pillow exception as a cause a user understands."""
    text = str(err)
    if isinstance(err, UnidentifiedImageError):
        return "not an image (cannot identify image file)"
    if "truncated" in text.lower():
        return "truncated image file"
    return f"corrupt or unsupported image data ({text or type(err).__name__})"


def _pixels(im: Image.Image, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Float pixels with `channels` channels and the 8-bit RGB preview of a loaded image."""
    if im.mode.startswith("I") or im.mode == "F":
        gray = _deep_gray(im)
        preview = np.repeat(np.round(gray * 255).astype(np.uint8)[..., None], 3, axis=2)
        return np.repeat(gray[..., None], channels, axis=2), preview
    rgb = im.convert("RGBA").convert("RGB") if im.mode in ("P", "PA") else im.convert("RGB")
    preview = np.asarray(rgb)
    if channels == 3:
        return preview.astype(np.float32) / 255.0, preview
    return (np.asarray(rgb.convert("L"), dtype=np.float32) / 255.0)[..., None], preview


def _check_channels(channels: int) -> None:
    """Images become 1-channel (luma) or 3-channel (RGB) input; anything else is a model spec problem."""
    if channels not in (1, 3):
        raise UsageError(f"model input has {channels} channels; images can feed 1 (grayscale) or 3 (RGB)")


def _deep_gray(im: Image.Image) -> np.ndarray:
    """16/32-bit integer or float gray values in [0, 1] at full precision.

    16-bit modes are divided by 65535; 32-bit integers by 65535 when they hold 16-bit data
    (older Pillow opens 16-bit PNG as "I"), else by 2**32 - 1; floats are kept when in
    [0, 1], else divided by 255 or 65535 when those bound them, else by their maximum.
    """
    values = np.asarray(im).astype(np.float32 if im.mode.startswith("I;16") else np.float64)
    top = float(values.max()) if values.size else 0.0
    if im.mode.startswith("I;16"):
        scale = 65535.0
    elif im.mode == "F":
        scale = next((s for s in (1.0, 255.0, 65535.0) if top <= s), top)
    else:
        scale = 65535.0 if top <= 65535 else 2.0**32 - 1
    return np.clip(values / scale, 0.0, 1.0).astype(np.float32)


# -- preprocessing --------------------------------------------------------------------------------

def preprocess(image: np.ndarray, spec: InputSpec) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int, int, int]]:
    """(CxHxW normalised float32 model input, resized (h, w), crop (top, left, h, w)) of an HxWxC float image."""
    resized, crop = geometry(image.shape[0], image.shape[1], spec)
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)
    x = _resize(x, resized, spec.interpolation)
    top, left, h, w = crop
    x = x[:, top : top + h, left : left + w]
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(-1, 1, 1)
    return ((x - mean) / std).contiguous(), resized, crop


def geometry(height: int, width: int, spec: InputSpec) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """Resized (h, w) and center-crop box (top, left, h, w) of an image, as torchvision's Resize + CenterCrop.

    A square size resizes the short side to floor(size / crop_pct) (timm's rule); a non-square
    size scales the image to cover floor(size / crop_pct) in both dimensions. Never smaller than the crop.
    """
    th, tw = spec.size
    sh, sw = max(th, math.floor(th / spec.crop_pct)), max(tw, math.floor(tw / spec.crop_pct))
    if sh / height >= sw / width:
        resized = (sh, max(sw, int(sh * width / height)))
    else:
        resized = (max(sh, int(sw * height / width)), sw)
    top, left = int(round((resized[0] - th) / 2.0)), int(round((resized[1] - tw) / 2.0))
    return resized, (top, left, th, tw)


def _resize(x: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """Antialiased resize of a CxHxW float tensor; values stay in [0, 1] (bicubic overshoots otherwise)."""
    if tuple(x.shape[1:]) == tuple(size):
        return x
    mode = interpolation_mode(interpolation)
    if mode == "nearest-exact":
        return F.interpolate(x[None], size=size, mode=mode)[0]
    return F.interpolate(x[None], size=size, mode=mode, antialias=True, align_corners=False)[0].clamp_(0.0, 1.0)


def interpolation_mode(name: str) -> str:
    """torch interpolate mode for a spec's interpolation name (lanczos approximated by bicubic)."""
    try:
        return INTERPOLATION[name.lower()]
    except KeyError:
        raise UsageError(f"unknown interpolation {name!r}; use one of {', '.join(INTERPOLATION)}") from None


# -- masks ----------------------------------------------------------------------------------------

def load_mask(masks_dir: Path, item: InputItem, spec: InputSpec) -> torch.Tensor:
    """Ground-truth mask [1,H,W] bool of one input, with the input's resize and crop applied.

    The mask mirrors the input's relpath in `masks_dir`, as PNG (`a/b.jpg` -> `a/b.png`) or
    under the input's own file name; pixels above half intensity are foreground.
    """
    base = item.relpath.rsplit(".", 1)[0] if "." in item.relpath.rsplit("/", 1)[-1] else item.relpath
    candidates = [Path(masks_dir) / f"{base}.png", Path(masks_dir) / item.relpath]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        raise InputError(f"no mask for {item.relpath} in {masks_dir} (looked for {candidates[0].name})", stage="read")
    gray, _ = load_image(path, 1)
    resized, (top, left, h, w) = geometry(gray.shape[0], gray.shape[1], spec)
    mask = F.interpolate(torch.from_numpy(gray).permute(2, 0, 1)[None], size=resized, mode="nearest-exact")[0]
    return mask[:, top : top + h, left : left + w] > 0.5


# -- streaming ------------------------------------------------------------------------------------

@dataclass
class Decoded:
    """One input ready for the model: its tensor, its preview image and the geometry between them."""

    item: InputItem
    x: torch.Tensor  # CxHxW normalised model input
    image: np.ndarray  # HxWx3 uint8 RGB preview at original size
    resized: tuple[int, int]
    crop: tuple[int, int, int, int]


@dataclass
class Failed:
    """One input that could not be decoded; the run records it and goes on."""

    item: InputItem
    stage: str
    cause: str


def decode(item: InputItem, spec: InputSpec) -> Decoded | Failed:
    """Load and preprocess one input; an unusable file becomes a Failed, not an exception."""
    try:
        image, preview = load_image(item.path, spec.channels)
        x, resized, crop = preprocess(image, spec)
    except InputError as err:
        return Failed(item, err.stage, str(err))
    return Decoded(item, x, preview, resized, crop)


def stream(items: Iterable[InputItem], spec: InputSpec, workers: int = 4, prefetch: int = 64) -> Iterator[Decoded | Failed]:
    """Decode inputs in `workers` threads and yield them in input order, at most `prefetch` in flight.

    Items are submitted as results are consumed, so memory is bounded by `prefetch`, not by
    the number of inputs. Closing the generator cancels what has not started and waits for
    the decodes already running.
    """
    interpolation_mode(spec.interpolation)
    _check_channels(spec.channels)
    pending: deque[Future[Decoded | Failed]] = deque()
    todo = iter(items)
    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="xai-decode")
    try:
        for item in todo:
            pending.append(pool.submit(decode, item, spec))
            if len(pending) >= max(1, prefetch):
                break
        while pending:
            result = pending.popleft().result()
            item = next(todo, None)
            if item is not None:
                pending.append(pool.submit(decode, item, spec))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


__all__ = [
    "SUPPORTED", "Decoded", "Failed", "decode", "discover", "geometry", "load_image", "load_mask",
    "preprocess", "stream",
]
