"""xaicli.data: discovery, decoding of real image files, preprocessing geometry, streaming."""
from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from xaicli import data
from xaicli.data import Decoded, Failed, discover, geometry, load_image, load_mask, preprocess, stream
from xaicli.descriptors import InputItem
from xaicli.errors import InputError, UsageError
from xaicli.model import InputSpec

RNG = np.random.default_rng(0)
NOISE = RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)  # ~12 kB as PNG or JPEG: cut at 3 kB
BLOCKS = np.kron(RNG.integers(0, 256, (4, 5, 3)), np.ones((8, 8, 1))).astype(np.uint8)  # 32x40 RGB, 8px blocks


def touch(path: Path, content: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def save(path: Path, image: Image.Image, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    return path


def encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


# -- discovery ------------------------------------------------------------------------------------

@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    for rel in ["b.jpg", "a/c.PNG", "a/b/d.webp", "a.tiff", "z.bmp", ".hidden/e.png", "a/.f.jpg", "notes.txt", "a/g.jpeg"]:
        touch(root / rel)
    return root


def rels(items: list[InputItem]) -> list[str]:
    return [i.relpath for i in items]


def test_folder_walk_is_recursive_sorted_and_skips_hidden_and_unsupported(tree: Path) -> None:
    items = discover([tree])
    assert rels(items) == ["a/b/d.webp", "a/c.PNG", "a/g.jpeg", "a.tiff", "b.jpg", "z.bmp"]
    assert items[0].path == tree / "a/b/d.webp" and items[0].stem == "a/b/d"


def test_glob_is_relative_to_its_literal_prefix(tree: Path) -> None:
    assert rels(discover([f"{tree}/**/*.jp*g"])) == ["a/g.jpeg", "b.jpg"]
    assert rels(discover([f"{tree}/a/*"])) == ["b/d.webp", "c.PNG", "g.jpeg"]  # a matched folder is walked


def test_file_input_keeps_unsupported_extension_and_uses_its_name(tree: Path) -> None:
    items = discover([tree / "notes.txt", tree / "a/b/d.webp"])
    assert rels(items) == ["notes.txt", "d.webp"]
    assert [i.stem for i in items] == ["notes", "d"]


def test_missing_input_and_empty_glob_are_usage_errors(tree: Path) -> None:
    with pytest.raises(UsageError, match="input not found: .*nope.jpg"):
        discover([tree / "nope.jpg"])
    with pytest.raises(UsageError, match=r"match '.*\*\.gif'"):
        discover([f"{tree}/**/*.gif"])


def test_duplicates_are_dropped(tree: Path) -> None:
    items = discover([tree, tree / "b.jpg", f"{tree}/*.jpg", tree / "a" / ".." / "z.bmp"])
    assert rels(items) == ["a/b/d.webp", "a/c.PNG", "a/g.jpeg", "a.tiff", "b.jpg", "z.bmp"]


def test_clashing_relpaths_get_root_names(tmp_path: Path) -> None:
    for rel in ["x/cats/1.png", "y/dogs/1.png", "y/dogs/2.png", "p/imgs/1.png", "q/imgs/1.png"]:
        touch(tmp_path / rel)
    items = discover([tmp_path / "x/cats", tmp_path / "y/dogs", tmp_path / "p/imgs", tmp_path / "q/imgs"])
    assert rels(items) == ["cats/1.png", "dogs/1.png", "2.png", "p/imgs/1.png", "q/imgs/1.png"]
    files = discover([tmp_path / "x/cats/1.png", tmp_path / "y/dogs/1.png"])
    assert rels(files) == ["cats/1.png", "dogs/1.png"]


def test_shared_stems_use_full_relpaths(tmp_path: Path) -> None:
    for rel in ["a.jpg", "a.png", "b.jpg", "sub/a.jpg", "B.png"]:
        touch(tmp_path / rel)
    items = discover([tmp_path])
    assert {i.relpath: i.stem for i in items} == {
        "a.jpg": "a.jpg", "a.png": "a.png", "b.jpg": "b.jpg", "B.png": "B.png", "sub/a.jpg": "sub/a",
    }


# -- decoding -------------------------------------------------------------------------------------

@pytest.mark.parametrize("ext,options,tol", [
    (".png", {}, 0), (".bmp", {}, 0), (".tif", {}, 0), (".webp", {"lossless": True}, 0),
    (".jpg", {"quality": 95, "subsampling": 0}, 1), (".webp", {"quality": 95}, 12),
])
def test_formats_decode_to_float_rgb(tmp_path: Path, ext: str, options: dict, tol: int) -> None:
    path = save(tmp_path / f"img{ext}", Image.fromarray(BLOCKS), **options)
    image, preview = load_image(path, 3)
    assert image.dtype == np.float32 and image.shape == (32, 40, 3) and preview.dtype == np.uint8
    np.testing.assert_array_equal(preview, (image * 255).round().astype(np.uint8))
    assert np.abs(preview.astype(int) - BLOCKS).mean() <= tol  # lossy formats: mean error in 8-bit levels


def test_grayscale_is_replicated_and_rgb_becomes_pil_luma(tmp_path: Path) -> None:
    gray = save(tmp_path / "g.png", Image.fromarray(BLOCKS[..., 0]))
    image, preview = load_image(gray, 3)
    assert np.array_equal(image[..., 0], BLOCKS[..., 0] / np.float32(255)) and np.array_equal(image[..., 2], image[..., 0])
    assert np.array_equal(load_image(gray, 1)[0][..., 0], image[..., 0]) and preview.shape == (32, 40, 3)
    rgb = save(tmp_path / "c.png", Image.fromarray(BLOCKS))
    luma, preview = load_image(rgb, 1)
    assert luma.shape == (32, 40, 1) and np.array_equal(preview, BLOCKS)
    expected = np.asarray(Image.fromarray(BLOCKS).convert("L")) / np.float32(255)
    assert np.array_equal(luma[..., 0], expected)


def test_alpha_is_dropped_like_convert_rgb(tmp_path: Path) -> None:
    rgba = np.dstack([BLOCKS, np.where(np.arange(40) < 20, 0, 255).astype(np.uint8)[None].repeat(32, 0)])
    path = save(tmp_path / "a.png", Image.fromarray(rgba, "RGBA"))
    assert np.array_equal(load_image(path, 3)[1], BLOCKS)
    la = save(tmp_path / "la.png", Image.fromarray(rgba[..., [0, 3]], "LA"))
    assert np.array_equal(load_image(la, 3)[1][..., 1], BLOCKS[..., 0])


def test_palette_with_transparency_uses_palette_colours(tmp_path: Path) -> None:
    palette = Image.fromarray(BLOCKS).quantize(colors=16)
    path = save(tmp_path / "p.png", palette, transparency=0)
    expected = np.asarray(palette.convert("RGB"))
    assert Image.open(path).mode == "P" and np.array_equal(load_image(path, 3)[1], expected)


@pytest.mark.parametrize("mode", ["CMYK", "1", "F"])
def test_other_modes(tmp_path: Path, mode: str) -> None:
    gray = np.linspace(0, 1, 32 * 40, dtype=np.float32).reshape(32, 40)
    source = {"CMYK": Image.fromarray(BLOCKS).convert("CMYK"), "1": Image.fromarray(BLOCKS[..., 0]).convert("1"),
              "F": Image.fromarray(gray, "F")}[mode]
    path = save(tmp_path / "m.tif", source)
    image, _ = load_image(path, 3)
    expected = gray if mode == "F" else np.asarray(source.convert("RGB"))[..., 0] / np.float32(255)
    np.testing.assert_allclose(image[..., 0], expected, atol=1e-7)


def test_16bit_png_keeps_full_precision(tmp_path: Path) -> None:
    levels = np.linspace(0, 65535, 64 * 40).round().astype(np.uint16).reshape(40, 64)
    path = save(tmp_path / "deep.png", Image.fromarray(levels))
    image, preview = load_image(path, 3)
    assert np.array_equal(image[..., 1], levels / np.float32(65535))
    assert len(np.unique(image)) > 256 and image.max() == 1.0
    assert preview.dtype == np.uint8 and preview[-1, -1, 0] == 255
    x, _, _ = preprocess(image, InputSpec(size=(20, 32), channels=3, mean=(0, 0, 0), std=(1, 1, 1)))
    assert len(torch.unique(x)) > 256  # precision survives the resize


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image is displayed rotated 90° clockwise
    path = save(tmp_path / "rot.jpg", Image.fromarray(BLOCKS), exif=exif, quality=95, subsampling=0)
    _, preview = load_image(path, 3)
    assert preview.shape == (40, 32, 3)
    expected = np.rot90(BLOCKS, k=-1)
    assert np.abs(preview.astype(int) - expected).max() <= 2


@pytest.mark.parametrize("name,content,cause", [
    ("cut.png", encoded(Image.fromarray(NOISE), "PNG")[:3000], "truncated image file"),
    ("cut.jpg", encoded(Image.fromarray(NOISE), "JPEG")[:3000], "truncated image file"),
    ("text.jpg", b"this is not a picture\n", "not an image (cannot identify image file)"),
    ("empty.png", b"", "empty file (0 bytes)"),
])
def test_broken_files_fail_with_user_causes(tmp_path: Path, name: str, content: bytes, cause: str) -> None:
    with pytest.raises(InputError) as err:
        load_image(touch(tmp_path / name, content), 3)
    assert str(err.value) == cause and err.value.stage == "decode"


def test_unreadable_and_oversized_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InputError, match="cannot read file") as err:
        load_image(tmp_path / "gone.png", 3)
    assert err.value.stage == "read"
    path = save(tmp_path / "big.png", Image.fromarray(BLOCKS))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600)  # Pillow's own error beyond twice the limit
    with pytest.raises(InputError, match=r"image too large \(Image size \(1280 pixels\) exceeds limit"):
        load_image(path, 3)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1279)  # Pillow only warns here; we refuse
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(InputError, match=r"40x32 = 1280 pixels; the limit is 1279 pixels, Pillow's"):
        load_image(path, 3)


