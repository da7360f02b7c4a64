"""Inputs: finding image files, decoding them as users expect, preprocessing, streaming in threads.

Decoding follows Pillow's conventions (EXIF orientation applied, alpha dropped as in
`convert("RGB")`, the first frame of animated or multi-page files), but 16-bit and float images
keep their precision in the float array. Every image is checked against `DecodeLimits` from its
header, before a pixel is decoded, and decoding memory is bounded by those limits, never by what
a file claims. Preprocessing follows timm/torchvision eval transforms: resize to
`floor(size / crop_pct)`, center crop, normalise. The geometry (resized size, crop box) comes
back with the tensor so heatmaps can be mapped onto the original image.
"""
from __future__ import annotations

import errno
import glob
import math
import os
import stat
import sys
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .descriptors import InputItem
from .errors import InputError, UsageError
from .model import InputSpec

SUPPORTED = (".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pbm", ".pgm", ".ppm", ".pnm")
"""Suffixes of the images xai decodes (GIF, APNG and multi-page TIFF: the first frame)."""
UNSUPPORTED = (".heic", ".heif", ".avif", ".jxl", ".jp2", ".j2k", ".ico", ".psd", ".svg", ".exr", ".hdr", ".tga",
               ".dng", ".cr2", ".nef", ".arw")
"""Suffixes of images xai finds but does not decode: each becomes a failed input naming its format,
not a silent skip (AVIF and JPEG 2000 depend on how Pillow was built; xai decodes the same everywhere)."""
FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF", "PPM")
"""Pillow decoders xai lets open a file, whatever its suffix (never EPS, PDF, or other delegating ones)."""
INTERPOLATION = {"bilinear": "bilinear", "bicubic": "bicubic", "lanczos": "bicubic", "nearest": "nearest-exact"}


@dataclass(frozen=True)
class DecodeLimits:
    """Budgets that bound decoding by numbers, never by what a file claims; checked from image headers.

    - `max_pixels` (64 Mi = 8192×8192): takes every camera up to 61 MP and 8K frames, and stays
      under Pillow's own 89 MP warning (Pillow's `Image.MAX_IMAGE_PIXELS` still applies when lower).
      Decoding an RGB image peaks at ~10 bytes a pixel (measured: the decoded image, 4, and its
      8-bit array, 3; then that array and one float plane, 4), gray at ~7: one decode stays under
      ~0.7 GB, so `workers` decode threads stay under `workers` × 0.7 GB.
    - `max_aspect` (50:1): the short side is resized to the model's size, so the long side grows
      with the ratio (a 1×20,000,000 strip asks for 82 GB of floats) while the center crop sees
      1/ratio of the image: past 50:1 (2 %) no explanation of the crop speaks for the image.
      Panoramas (up to ~10:1) pass.
    - `preview_pixels` (16 Mi = 4096×4096, 48 MiB): `Decoded.image`, the picture heatmaps are laid
      on at original size, is downscaled beyond it (aspect kept); 12 MP photos keep their size.
    - `inflight_bytes` (1 GiB): decoded results `stream()` holds ahead of its consumer, counted at
      their largest possible size until decoded.
    """

    max_pixels: int = 1 << 26
    max_aspect: float = 50.0
    preview_pixels: int = 1 << 24
    inflight_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 1:
                raise UsageError(f"limits.{f.name} must be a number >= 1, got {value!r}")
        for name in ("max_pixels", "preview_pixels", "inflight_bytes"):
            if not float(getattr(self, name)).is_integer():
                raise UsageError(f"limits.{name} must be a whole number, got {getattr(self, name)!r}")


