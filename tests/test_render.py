"""Colormaps, heatmap scaling, overlays and the geometry back to the original image."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from xaicli import render
from xaicli.render import colormap, heatmap, normalise, overlay, to_original

RED, WHITE, BLUE = [255, 0, 0], [255, 255, 255], [0, 0, 255]


def test_spec_hits_control_points_and_interpolates_between():
    cmap = colormap("00:000000,80:800000,ff:00ff00")
    assert cmap.palette[0x00].tolist() == [0, 0, 0]
    assert cmap.palette[0x80].tolist() == [128, 0, 0]
    assert cmap.palette[0xFF].tolist() == [0, 255, 0]
    assert cmap.palette[0x40].tolist() == [64, 0, 0]  # midway between 00 and 80
    assert cmap(np.array([0.0, 0.5, 1.0])).tolist() == [[0, 0, 0], [128, 0, 0], [0, 255, 0]]


def test_spec_short_forms_spacing_ends_and_steps():
    assert np.array_equal(colormap("000,8:fff").palette, colormap("00:000000,88:ffffff").palette)
    hot = colormap("000,f00,ff0,fff")  # unpositioned colours are spaced evenly: 00, 55, aa, ff
    assert hot.palette[0x55].tolist() == RED and hot.palette[0xAA].tolist() == [255, 255, 0]
    held = colormap("40:f00,c0:00f")  # the end colours hold out to 00 and ff
    assert held.palette[0].tolist() == RED and held.palette[0xFF].tolist() == BLUE
    step = colormap("00f,80:00f,80:f00,f00")  # equal positions: a hard step
    assert step.palette[0x7F].tolist() == BLUE and step.palette[0x80].tolist() == RED


@pytest.mark.parametrize(
    "spec, message",
    [("00f,80:fff,xyz", "'xyz' is not a colour"), ("00f", "at least two colours"), ("00f,80:fff,40:f00", "must not decrease")],
)
def test_bad_specs_say_why(spec, message):
    with pytest.raises(ValueError, match=message):
        colormap(spec)


def test_unknown_colormap_suggests_a_name():
    with pytest.raises(ValueError, match=r"unknown colormap 'bwrr' \(did you mean 'bwr'\?\); named: gray"):
        colormap("bwrr")


def test_zennit_family_matches_zennit_palettes():
    zennit_image = pytest.importorskip("zennit.image")
    for name in ("bwr", "coldnhot", "hot", "cold", "gray", "wred", "wblue", "seismic", "france"):
        ours = colormap(name).palette.astype(int)
        theirs = zennit_image.palette(name).astype(int)
        # zennit truncates colours (we round) and the positions of evenly spaced colours
        # (coldnhot's f00 and ff0 at 170 and 212, ours at 170.3 and 212.7)
        assert np.abs(ours - theirs).max() <= (4 if name == "coldnhot" else 1), name


def test_cividis_and_viridis_approximate_matplotlib():
    matplotlib = pytest.importorskip("matplotlib")
    for name in ("cividis", "viridis"):
        reference = matplotlib.colormaps[name](np.arange(256) / 255)[:, :3] * 255
        assert np.abs(colormap(name).palette - reference).max() < 3, name


def test_bwr_signs_and_symmetric_scaling():
    r = np.array([[2.0, -1.0], [0.0, 1.0]])
    bwr = colormap("bwr").palette
    # m = 2: 2 -> 1.0, -1 -> 0.25, 0 -> 0.5 (centre), 1 -> 0.75
    assert heatmap(r).tolist() == bwr[[[255, 64], [128, 192]]].tolist()
    assert heatmap(r)[0, 0].tolist() == RED and heatmap(r)[1, 0].tolist() == WHITE
    assert heatmap(-r)[0, 0].tolist() == BLUE


def test_non_symmetric_maps_min_to_max():
    r = np.array([[2.0, -1.0], [0.0, 1.0]])
    out = heatmap(r, symmetric=False)
    assert out[0, 0].tolist() == RED and out[0, 1].tolist() == BLUE
    values, zero = normalise(r, symmetric=False)
    assert values[1, 0] == pytest.approx(1 / 3) and zero == pytest.approx(1 / 3)


def test_all_zero_relevance_does_not_divide_by_zero():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert (heatmap(np.zeros((3, 4, 4))) == WHITE).all()
        assert (heatmap(np.zeros((3, 4, 4)), symmetric=False) == BLUE).all()


def test_channel_reductions():
    r = np.zeros((2, 1, 2))
    r[:, 0, 0] = [1.0, -3.0]
    r[:, 0, 1] = [0.5, 0.5]
    assert normalise(r, reduce="sum")[0][0].tolist() == [0.0, 0.75]  # -2 and 1, m = 2
    assert normalise(r, reduce="abs_sum")[0][0].tolist() == [1.0, 0.625]  # 4 and 1, m = 4
    assert normalise(r, reduce="max_abs")[0][0].tolist() == pytest.approx([1.0, 0.5 + 0.5 / 6])  # 3 and 0.5
    with pytest.raises(ValueError, match="did you mean 'max_abs'"):
        normalise(r, reduce="maxabs")


def test_level_saturates_sooner_and_batches_match_single_maps():
    r = np.array([[1.0, 0.25, -0.5]])
    assert normalise(r, level=2.0)[0].tolist() == [[1.0, 0.75, 0.0]]
    batch = np.random.default_rng(0).normal(size=(3, 2, 5, 6))
    assert np.array_equal(heatmap(batch), np.stack([heatmap(b) for b in batch]))


def test_overlay_blends():
    image = np.full((2, 3, 3), 100, np.uint8)
    heat = np.full((2, 3, 3), 200, np.uint8)
    assert (overlay(image, heat, 0.25) == 125).all()
    assert (overlay(image[..., 0], heat, 1.0) == 200).all()  # gray image spreads to RGB
    with pytest.raises(ValueError, match="equal sizes"):
        overlay(image[:1], heat)


def test_to_original_puts_the_crop_back_in_place():
    values = np.ones((4, 4), np.float32)
    out = to_original(values, resized=(8, 12), crop=(2, 4, 4, 4), original_size=(16, 24))
    assert out.shape == (16, 24) and out.dtype == np.float32
    rows, cols = np.nonzero(out > 0.75)  # the crop, scaled 2x: rows 4..11, cols 8..15
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (4, 11, 8, 15)
    assert out[:3].max() == pytest.approx(0.5) and out[:, :7].max() == pytest.approx(0.5)  # fill: the centre
    assert out[5:11, 9:15].min() == pytest.approx(1.0)


def test_to_original_on_rgb_keeps_dtype_and_fill_colour():
    heat = np.zeros((2, 2, 3), np.uint8)
    out = to_original(heat, resized=(4, 4), crop=(1, 1, 2, 2), original_size=(4, 4), fill=(255, 255, 255))
    assert out.dtype == np.uint8 and out.shape == (4, 4, 3)
    assert out[1:3, 1:3].tolist() == np.zeros((2, 2, 3)).tolist() and out[0, 0].tolist() == WHITE
    with pytest.raises(ValueError, match="crop"):
        to_original(heat, resized=(4, 4), crop=(1, 1, 3, 3), original_size=(4, 4))


def test_denormalise_recovers_pixels():
    x = np.full((1, 1, 2, 2), (0.5 - 0.25) / 0.5, np.float32)
    rgb = render.denormalise(x, mean=(0.25,), std=(0.5,))
    assert rgb.shape == (1, 2, 2, 3) and (rgb == 128).all()
