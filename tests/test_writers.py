"""The png and npz writers on hand-built batches: paths, pixels, array files, atomicity."""
from __future__ import annotations

import json
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xaicli.descriptors import BatchOutput, InputItem, WriterContext
from xaicli.errors import UsageError
from xaicli.model import InputSpec
from xaicli.registry import create_registry

RED, WHITE, BLUE = [255, 0, 0], [255, 255, 255], [0, 0, 255]
SPEC = InputSpec(size=(8, 8), channels=1, mean=(0.25,), std=(0.5,))


def make_batch(relevance: np.ndarray, output: str = "sal", prefix: str = "") -> BatchOutput:
    """Inputs 8x8 cropped at (2, 4) from a 12x16 resize of 24x32 originals (all gray 100)."""
    b = relevance.shape[0]
    items = [InputItem(Path(f"/data/{prefix}{i}.png"), f"sub/{prefix}{i}.png") for i in range(b)]
    return BatchOutput(
        output=output, method="saliency", params={"abs": False}, items=items,
        inputs=np.full((b, 1, 8, 8), (0.5 - 0.25) / 0.5, np.float32),  # pixel value 0.5 -> 128
        images=[np.full((24, 32, 3), 100, np.uint8) for _ in range(b)],
        crops=[(2, 4, 8, 8)] * b, resized=[(12, 16)] * b,
        target=np.arange(b, dtype=np.int64), logit=np.linspace(1, 2, b, dtype=np.float32),
        prob=np.linspace(0.5, 0.9, b, dtype=np.float32), relevance=relevance.astype(np.float32),
    )


def signed_relevance(b: int = 2) -> np.ndarray:
    r = np.zeros((b, 1, 8, 8), np.float32)
    r[:, 0, 0, 0], r[:, 0, 0, 1] = 2.0, -2.0  # red, blue; the rest zero: white
    return r


@pytest.fixture(scope="module")
def writers():
    from xaicli_plugins.writers import npz, png

    registry = create_registry(extra=[png, npz], entry_points=False)
    return registry.writer("png"), registry.writer("npz")


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_png_at_input_size_shows_signs(tmp_path, writers):
    png, _ = writers
    sink = png.open(WriterContext(tmp_path), colormap="bwr")
    batch = make_batch(signed_relevance())
    sink.write(batch)
    sink.close({})
    assert sink.expected(batch.items[1], "sal") == [tmp_path / "heatmaps/sal/sub/1.png"]
    for item in batch.items:
        pixels = read_png(tmp_path / "heatmaps/sal" / f"{item.stem}.png")
        assert pixels.shape == (8, 8, 3)
        assert pixels[0, 0].tolist() == RED and pixels[0, 1].tolist() == BLUE and pixels[5, 5].tolist() == WHITE
    assert not list(tmp_path.rglob("*.tmp"))


def test_png_at_original_size_lines_up_with_the_photo(tmp_path, writers):
    png, _ = writers
    r = np.zeros((1, 1, 8, 8), np.float32)
    r[0, 0, 2:6, 2:6] = 1.0  # crop pixels (2..5, 2..5) -> resized (4..7, 6..9) -> original x2: (8..15, 12..19)
    sink = png.open(WriterContext(tmp_path), size="original")
    sink.write(make_batch(r))
    pixels = read_png(tmp_path / "heatmaps/sal/sub/0.png")
    assert pixels.shape == (24, 32, 3)
    assert pixels[9:15, 13:19].reshape(-1, 3).tolist() == [RED] * 36
    rows, cols = np.nonzero(pixels[..., 1] < 128)  # reddish: more than half way to red
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (8, 15, 12, 19)
    assert pixels[0, 0].tolist() == WHITE and pixels[23, 31].tolist() == WHITE  # outside the crop: zero relevance


def test_png_overlays_blend_input_or_original(tmp_path, writers):
    png, _ = writers
    batch = make_batch(signed_relevance(1))
    png.open(WriterContext(tmp_path / "in", spec=SPEC), overlay=True, alpha=0.25).write(batch)
    pixels = read_png(tmp_path / "in/heatmaps/sal/sub/0.png")
    assert pixels[0, 0].tolist() == [160, 96, 96]  # 0.75 * 128 + 0.25 * (255, 0, 0), rounded
    assert pixels[5, 5].tolist() == [160, 160, 160]  # on white
    png.open(WriterContext(tmp_path / "orig"), overlay=True, size="original", alpha=0.5).write(batch)
    pixels = read_png(tmp_path / "orig/heatmaps/sal/sub/0.png")
    assert pixels.shape == (24, 32, 3) and pixels[0, 0].tolist() == [178, 178, 178]  # (100 + 255) / 2, rounded half to even