def escaped(text: str) -> str:
    """`text` safe to write as UTF-8 (JSON, CSV, terminals): bytes of a file name that are not
    UTF-8 (surrogate escapes) become `\\xNN`; every other string is returned unchanged."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# -- discovery ------------------------------------------------------------------------------------

def discover(inputs: Sequence[str | Path], exclude: Sequence[str | Path] = ()) -> list[InputItem]:
    """Every image file named by `inputs` (files, folders walked recursively, globs), in a stable order.

    The same file reached twice is kept once; relpaths that clash across roots get their root
    folder's name as prefix; stems shared by two inputs (`a.jpg`, `a.png`) fall back to relpaths.
    Files inside an `exclude` folder (a run's output folder) are never inputs, even when it lies
    inside an input folder or a link leads into it. Broken links and links looping back to a
    folder being walked are kept, as inputs whose decode fails with that cause.
    """
    skip = tuple(os.path.realpath(e) for e in exclude)
    found: list[tuple[Path, Path]] = []  # (root, file)
    for raw in inputs:
        found.extend(_expand(str(raw), skip))
    found = _unique_files([(root, file) for root, file in found if not _inside(file, skip)])
    relpaths = _relpaths(found)
    stems = _stems(relpaths)
    return [InputItem(path=file, relpath=rel, stem=stem) for (_, file), rel, stem in zip(found, relpaths, stems)]


def _expand(raw: str, skip: tuple[str, ...]) -> list[tuple[Path, Path]]:
    """(root, file) pairs of one input; a literal path wins over a glob reading of the same text."""
    path = Path(raw)
    if path.is_dir():
        return [(path, f) for f in _walk(path, skip)]
    if path.exists() or path.is_symlink():
        return [(path.parent, path)]
    if glob.has_magic(raw):
        root = _glob_root(raw)
        pairs = [(root, f) for m in sorted(glob.glob(raw, recursive=True)) for f in _matched(Path(m), skip)]
        if not pairs:
            raise UsageError(f"no image files ({', '.join(SUPPORTED)}) match {raw!r}")
        return pairs
    raise UsageError(f"input not found: {raw}")


def _walk(folder: Path, skip: tuple[str, ...], chain: tuple[str, ...] = ()) -> Iterator[Path]:
    """Image files under `folder`, depth first in name order; hidden entries and `skip` folders left out.

    Linked folders that lead out of the walked folder are followed (inside it, their files are
    reached by their own path); a link to a folder that holds the walk's current folder (`chain`)
    is yielded itself, to fail as a link loop, instead of being walked forever.
    """
    chain = (*chain, os.path.realpath(folder))
    try:
        entries = sorted(folder.iterdir(), key=lambda p: p.name)
    except OSError as err:
        raise UsageError(f"cannot read folder {folder}: {err.strerror or err}") from None
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            target = os.path.realpath(entry)
            if any(_within(c, target) for c in chain):
                yield entry
            elif not (entry.is_symlink() and _within(target, chain[0])) and not _inside(entry, skip):
                yield from _walk(entry, skip, chain)
        elif _is_image(entry):
            yield entry


def _is_image(path: Path) -> bool:
    """An image file by its suffix: a regular file, or a link that is broken or loops (to fail, named)."""
    suffix = path.suffix.lower()
    return (suffix in SUPPORTED or suffix in UNSUPPORTED) and (path.is_file() or (path.is_symlink() and not path.exists()))


def _inside(path: Path, folders: tuple[str, ...]) -> bool:
    """Whether `path`, links resolved, is one of the (real) `folders` or lies inside one."""
    real = os.path.realpath(path)
    return any(_within(real, f) for f in folders)


def _within(path: str, folder: str) -> bool:
    """Whether the real path `path` is the real path `folder` or lies inside it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _matched(match: Path, skip: tuple[str, ...]) -> list[Path]:
    """Image files of one glob match: a folder is walked; a file is kept if it is an image file."""
    if match.is_dir():
        return list(_walk(match, skip))
    return [match] if _is_image(match) else []


def _glob_root(pattern: str) -> Path:
    """The pattern's leading folders before the first component with a wildcard."""
    parts = Path(pattern).parts
    literal = parts[: next(i for i, p in enumerate(parts) if glob.has_magic(p))]
    return Path(*literal) if literal else Path(".")


def _unique_files(found: list[tuple[Path, Path]]) -> list[tuple[Path, Path]]:
    """Drop later occurrences of a file already found (compared after resolving links and `..`)."""
    seen: set[str] = set()
    unique = []
    for root, file in found:
        key = os.path.realpath(file)  # unlike Path.resolve, never raises on a link loop
        if key not in seen:
            seen.add(key)
            unique.append((root, file))
    return unique


def _relpaths(found: list[tuple[Path, Path]]) -> list[str]:
    """Posix paths relative to each root; clashing ones are prefixed by as many root folder names as needed."""
    base = [file.relative_to(root).as_posix() for root, file in found]
    ancestors = [Path(os.path.realpath(root)).parts[1:] for root, _ in found]
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

def load_image(path: Path, channels: int, limits: DecodeLimits = DecodeLimits()) -> tuple[np.ndarray, np.ndarray]:
    """(float32 HxWxC in [0, 1], uint8 HxWx3 RGB preview) of an image file, `channels` 1 (luma) or 3 (RGB).

    The preview is the image at its size, downscaled (aspect kept) beyond `limits.preview_pixels`.

    Raises InputError(stage="decode") with the cause in user terms; stage "read" when the
    file itself cannot be read.
    """
    pixels, preview = _read(Path(path), channels, limits)
    return _to_float(pixels), preview


def _read(path: Path, channels: int, limits: DecodeLimits) -> tuple[np.ndarray, np.ndarray]:
    """(pixels, preview) of an image file: pixels HxWx`channels`, uint8 for 8-bit images and float32
    in [0, 1] for deeper ones (gray: a read-only view repeating one plane); preview as `load_image`'s."""
    _check_channels(channels)
    im = _open(path, limits)
    try:
        deep = _deep_color(path, im)
        if deep is not None:
            return _deep_pixels(deep, channels, limits.preview_pixels)
        im.load()
        ImageOps.exif_transpose(im, in_place=True)  # in place: a copy would double the image's memory
        return _pixels(im, channels, limits.preview_pixels)
    except InputError:
        raise
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, struct.error... on bad data
        raise InputError(_describe(err), stage="decode") from None
    finally:
        im.close()


def _open(path: Path, limits: DecodeLimits) -> Image.Image:
    """Open (header only) with the failure modes a user can act on spelled out, and check the limits."""
    _check_file(path)
    try:
        im = Image.open(path, formats=FORMATS)
    except (FileNotFoundError, PermissionError, IsADirectoryError) as err:
        raise InputError(f"cannot read file ({err.strerror or err})", stage="read") from None
    except Image.DecompressionBombError as err:
        raise InputError(f"image too large ({err})", stage="decode") from None
    except Exception as err:
        raise InputError(_describe(err), stage="decode") from None
    try:
        _check_size(im.width, im.height, limits)
    except InputError:
        im.close()
        raise
    return im


def _check_file(path: Path) -> None:
    """A regular, non-empty file of a decoded format; links that are broken or loop named as such."""
    suffix = path.suffix.lower()
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if path.is_symlink():
            raise InputError(f"broken symbolic link (its target {os.readlink(path)} does not exist)", stage="read") from None
        raise InputError("cannot read file (No such file or directory)", stage="read") from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise InputError("symbolic link loop (too many levels of symbolic links)", stage="read") from None
        raise InputError(f"cannot read file ({err.strerror or err})", stage="read") from None
    if stat.S_ISDIR(info.st_mode):
        if path.is_symlink():
            raise InputError(f"symbolic link loop (links to the folder {os.path.realpath(path)}, which leads back to the link)", stage="read")
        raise InputError("cannot read file (it is a folder)", stage="read")
    if suffix in UNSUPPORTED:
        raise InputError(f"unsupported image format ({suffix}); xai decodes {', '.join(SUPPORTED)}", stage="decode")
    if info.st_size == 0:
        raise InputError("empty file (0 bytes)", stage="decode")


def _check_size(width: int, height: int, limits: DecodeLimits) -> None:
    """Refuse, from the header, images whose pixel count or aspect ratio is beyond the limits."""
    if width < 1 or height < 1:
        raise InputError(f"image has no pixels ({width}x{height})", stage="decode")
    pillow = Image.MAX_IMAGE_PIXELS
    limit, key = (pillow, "Pillow's Image.MAX_IMAGE_PIXELS") if pillow and pillow < limits.max_pixels else (limits.max_pixels, "limits.max_pixels")
    if width * height > limit:
        raise InputError(f"image too large ({width}x{height} = {width * height} pixels; the limit is {limit} pixels, {key})", stage="decode")
    aspect = max(width, height) / min(width, height)
    if aspect > limits.max_aspect:
        raise InputError(f"image too elongated ({width}x{height}, aspect ratio {aspect:.4g}:1; "
                         f"the limit is {limits.max_aspect:g}:1, limits.max_aspect)", stage="decode")


def _describe(err: Exception) -> str:
    """A Pillow exception as a cause a user understands."""
    text = str(err)
    if isinstance(err, UnidentifiedImageError):
        return "not an image (cannot identify image file)"
    if isinstance(err, MemoryError):
        return "not enough memory to decode the image"
    if "truncated" in text.lower():
        return "truncated image file"
    return f"corrupt or unsupported image data ({text or type(err).__name__})"


def _pixels(im: Image.Image, channels: int, preview_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 or float32 pixels with `channels` channels, 8-bit RGB preview) of a loaded image."""
    if im.mode.startswith("I") or im.mode == "F":
        gray = _deep_gray(im)
        return _repeat(gray, channels), _preview(Image.fromarray(np.round(gray * 255).astype(np.uint8)), preview_pixels)
    if im.mode in ("1", "L"):
        gray = im if im.mode == "L" else im.convert("L")
        return _repeat(_array(gray), channels), _preview(gray, preview_pixels)
    rgb = im if im.mode == "RGB" else im.convert("RGBA").convert("RGB") if im.mode in ("P", "PA") else im.convert("RGB")
    if channels == 1:
        return _array(rgb.convert("L"))[..., None], _preview(rgb, preview_pixels)
    pixels = _array(rgb)
    return pixels, pixels if rgb.width * rgb.height <= preview_pixels else _preview(rgb, preview_pixels)


def _repeat(plane: np.ndarray, channels: int) -> np.ndarray:
    """HxW values as HxWx`channels` without copying them (a read-only view)."""
    return np.broadcast_to(plane[..., None], (*plane.shape, channels))


def _array(im: Image.Image) -> np.ndarray:
    """np.asarray(im), copied band by band: Pillow's own route holds two whole-image byte copies at once."""
    rows = max(1, (1 << 22) // max(1, im.width))
    if rows >= im.height:
        return np.asarray(im)
    first = np.asarray(im.crop((0, 0, im.width, rows)))
    out = np.empty((im.height, *first.shape[1:]), first.dtype)
    out[:rows] = first
    for top in range(rows, im.height, rows):
        bottom = min(im.height, top + rows)
        out[top:bottom] = np.asarray(im.crop((0, top, im.width, bottom)))
    return out


def _preview(im: Image.Image, max_pixels: int) -> np.ndarray:
    """uint8 HxWx3 picture of an "RGB" or "L" image, downscaled (bilinear, aspect kept) to at most `max_pixels`."""
    if im.width * im.height > max_pixels:
        scale = math.sqrt(max_pixels / (im.width * im.height))
        size = (max(1, int(im.width * scale)), max(1, int(im.height * scale)))
        im = im.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)
    values = _array(im)
    return values if values.ndim == 3 else np.repeat(values[..., None], 3, axis=2)


def _to_float(pixels: np.ndarray) -> np.ndarray:
    """A writable float32 copy in [0, 1] of 8-bit or float pixels."""
    if pixels.dtype == np.uint8:
        return np.divide(pixels, np.float32(255), dtype=np.float32)
    return np.array(pixels, dtype=np.float32)


def _check_channels(channels: int) -> None:
    """Images become 1-channel (luma) or 3-channel (RGB) input; anything else is a model spec problem."""
    if channels not in (1, 3):
        raise UsageError(f"model input has {channels} channels; images can feed 1 (grayscale) or 3 (RGB)")


def _deep_gray(im: Image.Image) -> np.ndarray:
    """16/32-bit integer or float gray values in [0, 1] at full precision.

    16-bit modes are divided by 65535; 32-bit integers by 65535 when they hold 16-bit data
    (older Pillow opens 16-bit PNG as "I"), else by 2**32 - 1; floats are kept when in
    [0, 1], else divided by 255 or 65535 when those bound them, else by their maximum.
    NaN or infinite floats are refused: they would become NaN logits.
    """
    values = np.asarray(im).astype(np.float32 if im.mode.startswith("I;16") else np.float64)
    if im.mode == "F" and not np.isfinite(values).all():
        raise InputError("image has NaN/Inf pixel values", stage="decode")
    top = float(values.max()) if values.size else 0.0
    if im.mode.startswith("I;16"):
        scale = 65535.0
    elif im.mode == "F":
        scale = next((s for s in (1.0, 255.0, 65535.0) if top <= s), top)
    else:
        scale = 65535.0 if top <= 65535 else 2.0**32 - 1
    return np.clip(values / scale, 0.0, 1.0).astype(np.float32)


_OTHER_ORDER = {"B": "L", "L": "B", "N": "B" if sys.byteorder == "little" else "L"}


def _deep_color(path: Path, im: Image.Image) -> np.ndarray | None:
    """uint16 HxWx3 (RGB) or HxWx1 (gray) values of a 16-bit RGB(A) or gray+alpha image; None for others.

    Pillow opens these as 8-bit RGB(A), keeping the high byte of each 16-bit sample. The file is
    decoded once more with the samples' byte order swapped, which yields the low bytes; PNG's
    16-bit gray+alpha is decoded as four 8-bit samples (gray high, gray low, alpha high, alpha low).
    Both decodes see the EXIF orientation.
    """
    rawmode = _rawmode(im)
    if rawmode in ("RGB;16B", "RGB;16L", "RGB;16N", "RGBA;16B", "RGBA;16L", "RGBA;16N"):
        low = _decode_as(path, rawmode[:-1] + _OTHER_ORDER[rawmode[-1]])
        im.load()
        ImageOps.exif_transpose(im, in_place=True)
        high = np.asarray(im)[..., :3].astype(np.uint16)
        return (high << 8) | low[..., :3]
    if rawmode == "LA;16B" and im.mode == "RGBA":
        both = _decode_as(path, "RGBA").astype(np.uint16)
        return (both[..., :1] << 8) | both[..., 1:2]
    return None


def _rawmode(im: Image.Image) -> str | None:
    """How Pillow will unpack the file's samples (the same for every tile), when it says."""
    modes = {(t[3] if isinstance(t[3], str) else t[3][0] if t[3] else None) for t in im.tile}
    return modes.pop() if len(modes) == 1 else None


def _decode_as(path: Path, rawmode: str) -> np.ndarray:
    """The file's pixels unpacked with another rawmode, EXIF orientation applied."""
    with Image.open(path, formats=FORMATS) as im:
        im.tile = [_with_rawmode(t, rawmode) for t in im.tile]
        im.load()
        ImageOps.exif_transpose(im, in_place=True)
        return np.asarray(im)


def _with_rawmode(tile, rawmode: str):
    """A tile (Pillow 11+: a named tuple; before: a plain one) that unpacks with `rawmode`."""
    args = rawmode if isinstance(tile[3], str) else (rawmode, *tile[3][1:])
    return tile._replace(args=args) if hasattr(tile, "_replace") else (*tile[:3], args)


def _deep_pixels(values: np.ndarray, channels: int, preview_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """(float32 pixels in [0, 1], 8-bit RGB preview) of uint16 HxWx3 or HxWx1 values; luma as Pillow weighs it."""
    scaled = np.divide(values, np.float32(65535), dtype=np.float32)
    eight = np.round(scaled * 255).astype(np.uint8)
    preview = _preview(Image.fromarray(eight[..., 0] if eight.shape[2] == 1 else eight), preview_pixels)
    if scaled.shape[2] == 1:
        return _repeat(scaled[..., 0], channels), preview
    if channels == 3:
        return scaled, preview
    return (scaled @ np.array([0.299, 0.587, 0.114], np.float32))[..., None], preview


# -- preprocessing --------------------------------------------------------------------------------

def preprocess(image: np.ndarray, spec: InputSpec) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int, int, int]]:
    """(CxHxW normalised float32 model input, resized (h, w), crop (top, left, h, w)) of an HxWxC image,
    uint8 (0..255) or float in [0, 1].

    Channels are made float and resized one at a time: a large image costs one float plane
    (4 bytes a pixel) beyond its own pixels, not a float copy of all of them.
    """
    resized, crop = geometry(image.shape[0], image.shape[1], spec)
    top, left, h, w = crop
    planes = [_resize(_plane(image[..., c]), resized, spec.interpolation)[top : top + h, left : left + w] for c in range(image.shape[2])]
    x = torch.stack(planes)
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(-1, 1, 1)
    return ((x - mean) / std).contiguous(), resized, crop


