"""Inputs that try to break a run: header-declared giants, odd file names, links, NaN pixels, deep colour.

Every file is real and built in the test; the giant images are tiny files whose headers claim
huge sizes, so the tests prove the refusal happens before a pixel is decoded.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from xaicli import data
from xaicli.data import DecodeLimits, Decoded, Failed, decode, discover, escaped, load_image, stream
from xaicli.descriptors import BatchOutput, InputItem
from xaicli.errors import UsageError
from xaicli.model import InputSpec
from xaicli.render import to_original
from xaicli.rng import derive_seed

RNG = np.random.default_rng(0)
DEMO = Path(__file__).resolve().parents[1] / "demo"  # the digits CNN and its PNGs, shipped
SPEC = InputSpec(size=(16, 16), crop_pct=1.0)


def item(path: Path) -> InputItem:
    return InputItem(path, path.name)


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png(path: Path, width: int, height: int, depth: int, colour: int, rows: bytes | None = None) -> Path:
    """A PNG built by hand (Pillow writes no 16-bit RGB); `rows` None: all-zero pixels, filter 0."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
    if rows is None:
        rows = bytes(height * (1 + (width * channels * depth + 7) // 8))
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return path


def paeth_rows(values: np.ndarray) -> bytes:
    """Big-endian 16-bit samples, every row filtered with a different PNG filter (0..4) as encoders do."""
    rows, bpp = values.astype(">u2").reshape(len(values), -1).view(np.uint8).astype(int), values.shape[2] * 2
    out, previous = [], np.zeros(rows.shape[1], int)
    for y, row in enumerate(rows):
        kind = y % 5
        left = np.concatenate([np.zeros(bpp, int), row[:-bpp]])
        upper_left = np.concatenate([np.zeros(bpp, int), previous[:-bpp]])
        if kind == 4:
            p = left + previous - upper_left
            pa, pb, pc = abs(p - left), abs(p - previous), abs(p - upper_left)
            predictor = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, previous, upper_left))
        else:
            predictor = [np.zeros_like(row), left, previous, (left + previous) // 2][kind]
        out.append(bytes([kind]) + ((row - predictor) % 256).astype(np.uint8).tobytes())
        previous = row
    return b"".join(out)


# -- limits from the header ---------------------------------------------------------------------

@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any pixel decode fails the test: refusals must come from the header alone."""
    def load(self):
        raise AssertionError("pixels were decoded")
    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def test_a_strip_of_twenty_million_pixels_is_refused_from_its_header(tmp_path: Path, no_decoding) -> None:
    path = png(tmp_path / "strip.png", 20_000_000, 1, 1, 0)
    assert path.stat().st_size < 5_000  # the 2.5 KB file: no pixel count limit catches it
    result = decode(item(path), SPEC)
    assert isinstance(result, Failed) and result.stage == "decode"
    assert result.cause == ("image too elongated (20000000x1, aspect ratio 2e+07:1; the limit is 50:1, limits.max_aspect)")


def test_too_many_pixels_is_refused_from_its_header(tmp_path: Path, no_decoding) -> None:
    path = png(tmp_path / "huge.png", 9000, 9000, 1, 0)
    result = decode(item(path), SPEC)
    assert result == Failed(item(path), "decode", "image too large (9000x9000 = 81000000 pixels; the limit is "
                                                  "67108864 pixels, limits.max_pixels)")


@pytest.mark.parametrize("limits,cause", [
    (DecodeLimits(max_pixels=1279), "image too large (40x32 = 1280 pixels; the limit is 1279 pixels, limits.max_pixels)"),
    (DecodeLimits(max_aspect=1.2), "image too elongated (40x32, aspect ratio 1.25:1; the limit is 1.2:1, limits.max_aspect)"),
    (DecodeLimits(max_pixels=1280, max_aspect=1.25), None),
])
def test_limits_are_parameters_of_decode_and_stream(tmp_path: Path, limits: DecodeLimits, cause: str | None) -> None:
    path = tmp_path / "img.png"
    Image.fromarray(RNG.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(path)
    results = [decode(item(path), SPEC, limits), *stream([item(path)], SPEC, limits=limits)]
    for result in results:
        assert (result.cause if cause else type(result)) == (cause or Decoded)


@pytest.mark.parametrize("key,value", [("max_pixels", 0), ("max_aspect", 0.5), ("preview_pixels", True),
                                       ("inflight_bytes", 1.5), ("max_pixels", "big")])
def test_bad_limits_are_usage_errors_naming_the_key(key: str, value) -> None:
    with pytest.raises(UsageError, match=f"limits.{key} must be"):
        DecodeLimits(**{key: value})


# -- bounded memory -----------------------------------------------------------------------------

def test_preview_is_downscaled_and_heatmaps_still_line_up(tmp_path: Path) -> None:
    path = tmp_path / "img.png"
    Image.fromarray(RNG.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(path)
    full = decode(item(path), SPEC)
    small = decode(item(path), SPEC, DecodeLimits(preview_pixels=320))
    assert full.image.shape == (32, 40, 3) and small.image.shape == (16, 20, 3)
    assert torch.equal(full.x, small.x) and (full.resized, full.crop) == (small.resized, small.crop) == ((16, 20), (0, 2, 16, 16))
    # a heatmap of ones over the crop lands on the same part of the picture at either size
    heat = np.ones((16, 16), np.float32)
    on_full = to_original(heat, full.resized, full.crop, full.image.shape[:2], fill=0.0)
    on_small = to_original(heat, small.resized, small.crop, small.image.shape[:2], fill=0.0)
    assert on_small.shape == small.image.shape[:2]
    np.testing.assert_array_equal(on_full[:, 6:34] == 1, True)
    np.testing.assert_array_equal(on_small[:, 3:17] == 1, True)
    assert on_full[:, :3].max() == on_small[:, :1].max() == on_full[:, 37:].max() == on_small[:, 19:].max() == 0
    gray = tmp_path / "gray.png"
    Image.fromarray(np.arange(32 * 40, dtype=np.uint16).reshape(32, 40)).save(gray)
    image, preview = load_image(gray, 1, DecodeLimits(preview_pixels=320))
    assert image.shape == (32, 40, 1) and preview.shape == (16, 20, 3) and preview.flags.c_contiguous


def test_stream_holds_decoded_results_within_the_byte_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(12):
        Image.fromarray(np.full((10, 10, 3), 20 * i, np.uint8)).save(tmp_path / f"{i:02d}.png")
    limits = DecodeLimits(preview_pixels=100, inflight_bytes=3 * (100 * 3 + 3 * 16 * 16 * 4))  # three results
    started: list[str] = []
    original = data.decode

    def counting(item: InputItem, spec: InputSpec, limits: DecodeLimits):
        started.append(item.relpath)
        return original(item, spec, limits)

    monkeypatch.setattr(data, "decode", counting)
    ahead = []
    for k, result in enumerate(stream(discover([tmp_path]), SPEC, workers=4, prefetch=64, limits=limits)):
        assert isinstance(result, Decoded) and result.nbytes == 100 * 3 + 3 * 16 * 16 * 4
        ahead.append(len(started) - (k + 1))
    assert len(ahead) == 12 and max(ahead) <= 3  # beyond the result it holds, the consumer has at most 3 decoded or decoding


# -- file names that are not UTF-8 --------------------------------------------------------------

def test_non_utf8_file_names_are_found_decoded_and_escaped(tmp_path: Path) -> None:
    raw = os.path.join(os.fsencode(tmp_path), b"bad\xff.png")
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(raw, format="PNG")
    (found,) = discover([tmp_path])
    assert os.fsencode(found.path) == raw and found.relpath == "bad\udcff.png"
    assert isinstance(decode(found, SPEC), Decoded)
    assert escaped(found.relpath) == "bad\\xff.png" and escaped("ünï/cödé.png") == "ünï/cödé.png"
    escaped(found.relpath).encode("utf-8")  # writable as UTF-8
    # seeds: names that are UTF-8 keep their seeds; others hash as their bytes
    plain = int.from_bytes(hashlib.sha256("0\x1fa/b.png".encode()).digest()[:8], "little") >> 1
    assert derive_seed(0, "a/b.png") == plain
    assert derive_seed(0, found.relpath) == int.from_bytes(hashlib.sha256(b"0\x1fbad\xff.png").digest()[:8], "little") >> 1


def test_metrics_csv_escapes_names_and_resumes_without_duplicates(tmp_path: Path) -> None:
    from xaicli_plugins.writers.summary import MetricsCsvSink

    items = [InputItem(tmp_path / "x", "bad\udcff.png"), InputItem(tmp_path / "y", "good.png")]
    zeros = np.zeros((2, 1, 2, 2), np.float32)
    batch = BatchOutput(output="saliency", method="saliency", params={}, items=items, inputs=zeros, images=[], crops=[],
                        resized=[], target=np.zeros(2, np.int64), logit=np.zeros(2, np.float32), prob=np.zeros(2, np.float32),
                        relevance=zeros, scores={"complexity": np.array([1.0, 2.0])})
    for _ in range(2):  # the second sink is a resumed run scoring the same inputs again
        sink = MetricsCsvSink(tmp_path)
        sink.write(batch)
        sink.close({"recipe": {"overwrite": False}})
    with open(tmp_path / "metrics.csv", encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows == [["input", "method", "metric", "score"], ["bad\\xff.png", "saliency", "complexity", "1.0"],
                    ["good.png", "saliency", "complexity", "2.0"]]


# -- the output folder is never an input --------------------------------------------------------

def test_output_folder_inside_an_input_folder_is_excluded(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    for rel in ["a.png", "sub/b.png", "out/heatmaps/m/a.png", "out/arrays/m/a.png"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    (root / "sub/into_out").symlink_to(root / "out/heatmaps")
    (root / "linked.png").symlink_to(root / "out/heatmaps/m/a.png")
    assert len(discover([root])) == 4  # without exclude, outputs come back as inputs (the links to them are duplicates)
    for out in (root / "out", root / "sub/../out", os.path.relpath(root / "out")):
        assert [i.relpath for i in discover([root], exclude=[out])] == ["a.png", "sub/b.png"]
    assert discover([root / "out/heatmaps/m/a.png", root / "a.png"], exclude=[root / "out"])[0].relpath == "a.png"
    assert len(discover([f"{root}/**/*.png"], exclude=[root / "out"])) == 2
    assert len(discover([root], exclude=[tmp_path / "not-yet"])) == 4


# -- links, NaN, deep colour, formats ------------------------------------------------------------

def test_broken_and_looping_links_are_failed_inputs_not_skipped(tmp_path: Path) -> None:
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "other/linked.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "ok.png")
    (root / "dangling.png").symlink_to("missing.png")
    (root / "loop1.png").symlink_to("loop2.png")
    (root / "loop2.png").symlink_to("loop1.png")
    (root / "sub/back").symlink_to("..")
    (root / "elsewhere").symlink_to(tmp_path / "other")  # followed: it leads out of the input folder
    (root / "alias").symlink_to("sub")  # not walked twice: sub's files are reached as sub/...
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "sub/c.png")
    (tmp_path / "other2").mkdir()
    (tmp_path / "other/to2").symlink_to(tmp_path / "other2")
    (tmp_path / "other2/back").symlink_to(tmp_path / "other")  # a loop through two folders outside the input
    os.mkfifo(root / "pipe.png")  # never opened: it would block
    (root / "to_pipe.png").symlink_to("pipe.png")
    results = {r.item.relpath: r for r in stream(discover([root]), SPEC)}
    assert sorted(results) == ["dangling.png", "elsewhere/linked.png", "elsewhere/to2/back", "loop1.png", "loop2.png",
                               "ok.png", "sub/back", "sub/c.png"]
    assert all(isinstance(results[k], Decoded) for k in ["ok.png", "elsewhere/linked.png", "sub/c.png"])
    assert results["dangling.png"] == Failed(results["dangling.png"].item, "read",
                                             "broken symbolic link (its target missing.png does not exist)")
    assert results["loop1.png"].stage == "read" and results["loop1.png"].cause.startswith("symbolic link loop")
    for loop, target in [("sub/back", root), ("elsewhere/to2/back", tmp_path / "other")]:
        assert results[loop].stage == "read"
        assert results[loop].cause == f"symbolic link loop (links to the folder {os.path.realpath(target)}, which leads back to the link)"
    assert [i.relpath for i in discover([root / "dangling.png"])] == ["dangling.png"]  # named directly: kept too


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_float_tiff_with_nan_or_inf_fails(tmp_path: Path, bad: float) -> None:
    values = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    values[3, 4] = bad
    path = tmp_path / "f.tif"
    Image.fromarray(values, "F").save(path)
    assert decode(item(path), SPEC) == Failed(item(path), "decode", "image has NaN/Inf pixel values")


@pytest.mark.parametrize("colour,channels", [(2, 3), (6, 4), (4, 2)])
def test_16bit_colour_png_keeps_its_precision(tmp_path: Path, colour: int, channels: int) -> None:
    values = RNG.integers(0, 65536, (24, 20, channels), dtype=np.uint16)
    values[..., 0] = (np.arange(24 * 20) + 0x7F00).reshape(24, 20)  # 480 levels sharing two high bytes
    path = png(tmp_path / "deep.png", 20, 24, 16, colour, paeth_rows(values))
    image, preview = load_image(path, 3)
    gray = colour == 4
    expected = values[..., [0, 0, 0]] if gray else values[..., :3]
    np.testing.assert_array_equal(image, expected / np.float32(65535))
    assert len(np.unique(image[..., 0])) == 480
    np.testing.assert_array_equal(preview, np.round(expected / np.float32(65535) * 255).astype(np.uint8))
    luma, _ = load_image(path, 1)
    weights = [1.0, 0, 0] if gray else [0.299, 0.587, 0.114]
    np.testing.assert_allclose(luma[..., 0], expected / 65535 @ np.array(weights), atol=1e-6)
    x, _, _ = data.preprocess(image, InputSpec(size=(12, 12), mean=(0, 0, 0), std=(1, 1, 1)))
    assert len(torch.unique(x[0])) > 100  # precision survives the resize


@pytest.mark.parametrize("byteorder", ["<", ">"])
@pytest.mark.parametrize("compression", [None, "zlib"])
def test_16bit_rgb_tiff_keeps_its_precision(tmp_path: Path, byteorder: str, compression: str | None) -> None:
    tifffile = pytest.importorskip("tifffile")
    values = (np.arange(16 * 24 * 3).reshape(16, 24, 3) * 53 + 0x1234).astype(np.uint16)
    path = tmp_path / "deep.tif"
    tifffile.imwrite(path, values, photometric="rgb", byteorder=byteorder, compression=compression, rowsperstrip=4)
    image, _ = load_image(path, 3)
    np.testing.assert_array_equal(image, values / np.float32(65535))


def test_gif_decodes_its_first_frame_and_other_formats_are_named(tmp_path: Path) -> None:
    frames = [Image.fromarray(np.full((8, 8, 3), c, np.uint8)) for c in (40, 200)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(tmp_path / "g.pgm")
    (tmp_path / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    (tmp_path / "vector.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")
    (tmp_path / "notes.txt").write_text("not an input")
    results = {r.item.relpath: r for r in stream(discover([tmp_path]), SPEC)}
    assert sorted(results) == ["anim.gif", "g.pgm", "photo.heic", "vector.png"]
    assert np.all(results["anim.gif"].image == 40)
    assert np.array_equal(results["g.pgm"].image[..., 2], np.arange(64).reshape(8, 8))
    assert results["photo.heic"].stage == "decode"
    assert results["photo.heic"].cause.startswith("unsupported image format (.heic); xai decodes .jpg, .jpeg")
    assert results["vector.png"].cause == "not an image (cannot identify image file)"  # EPS never reaches Ghostscript


# -- end to end ---------------------------------------------------------------------------------

def test_cli_explains_odd_names_and_records_every_failed_input(tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    source = sorted((DEMO / "images").rglob("*.png"))[0].read_bytes()
    with open(os.path.join(os.fsencode(root), b"bad\xff.png"), "wb") as fh:
        fh.write(source)
    (root / "good.png").write_bytes(source)
    (root / "dangling.png").symlink_to("missing.png")
    png(root / "strip.png", 20_000_000, 1, 1, 0)
    out = root / "out"  # inside the input folder: a rerun must not explain its own heatmaps
    for _ in range(2):
        done = subprocess.run([sys.executable, "-m", "xaicli.cli", "explain", str(DEMO / "digits.pt"), str(root),
                               "-m", "saliency", "-o", str(out)], capture_output=True, text=True, errors="replace")
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    names = sorted(os.listdir(os.path.join(os.fsencode(out), b"heatmaps", b"saliency")))
    assert names == [b"bad\xff.png", b"good.png"]
    errors = {Path(e["input"]).name: e for e in map(json.loads, (out / "errors.jsonl").read_text().splitlines())}
    assert sorted(errors) == ["dangling.png", "strip.png"]
    assert errors["dangling.png"]["stage"] == "read" and "broken symbolic link" in errors["dangling.png"]["cause"]
    assert "limits.max_aspect" in errors["strip.png"]["cause"]