# -- preprocessing --------------------------------------------------------------------------------

def test_preprocess_crop_and_normalisation_by_hand() -> None:
    image = BLOCKS / np.float32(255)  # 32x40: short side already 32, so no resize
    spec = InputSpec(size=(32, 32), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    x, resized, crop = preprocess(image, spec)
    assert resized == (32, 40) and crop == (0, 4, 32, 32)
    expected = (image[:, 4:36] - np.array([0.5, 0.4, 0.3])) / np.array([0.2, 0.25, 0.5])
    np.testing.assert_allclose(x.numpy(), expected.transpose(2, 0, 1), rtol=1e-6, atol=1e-6)
    assert x.dtype == torch.float32 and x.is_contiguous()


@pytest.mark.parametrize("shape,size,crop_pct,resized,crop", [
    ((50, 80), (32, 32), 0.8, (40, 64), (4, 16, 32, 32)),  # short side floor(32 / 0.8)
    ((81, 50), (32, 32), 0.9, (56, 35), (12, 2, 32, 32)),  # floor(35.55) = 35, long side int(35 * 81 / 50)
    ((50, 50), (32, 48), 1.0, (48, 48), (8, 0, 32, 48)),  # non-square size: scale to cover both
    ((60, 30), (32, 48), 1.0, (96, 48), (32, 0, 32, 48)),
])
def test_geometry(shape, size, crop_pct, resized, crop) -> None:
    assert geometry(*shape, InputSpec(size=size, crop_pct=crop_pct)) == (resized, crop)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_preprocess_matches_torchvision(interpolation: str) -> None:
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    image = RNG.random((45, 70, 3), dtype=np.float32)
    spec = InputSpec(size=(24, 24), crop_pct=0.75, interpolation=interpolation)
    x, resized, crop = preprocess(image, spec)
    t = torch.from_numpy(image).permute(2, 0, 1)
    t = TF.resize(t, 32, interpolation=InterpolationMode(interpolation), antialias=True).clamp(0, 1)
    assert tuple(t.shape[1:]) == resized == (32, 49)
    t = TF.normalize(TF.center_crop(t, [24, 24]), list(spec.mean), list(spec.std))
    torch.testing.assert_close(x, t)
    assert crop == (4, 12, 24, 24)


def test_bad_spec_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="unknown interpolation 'hamming'"):
        next(stream([], InputSpec(interpolation="hamming")))
    with pytest.raises(UsageError, match="model input has 4 channels"):
        next(stream([], InputSpec(channels=4, mean=(0,) * 4, std=(1,) * 4)))