def _plane(values: np.ndarray) -> torch.Tensor:
    """One channel (HxW, uint8 or float) as a contiguous float32 tensor in [0, 1]."""
    if values.dtype == np.uint8:
        return torch.from_numpy(np.divide(values, np.float32(255), dtype=np.float32))
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))


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
    """Antialiased resize of an HxW float tensor; values stay in [0, 1] (bicubic overshoots otherwise)."""
    if tuple(x.shape) == tuple(size):
        return x
    mode = interpolation_mode(interpolation)
    if mode == "nearest-exact":
        return F.interpolate(x[None, None], size=size, mode=mode)[0, 0]
    return F.interpolate(x[None, None], size=size, mode=mode, antialias=True, align_corners=False)[0, 0].clamp_(0.0, 1.0)


def interpolation_mode(name: str) -> str:
    """torch interpolate mode for a spec's interpolation name (lanczos approximated by bicubic)."""
    try:
        return INTERPOLATION[name.lower()]
    except KeyError:
        raise UsageError(f"unknown interpolation {name!r}; use one of {', '.join(INTERPOLATION)}") from None


# -- masks ----------------------------------------------------------------------------------------

def load_mask(masks_dir: Path, item: InputItem, spec: InputSpec, limits: DecodeLimits = DecodeLimits()) -> torch.Tensor:
    """Ground-truth mask [1,H,W] bool of one input, with the input's resize and crop applied.

    The mask mirrors the input's relpath in `masks_dir`, as PNG (`a/b.jpg` -> `a/b.png`) or
    under the input's own file name; pixels above half intensity are foreground.
    """
    base = item.relpath.rsplit(".", 1)[0] if "." in item.relpath.rsplit("/", 1)[-1] else item.relpath
    candidates = [Path(masks_dir) / f"{base}.png", Path(masks_dir) / item.relpath]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        raise InputError(f"no mask for {item.relpath} in {masks_dir} (looked for {candidates[0].name})", stage="read")
    gray, _ = load_image(path, 1, limits)
    resized, (top, left, h, w) = geometry(gray.shape[0], gray.shape[1], spec)
    mask = F.interpolate(torch.from_numpy(gray).permute(2, 0, 1)[None], size=resized, mode="nearest-exact")[0]
    return mask[:, top : top + h, left : left + w] > 0.5