def test_png_refuses_bad_settings_before_the_run(tmp_path, writers):
    png, _ = writers
    with pytest.raises(UsageError, match=r"unknown colormap 'coldhot' \(did you mean 'coldnhot'\?\)"):
        png.open(WriterContext(tmp_path), colormap="coldhot")
    with pytest.raises(UsageError, match="needs the model's input spec"):
        png.open(WriterContext(tmp_path), overlay=True)
    names = {p.name: p for p in png.params}
    assert names["reduce"].choices == ("sum", "abs_sum", "max_abs") and names["size"].default == "input"


def test_png_spec_colormap_and_non_symmetric(tmp_path, writers):
    png, _ = writers
    r = np.zeros((1, 1, 8, 8), np.float32)
    r[0, 0, 0, 0] = 3.0
    png.open(WriterContext(tmp_path), colormap="000,fff", symmetric=False).write(make_batch(r))
    pixels = read_png(tmp_path / "heatmaps/sal/sub/0.png")
    assert pixels[0, 0].tolist() == WHITE and pixels[1, 1].tolist() == [0, 0, 0]


def test_npz_keys_dtypes_and_values(tmp_path, writers):
    _, npz = writers
    batch = make_batch(signed_relevance(), output="ig")
    batch.extras = {"completeness_gap": np.array([0.5, -0.25], np.float32), "segments": np.arange(2 * 64).reshape(2, 8, 8)}
    sink = npz.open(WriterContext(tmp_path), inputs=True)
    sink.write(batch)
    path = tmp_path / "arrays/ig/sub/1.npz"
    assert sink.expected(batch.items[1], "ig") == [path]
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    assert set(arrays) == {"relevance", "target", "logit", "prob", "method", "output", "params", "input",
                           "completeness_gap", "segments"}
    assert arrays["relevance"].dtype == np.float32 and np.array_equal(arrays["relevance"], batch.relevance[1])
    assert arrays["target"].dtype == np.int64 and arrays["target"].shape == () and arrays["target"] == 1
    assert arrays["logit"].dtype == np.float32 and arrays["logit"] == 2.0 and arrays["prob"] == pytest.approx(0.9)
    assert arrays["method"].dtype.kind == "U" and str(arrays["method"]) == "saliency" and str(arrays["output"]) == "ig"
    assert json.loads(str(arrays["params"])) == {"abs": False}
    assert arrays["input"].dtype == np.float32 and np.array_equal(arrays["input"], batch.inputs[1])
    assert arrays["completeness_gap"] == np.float32(-0.25) and np.array_equal(arrays["segments"], np.arange(64, 128).reshape(8, 8))


def test_npz_stored_by_default_compressed_on_request_and_no_inputs_by_default(tmp_path, writers):
    _, npz = writers
    batch = make_batch(signed_relevance(1))
    npz.open(WriterContext(tmp_path / "z"), compress=True).write(batch)
    npz.open(WriterContext(tmp_path / "raw")).write(batch)
    types = {}
    for name in ("z", "raw"):
        with zipfile.ZipFile(tmp_path / name / "arrays/sal/sub/0.npz") as zf:
            types[name] = {info.compress_type for info in zf.infolist()}
            assert "input.npy" not in zf.namelist()
    assert types == {"z": {zipfile.ZIP_DEFLATED}, "raw": {zipfile.ZIP_STORED}}


def test_npz_failures_leave_no_file(tmp_path, writers, monkeypatch):
    _, npz = writers
    batch = make_batch(signed_relevance(1))
    batch.extras = {"labels": np.array([{"a": 1}], dtype=object)}
    with pytest.raises(ValueError, match="extra 'labels' of method 'saliency' holds Python objects"):
        npz.open(WriterContext(tmp_path)).write(batch)
    batch.extras = {"prob": np.zeros(1)}
    with pytest.raises(ValueError, match="extras named like npz keys: prob"):
        npz.open(WriterContext(tmp_path)).write(batch)
    batch.extras = {}

    def broken(fh, **arrays):
        fh.write(b"PK half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken)
    with pytest.raises(OSError, match="disk full"):
        npz.open(WriterContext(tmp_path)).write(batch)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_sinks_take_concurrent_batches(tmp_path, writers):
    sinks = [w.open(WriterContext(tmp_path)) for w in writers]
    batches = [make_batch(signed_relevance(2), prefix=f"b{k}_") for k in range(4)]
    threads = [threading.Thread(target=s.write, args=(b,)) for s in sinks for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(list(tmp_path.rglob("*.png"))) == 8 and len(list(tmp_path.rglob("*.npz"))) == 8
    assert not list(tmp_path.rglob("*.tmp"))