def test_mask_follows_input_geometry(tmp_path: Path) -> None:
    mask = np.zeros((50, 80), np.uint8)
    mask[10:30, 20:60] = 255
    save(tmp_path / "masks/a/b.png", Image.fromarray(mask))
    spec = InputSpec(size=(32, 32), crop_pct=0.8)  # resized (40, 64), crop (4, 16)
    got = load_mask(tmp_path / "masks", InputItem(tmp_path / "in/a/b.jpg", "a/b.jpg"), spec)
    expected = np.zeros((40, 64), bool)
    expected[8:24, 16:48] = True
    assert got.dtype == torch.bool and np.array_equal(got[0].numpy(), expected[4:36, 16:48])
    with pytest.raises(InputError, match="no mask for a/c.jpg"):
        load_mask(tmp_path / "masks", InputItem(tmp_path / "in/a/c.jpg", "a/c.jpg"), spec)


# -- streaming ------------------------------------------------------------------------------------

def test_stream_keeps_order_and_reports_failures(tmp_path: Path) -> None:
    names = []
    for i in range(8):
        name = f"{i}.png"
        if i in (2, 5):
            touch(tmp_path / name, b"garbage" if i == 2 else b"")
        else:
            save(tmp_path / name, Image.fromarray(np.full((20 + i, 30, 3), 30 * i, np.uint8)))
        names.append(name)
    items = discover([tmp_path])
    out = list(stream(items, InputSpec(size=(16, 16)), workers=3, prefetch=2))
    assert [r.item.relpath for r in out] == [i.relpath for i in items] == names
    assert [type(r).__name__ for r in out] == ["Decoded"] * 2 + ["Failed"] + ["Decoded"] * 2 + ["Failed"] + ["Decoded"] * 2
    assert out[2] == Failed(items[2], "decode", "not an image (cannot identify image file)")
    assert out[5].cause == "empty file (0 bytes)"
    assert out[7].image.shape == (27, 30, 3) and out[7].resized == (16, 17) and out[7].x.shape == (3, 16, 16)