# -- streaming ------------------------------------------------------------------------------------

@dataclass
class Decoded:
    """One input ready for the model: its tensor, its preview image and the geometry between them.

    The preview is the original image, downscaled (aspect kept) when it has more than
    `DecodeLimits.preview_pixels`; `resized` and `crop` hold for any preview size, since heatmaps
    are mapped onto the preview's own size (`render.to_original`).
    """

    item: InputItem
    x: torch.Tensor  # CxHxW normalised model input
    image: np.ndarray  # HxWx3 uint8 RGB preview: the original image, at most limits.preview_pixels
    resized: tuple[int, int]
    crop: tuple[int, int, int, int]

    @property
    def nbytes(self) -> int:
        return self.x.element_size() * self.x.nelement() + self.image.nbytes


@dataclass
class Failed:
    """One input that could not be decoded; the run records it and goes on."""

    item: InputItem
    stage: str
    cause: str

    nbytes = 0


def decode(item: InputItem, spec: InputSpec, limits: DecodeLimits = DecodeLimits()) -> Decoded | Failed:
    """Load and preprocess one input; an unusable file becomes a Failed, not an exception."""
    try:
        pixels, preview = _read(Path(item.path), spec.channels, limits)
        x, resized, crop = preprocess(pixels, spec)
    except InputError as err:
        return Failed(item, err.stage, str(err))
    except MemoryError:
        return Failed(item, "decode", _describe(MemoryError()))
    return Decoded(item, x, preview, resized, crop)


