"""Part 1: fuzzed and adversarial images through `xai explain`; every file must be accounted for.

Fuzzed files are valid PNG/JPEG/BMP/TIFF/WebP/GIF images (demo digits or random content, in
many modes, written by Pillow) mutated by bit flips, byte overwrites, insertions, deletions,
truncations, header corruptions and PNG/BMP size fields rewritten with valid checksums.
Crafted ones: decompression bombs, extreme aspect ratios, 9000x9000 1-bit PNGs, zTXt/iCCP
bombs, float TIFF with NaN/Inf, 16-bit RGB PNG, a non-UTF-8 name, symlink loops, a dangling
symlink, empty files and directories named like images.

A run passes when it exits 0/1 within its time limit without a traceback, stays under the
memory bound, and every input file has its heatmap and npz (finite values) or an errors.jsonl line;
valid files of the documented formats (PNG, JPEG, BMP, TIFF, WebP; any mode, 16-bit keeping its
precision) must be explained.
"""
from __future__ import annotations

import io
import os
import random
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image

from .launch import Job, Task, run
from .report import Tally, errors_lines, npz_problem

METHOD = "saliency"
TIMEOUT = 600.0  # wall seconds of one run (about 200 files): a blocked hang
CPU_TIMEOUT = 120.0  # CPU seconds of one run: a busy hang, whatever the machine's load
FORMATS = ("png", "jpg", "bmp", "tif", "webp", "gif")
MODES = {
    "png": ("L", "RGB", "RGBA", "P", "LA", "I;16", "1"),
    "jpg": ("L", "RGB", "CMYK"),
    "bmp": ("1", "L", "P", "RGB"),
    "tif": ("L", "RGB", "RGBA", "I;16", "F", "CMYK", "1"),
    "webp": ("RGB", "RGBA"),
    "gif": ("P", "L"),
}
MUTATIONS = (("bitflip", 20), ("overwrite", 15), ("insert", 10), ("delete", 10), ("truncate", 20),
             ("header", 15), ("dims", 5), ("valid", 5))


@dataclass
class Batch:
    """One `xai explain` run over a folder: its files (relpath -> what it is) and expectations."""

    name: str
    folder: Path
    cases: dict[str, str] = field(default_factory=dict)  # relpath -> description
    precision: set[str] = field(default_factory=set)  # relpaths whose decoded input must keep >1 distinct value
    valid: set[str] = field(default_factory=set)  # relpaths of valid files in documented formats: must be explained


# -- valid images -----------------------------------------------------------------------------------

def digits(folder: Path) -> list[Image.Image]:
    """The demo digits as grayscale images."""
    return [Image.open(p).convert("L") for p in sorted(folder.rglob("*.png"))]