def test_stream_is_lazy_bounded_and_stops_cleanly(monkeypatch: pytest.MonkeyPatch) -> None:
    lock, alive, peak, started = threading.Lock(), [0], [0], []

    def slow_decode(item: InputItem, spec: InputSpec, limits: data.DecodeLimits) -> Failed:
        with lock:
            alive[0] += 1
            peak[0] = max(peak[0], alive[0])
            started.append(item.relpath)
        time.sleep(0.01)
        with lock:
            alive[0] -= 1
        return Failed(item, "decode", "slow")

    pulled = []

    def inputs():
        for i in range(1000):
            pulled.append(i)
            yield InputItem(Path(f"{i}.png"), f"{i}.png")

    monkeypatch.setattr(data, "decode", slow_decode)
    results = stream(inputs(), InputSpec(), workers=2, prefetch=5)
    first = [next(results).item.relpath for _ in range(3)]
    results.close()
    assert first == ["0.png", "1.png", "2.png"]
    assert len(pulled) <= 3 + 5 and len(started) <= 3 + 5 and peak[0] <= 2
    assert alive[0] == 0 and not [t for t in threading.enumerate() if t.name.startswith("xai-decode")]


def test_stream_of_digit_pngs_matches_the_training_preprocessing(tmp_path: Path) -> None:
    import train_digits  # demo/, on sys.path through conftest; no training needed for the images

    images, labels = train_digits.digits_images()
    train_digits.save_images(images, labels, tmp_path)
    spec = InputSpec(size=tuple(train_digits.SPEC["size"]), channels=1, mean=(0.25,), std=(0.35,))
    out = list(stream(discover([tmp_path]), spec, workers=2))
    assert all(isinstance(r, Decoded) for r in out) and len(out) == 20 and out[0].item.relpath == "0/000.png"
    index = [int(Path(r.item.relpath).stem) for r in out]
    torch.testing.assert_close(torch.stack([r.x for r in out]), train_digits.normalise(images[index]))