def stream(
    items: Iterable[InputItem], spec: InputSpec, workers: int = 4, prefetch: int = 64, limits: DecodeLimits = DecodeLimits(),
) -> Iterator[Decoded | Failed]:
    """Decode inputs in `workers` threads and yield them in input order, at most `prefetch` in flight.

    Items are submitted as results are consumed, and only while the results held ahead of the
    consumer fit `limits.inflight_bytes` (an input not yet decoded counts at its largest possible
    size), so memory is bounded by the limits, not by the number of inputs or what files hold.
    Closing the generator cancels what has not started and waits for the decodes already running.
    """
    interpolation_mode(spec.interpolation)
    _check_channels(spec.channels)
    largest = limits.preview_pixels * 3 + 4 * spec.channels * spec.size[0] * spec.size[1]
    pending: deque[Future[Decoded | Failed]] = deque()
    todo = iter(items)
    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="xai-decode")

    def held(future: Future[Decoded | Failed]) -> int:
        if not future.done():
            return largest
        return 0 if future.exception() is not None else future.result().nbytes

    def fill() -> None:
        total = sum(held(f) for f in pending)
        while len(pending) < max(1, prefetch) and (not pending or total + largest <= limits.inflight_bytes):
            item = next(todo, None)
            if item is None:
                return
            pending.append(pool.submit(decode, item, spec, limits))
            total += largest

    try:
        fill()
        while pending:
            result = pending.popleft().result()
            fill()
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


__all__ = [
    "SUPPORTED", "UNSUPPORTED", "DecodeLimits", "Decoded", "Failed", "decode", "discover", "escaped", "geometry",
    "load_image", "load_mask", "preprocess", "stream",
]