def picture(rng: random.Random, nrng: np.random.Generator, digit_images: list[Image.Image]) -> Image.Image:
    """An RGB picture: a resized demo digit, noise, or a gradient, of a random small size."""
    size = (rng.randint(8, 96), rng.randint(8, 96))
    kind = rng.choice(("digit", "noise", "gradient"))
    if kind == "digit":
        return rng.choice(digit_images).resize(size).convert("RGB")
    if kind == "noise":
        return Image.fromarray(nrng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    ramp = np.linspace(0, 255, size[0] * size[1] * 3).reshape(size[1], size[0], 3)
    return Image.fromarray(ramp.astype(np.uint8))


def encode(im: Image.Image, fmt: str, rng: random.Random) -> tuple[bytes, str]:
    """(file bytes, mode) of `im` saved as `fmt` in a random mode with random encoder options."""
    mode = rng.choice(MODES[fmt])
    if mode == "I;16":
        arr = (np.asarray(im.convert("L"), dtype=np.uint16) * 257).astype("<u2")
        im = Image.fromarray(arr)
    elif mode == "F":
        im = Image.fromarray(np.asarray(im.convert("L"), dtype=np.float32) / 255.0, mode="F")
    else:
        im = im.convert(mode)
    options: dict = {}
    if fmt == "jpg":
        options = {"quality": rng.randint(20, 95), "progressive": rng.random() < 0.3}
    elif fmt == "tif":
        options = {"compression": rng.choice((None, "tiff_lzw", "tiff_deflate", "packbits"))}
    elif fmt == "webp":
        options = {"lossless": rng.random() < 0.5, "quality": rng.randint(20, 95)}
    buf = io.BytesIO()
    im.save(buf, format={"jpg": "JPEG", "tif": "TIFF"}.get(fmt, fmt.upper()), **options)
    return buf.getvalue(), mode


# -- mutations --------------------------------------------------------------------------------------

def mutate(data: bytes, kind: str, fmt: str, rng: random.Random) -> bytes:
    """`data` damaged by one kind of mutation (MUTATIONS)."""
    buf = bytearray(data)
    n = len(buf)
    if kind == "bitflip":
        for _ in range(rng.randint(1, 16)):
            buf[rng.randrange(n)] ^= 1 << rng.randrange(8)
    elif kind == "overwrite":
        for _ in range(rng.randint(1, 16)):
            buf[rng.randrange(n)] = rng.randrange(256)
    elif kind == "insert":
        at = rng.randrange(n + 1)
        buf[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif kind == "delete":
        at = rng.randrange(n)
        del buf[at : at + rng.randint(1, max(1, min(64, n // 4)))]
    elif kind == "truncate":
        del buf[rng.randrange(n):]
    elif kind == "header":
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(min(n, 48))] = rng.choice((0x00, 0xFF, 0x7F, 0x80, rng.randrange(256)))
    elif kind == "dims":
        return resize_header(data, fmt, rng)
    return bytes(buf)


def resize_header(data: bytes, fmt: str, rng: random.Random) -> bytes:
    """PNG or BMP whose size fields claim another size (PNG CRC recomputed); other formats: header noise."""
    w, h = (rng.choice((0, 1, 65535, 2**31 - 1, rng.randint(2, 100_000))) for _ in range(2))
    if fmt == "png" and data[12:16] == b"IHDR":
        ihdr = struct.pack(">II", w, h) + data[24:29]
        return data[:8] + chunk(b"IHDR", ihdr) + data[33:]
    if fmt == "bmp" and len(data) >= 26:
        return data[:18] + struct.pack("<ii", min(w, 2**31 - 1), min(h, 2**31 - 1)) + data[26:]
    return mutate(data, "header", fmt, rng)


def fuzz_cases(seed: int, n: int, digit_images: list[Image.Image]) -> Iterator[tuple[str, bytes, str]]:
    """(file name, bytes, description) of `n` mutated images, the same for the same seed."""
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    kinds, weights = zip(*MUTATIONS)
    for i in range(n):
        fmt = FORMATS[i % len(FORMATS)]
        data, mode = encode(picture(rng, nrng, digit_images), fmt, rng)
        kind = rng.choices(kinds, weights)[0]
        yield f"f{i:04d}_{kind}.{fmt}", mutate(data, kind, fmt, rng), f"{fmt} {mode} {kind}"


# -- crafted files ----------------------------------------------------------------------------------

def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png(width: int, height: int, depth: int, color: int, raw: Iterable[bytes], extra: bytes = b"") -> bytes:
    """A PNG from its filtered scanlines, compressed as they stream (huge images cost no memory to write)."""
    deflate = zlib.compressobj(9)
    data = b"".join(deflate.compress(block) for block in raw) + deflate.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + extra + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def scanlines(height: int, row: Callable[[int], bytes]) -> Iterator[bytes]:
    """Rows `row(y)` with filter byte 0, joined in blocks."""
    for start in range(0, height, 4096):
        yield b"".join(b"\x00" + row(y) for y in range(start, min(height, start + 4096)))


def constant(height: int, row: bytes) -> Iterator[bytes]:
    """`height` identical rows, in blocks of about 1 MB."""
    line = b"\x00" + row
    per = max(1, (1 << 20) // len(line))
    for start in range(0, height, per):
        yield line * min(per, height - start)


def compressed_zeros(size: int) -> bytes:
    deflate = zlib.compressobj(9)
    block = bytes(1 << 20)
    return b"".join(deflate.compress(block) for _ in range(size >> 20)) + deflate.flush()


def small_png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def with_chunk(data: bytes, extra: bytes) -> bytes:
    """A PNG with `extra` chunks inserted after IHDR."""
    return data[:33] + extra + data[33:]


def jpeg_claiming(data: bytes, height: int, width: int) -> bytes:
    """A JPEG whose SOF marker claims another size."""
    buf = bytearray(data)
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        at = buf.find(marker)
        if at >= 0:
            buf[at + 5 : at + 9] = struct.pack(">HH", height, width)
            return bytes(buf)
    raise ValueError("no SOF marker")


def crafted(root: Path, rng: random.Random, digit_images: list[Image.Image]) -> list[Batch]:
    """The adversarial files, in small folders so that one that ends its run spares the others."""
    nrng = np.random.default_rng(rng.randrange(2**32))
    digit = digit_images[0].resize((32, 32))
    batches = []

    def batch(name: str, files: dict[str, tuple[bytes, str]]) -> Batch:
        b = Batch(f"adv_{name}", root / f"adv_{name}")
        b.folder.mkdir(parents=True)
        for rel, (data, what) in files.items():
            (b.folder / rel).write_bytes(data)
            b.cases[rel] = what
        batches.append(b)
        return b

    batch("tall", {"tall.png": (png(1, 20_000_000, 8, 0, constant(20_000_000, b"\x00")), "1x20,000,000 PNG")})
    batch("wide", {"wide.png": (png(20_000_000, 1, 8, 0, constant(1, bytes(20_000_000))), "20,000,000x1 PNG")})
    rows = [nrng.integers(0, 256, 1125, dtype=np.uint8).tobytes() if i % 4 == 0 else bytes(1125) for i in range(16)]
    batch("bits", {f"bits{i}.png": (png(9000, 9000, 1, 0, scanlines(9000, lambda y, i=i: rows[(y * (i + 1)) % 16])), "9000x9000 1-bit PNG")
                   for i in range(4)})
    jpg = io.BytesIO()
    digit.convert("RGB").save(jpg, format="JPEG")
    bmp = io.BytesIO()
    digit.save(bmp, format="BMP")
    base = small_png(digit)
    bomb = compressed_zeros(256 << 20)
    batch("bombs", {
        "bomb30k.png": (png(30000, 30000, 1, 0, constant(30000, bytes(3750))), "30000x30000 PNG bomb"),
        "ztxt.png": (with_chunk(base, chunk(b"zTXt", b"Comment\x00\x00" + bomb)), "zTXt bomb (256 MB text)"),
        "iccp.png": (with_chunk(base, chunk(b"iCCP", b"icc\x00\x00" + bomb)), "iCCP bomb (256 MB profile)"),
        "jpeg_bomb.jpg": (jpeg_claiming(jpg.getvalue(), 65500, 65500), "JPEG claiming 65500x65500"),
        "bmp_bomb.bmp": (bmp.getvalue()[:18] + struct.pack("<ii", 100_000, 100_000) + bmp.getvalue()[26:],
                         "BMP claiming 100000x100000"),
        "zero.png": (resize_zero(base), "PNG claiming 0x0"),
    })
    misc = batch("misc", {
        "control.png": (base, "valid control"),
        "float_nan.tif": (float_tiff(nrng), "float TIFF with NaN/Inf"),
        "rgb16.png": (png(32, 32, 16, 2, scanlines(32, rgb16_row)), "16-bit RGB PNG, 192 values in one 8-bit step"),
        "empty.png": (b"", "empty file"),
        "empty.jpg": (b"", "empty file"),
        "still.gif": (gif(digit, 1), "GIF"),
        "anim.gif": (gif(digit, 3), "animated GIF"),
    })
    misc.precision.add("rgb16.png")
    misc.valid.update(("control.png", "rgb16.png"))
    odd = os.fsencode(misc.folder) + b"/nonutf8_\xff\xfe.png"
    with open(odd, "wb") as fh:
        fh.write(base)
    misc.cases[os.fsdecode(b"nonutf8_\xff\xfe.png")] = "file name not UTF-8"
    for link, target, what in (("loop.png", "loop.png", "symlink loop (self)"), ("loopa.png", "loopb.png", "symlink loop (pair)"),
                               ("loopb.png", "loopa.png", "symlink loop (pair)"), ("dangling.png", "missing.png", "dangling symlink")):
        (misc.folder / link).symlink_to(target)
        misc.cases[link] = what
    (misc.folder / "x.png").mkdir()
    (misc.folder / "x.png" / "inner.png").write_bytes(base)
    misc.cases["x.png/inner.png"] = "valid image in a directory named x.png"
    misc.valid.add("x.png/inner.png")
    (misc.folder / "y.jpg").mkdir()  # an empty directory named like an image: nothing to account for
    return batches


def resize_zero(data: bytes) -> bytes:
    ihdr = struct.pack(">II", 0, 0) + data[24:29]
    return data[:8] + chunk(b"IHDR", ihdr) + data[33:]


def rgb16_row(y: int) -> bytes:
    """192 distinct 16-bit values (0x1000..0x10BF) that 8-bit decoding maps to one."""
    values = [0x1000 + (y * 32 + x) % 192 for x in range(32)]
    return b"".join(struct.pack(">HHH", v, v, v) for v in values)


def float_tiff(nrng: np.random.Generator) -> bytes:
    values = nrng.random((32, 32), dtype=np.float32)
    values[3, :] = np.nan
    values[7, 4] = np.inf
    values[9, 9] = -np.inf
    buf = io.BytesIO()
    Image.fromarray(values, mode="F").save(buf, format="TIFF")
    return buf.getvalue()


def gif(im: Image.Image, frames: int) -> bytes:
    buf = io.BytesIO()
    pictures = [im.rotate(30 * i).convert("P") for i in range(frames)]
    pictures[0].save(buf, format="GIF", save_all=frames > 1, append_images=pictures[1:])
    return buf.getvalue()


# -- runs -------------------------------------------------------------------------------------------

def batches(root: Path, seed: int, n_fuzz: int, per_run: int, demo: Path) -> list[Batch]:
    """Fuzzed images in folders of `per_run`, then the crafted folders."""
    digit_images = digits(demo / "images")
    out: list[Batch] = []
    for i, (name, data, what) in enumerate(fuzz_cases(seed, n_fuzz, digit_images)):
        if i % per_run == 0:
            out.append(Batch(f"fuzz_{i // per_run}", root / f"fuzz_{i // per_run}"))
            out[-1].folder.mkdir(parents=True)
        (out[-1].folder / name).write_bytes(data)
        out[-1].cases[name] = what
        if what.endswith(" valid") and not name.endswith(".gif"):
            out[-1].valid.add(name)
    return out + crafted(root, random.Random(seed + 1), digit_images)


def explain_args(model: Path, folder: Path, out: Path) -> list[str]:
    return ["explain", str(model), str(folder), "-m", METHOD, "-o", str(out), "--workers", "2", "--quiet",
            "--set", "writers.png.colormap=coldnhot", "--set", "writers.npz.inputs=true"]


def task(b: Batch, model: Path, work: Path, mem_bound: int, tally: Tally) -> Task:
    """Run `xai explain` over one folder (a real process) and check every file of it."""
    out = work / "out" / b.name
    job = Job(explain_args(model, b.folder, out), work / "cwd", work / "logs" / f"{b.name}.log", TIMEOUT, warm=False,
              cpu_timeout=CPU_TIMEOUT)
    outcome = yield from run(job)
    tally.cases += len(b.cases)
    tally.check_run(b.name, outcome, (0, 1), f"{CPU_TIMEOUT:.0f} CPU s, {TIMEOUT:.0f} s")
    if outcome.maxrss > mem_bound:
        tally.fail("memory", b.name, f"peak resident memory {outcome.maxrss / 2**30:.2f} GiB > bound "
                   f"{mem_bound / 2**30:.1f} GiB ({len(b.cases)} files)")
    tally.notes["max peak memory MiB"] = max(tally.notes["max peak memory MiB"], outcome.maxrss >> 20)
    tally.notes["runs printing Python warnings"] += "Warning: " in outcome.log
    account(b, out, tally)


def account(b: Batch, out: Path, tally: Tally) -> None:
    """Every file of the batch: outputs (finite) or an errors.jsonl line naming it."""
    try:
        named = {key: str(e.get("cause", "")) for e in errors_lines(out) for key in _names(e, b.folder)}
    except (ValueError, UnicodeDecodeError) as exc:
        tally.fail("errors.jsonl", b.name, f"unreadable: {exc}")
        named = {}
    for rel, what in b.cases.items():
        stem = rel.rsplit(".", 1)[0]
        heatmap = out / "heatmaps" / METHOD / f"{stem}.png"
        arrays = out / "arrays" / METHOD / f"{stem}.npz"
        case = f"{b.name}/{rel!r} ({what})"
        if heatmap.is_file() and arrays.is_file():
            problem = npz_problem(arrays)
            if problem:
                tally.fail("non-finite output", case, problem)
            elif rel in b.precision and not _keeps_precision(arrays):
                tally.fail("precision", case, "every decoded input value is the same: 16-bit detail lost")
            else:
                tally.notes["explained"] += 1
        elif rel in b.valid:
            tally.fail("valid file refused", case, named.get(rel, "no outputs"))
        elif rel in named or _spellings(rel) & set(named):
            tally.notes["in errors.jsonl"] += 1
        else:
            tally.fail("unaccounted", case, "no outputs and no errors.jsonl line")


def _names(error: dict, folder: Path) -> set[str]:
    """Relpaths an errors.jsonl line may name a file by: its `input`, or its `path` under the folder."""
    names = {str(error.get("input", ""))}
    path = str(error.get("path", ""))
    for base in (str(folder), os.path.realpath(folder)):
        if path.startswith(base + "/"):
            names.add(path[len(base) + 1 :])
    return names


def _spellings(rel: str) -> set[str]:
    """Ways a JSON line can spell a name that is not UTF-8: escaped bytes or replacement characters."""
    raw = os.fsencode(rel)
    return {raw.decode("utf-8", "backslashreplace"), raw.decode("utf-8", "replace"), raw.decode("latin-1")}


def _keeps_precision(arrays: Path) -> bool:
    with np.load(arrays, allow_pickle=False) as data:
        return "input" not in data.files or len(np.unique(data["input"])) > 1
