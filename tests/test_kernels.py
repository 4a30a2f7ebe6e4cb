"""Kernels against their definitions: Pillow for resize, torch for bilinear,
the upstream formulas for colour fixes, and exact round trips for tiling."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

from srexport.errors import UserError
from srexport.kernels import (
    COLOR_FIXES,
    RESIZE_FILTERS,
    adain_color_fix,
    blend_tiles,
    color_fix,
    describe_filter,
    extract_tiles,
    gaussian_weights,
    resize,
    resize_weights,
    tile_grid,
    tile_origins,
    to_model_range,
    to_unit_range,
    upsample_bilinear,
    wavelet_blur,
    wavelet_color_fix,
    wavelet_decomposition,
    weight_sum,
)

PIL_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

# (in_h, in_w, out_h, out_w): x2, x4, non-integer up, down, mixed, tiny
RESIZE_CASES = [
    (16, 24, 32, 48),
    (9, 13, 36, 52),
    (17, 23, 30, 41),
    (64, 48, 20, 17),
    (50, 50, 13, 7),
    (31, 20, 12, 45),
    (1, 5, 3, 10),
    (3, 2, 6, 4),
]


def pil_resize(channel: np.ndarray, out_h: int, out_w: int, filter: str) -> np.ndarray:
    # A float32 array becomes a mode "F" image; Pillow resamples it in double without rounding.
    return np.asarray(Image.fromarray(channel.astype(np.float32)).resize((out_w, out_h), PIL_FILTERS[filter]))


def test_resize_filters_match_the_pil_table():
    assert set(RESIZE_FILTERS) == set(PIL_FILTERS)


@pytest.mark.parametrize("filter", list(PIL_FILTERS))
@pytest.mark.parametrize("in_h,in_w,out_h,out_w", RESIZE_CASES)
def test_resize_matches_pillow(filter, in_h, in_w, out_h, out_w):
    rng = np.random.default_rng(in_h * 1000 + in_w)
    channel = rng.random((in_h, in_w), dtype=np.float32)
    ours = resize(torch.from_numpy(channel)[None, None], (out_h, out_w), filter)[0, 0].numpy()
    reference = pil_resize(channel, out_h, out_w, filter)
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() <= 1e-4


def test_resize_batch_and_channels_are_independent():
    rng = np.random.default_rng(1)
    images = rng.random((2, 3, 21, 34), dtype=np.float32)
    ours = resize(torch.from_numpy(images), (50, 15)).numpy()
    for b in range(2):
        for c in range(3):
            assert np.abs(ours[b, c] - pil_resize(images[b, c], 50, 15, "bicubic")).max() <= 1e-4


@pytest.mark.parametrize("filter", RESIZE_FILTERS)
def test_resize_weight_rows_sum_to_one_and_are_cached(filter):
    for in_size, out_size in [(7, 29), (29, 7), (64, 64), (100, 33)]:
        weights = resize_weights(in_size, out_size, filter)
        assert weights.shape == (out_size, in_size)
        assert torch.allclose(weights.double().sum(1), torch.ones(out_size, dtype=torch.float64), atol=1e-6)
    assert resize_weights(100, 33, filter) is resize_weights(100, 33, filter)


def test_resize_same_size_is_identity_copy():
    images = torch.rand(1, 3, 10, 12)
    out = resize(images, (10, 12))
    assert torch.equal(out, images) and out.data_ptr() != images.data_ptr()


def test_resize_rejects_unknown_filter_and_empty_size():
    with pytest.raises(UserError, match="bicubic"):
        resize(torch.rand(1, 1, 4, 4), (8, 8), "spline36")
    with pytest.raises(UserError):
        resize(torch.rand(1, 1, 4, 4), (0, 8))


def test_describe_filter():
    assert describe_filter("bicubic") == {
        "kernel": "keys_cubic",
        "a": -0.5,
        "support": 2.0,
        "antialias": True,
        "convention": "pil",
    }
    for name in RESIZE_FILTERS:
        assert json.loads(json.dumps(describe_filter(name)))["convention"] == "pil"


@pytest.mark.parametrize("factor", [1, 2, 4])
def test_upsample_bilinear_is_torch_bilinear(factor):
    images = torch.rand(2, 3, 7, 10)
    expected = F.interpolate(images, scale_factor=factor, mode="bilinear", align_corners=False)
    out = upsample_bilinear(images, factor)
    assert out.shape == (2, 3, 7 * factor, 10 * factor)
    assert (out - expected).abs().max().item() <= 1e-6


def test_upsample_bilinear_rejects_fractional_factor():
    with pytest.raises(UserError):
        upsample_bilinear(torch.rand(1, 3, 4, 4), 2.5)


def test_range_maps():
    x = torch.rand(1, 3, 5, 5)
    assert (to_unit_range(to_model_range(x)) - x).abs().max().item() <= 1e-7
    assert to_model_range(torch.tensor([0.0, 0.5, 1.0])).tolist() == [-1.0, 0.0, 1.0]
    assert to_unit_range(torch.tensor([-3.0, 0.0, 2.0])).tolist() == [0.0, 0.5, 1.0]


# --- colour fixes -----------------------------------------------------------


def test_adain_gives_source_channel_statistics():
    torch.manual_seed(0)
    target = torch.rand(2, 3, 40, 30) * 0.5 + 0.3
    source = torch.rand(2, 3, 20, 25) ** 2  # another size: only statistics are used
    out = adain_color_fix(target, source)
    assert out.shape == target.shape
    out_flat, source_flat = out.flatten(2), source.flatten(2)
    assert (out_flat.mean(2) - source_flat.mean(2)).abs().max().item() <= 1e-4
    assert (out_flat.std(2) - source_flat.std(2)).abs().max().item() <= 1e-4


def test_adain_uses_unbiased_variance_plus_eps():
    target = torch.tensor([0.0, 1.0, 2.0, 3.0]).view(1, 1, 2, 2)
    source = torch.tensor([1.0, 1.0, 3.0, 3.0]).view(1, 1, 2, 2)
    target_std = math.sqrt(5 / 3 + 1e-5)  # unbiased variance of 0..3 is 5/3
    source_std = math.sqrt(4 / 3 + 1e-5)
    expected = (torch.tensor([0.0, 1.0, 2.0, 3.0]) - 1.5) / target_std * source_std + 2.0
    assert (adain_color_fix(target, source).flatten() - expected).abs().max().item() <= 1e-6


def test_adain_of_flat_target_is_source_mean():
    source = torch.rand(1, 3, 8, 8)
    out = adain_color_fix(torch.full((1, 3, 8, 8), 0.7), source)
    assert torch.isfinite(out).all()
    # Rounding in the target's mean (~6e-8) is amplified by source_std / sqrt(eps) (~90).
    assert (out - source.mean((2, 3), keepdim=True)).abs().max().item() <= 1e-4


def _numpy_blur(channel: np.ndarray, dilation: int) -> np.ndarray:
    padded = np.pad(channel.astype(np.float64), dilation, mode="edge")
    h, w = channel.shape
    out = np.zeros((h, w))
    for dy, wy in zip((-1, 0, 1), (1, 2, 1)):
        for dx, wx in zip((-1, 0, 1), (1, 2, 1)):
            y0, x0 = dilation + dy * dilation, dilation + dx * dilation
            out += wy * wx / 16 * padded[y0 : y0 + h, x0 : x0 + w]
    return out


@pytest.mark.parametrize("dilation", [1, 2, 16])
def test_wavelet_blur_is_the_dilated_binomial_stencil(dilation):
    image = torch.rand(1, 2, 11, 37)
    ours = wavelet_blur(image, dilation).numpy()
    for c in range(2):
        assert np.abs(ours[0, c] - _numpy_blur(image[0, c].numpy(), dilation)).max() <= 1e-6


def test_wavelet_decomposition_reconstructs():
    image = torch.rand(2, 3, 33, 20)
    high, low = wavelet_decomposition(image)
    assert (high + low - image).abs().max().item() <= 1e-5


def test_wavelet_fix_of_identical_images_is_identity():
    image = torch.rand(1, 3, 48, 40)
    assert (wavelet_color_fix(image, image) - image).abs().max().item() <= 1e-5


def test_wavelet_fix_takes_high_of_target_and_low_of_source():
    torch.manual_seed(1)
    target, source = torch.rand(1, 3, 40, 56), torch.rand(1, 3, 40, 56)
    out = wavelet_color_fix(target, source)
    target_high, target_low = wavelet_decomposition(target)
    source_high, source_low = wavelet_decomposition(source)
    assert (out - target_high - source_low).abs().max().item() <= 1e-5
    # The target's own low band is replaced, not blended in.
    assert (out - target - (source_low - target_low)).abs().max().item() <= 1e-5


def test_wavelet_fix_transfers_a_colour_cast_exactly():
    # The blur keeps constants (normalised, replicate padding), so a per-channel
    # offset lives entirely in the low band.
    target = torch.rand(1, 3, 30, 30)
    cast = torch.tensor([0.1, -0.2, 0.05]).view(1, 3, 1, 1)
    assert (wavelet_color_fix(target, target + cast) - (target + cast)).abs().max().item() <= 1e-5


def test_wavelet_fix_rejects_shape_mismatch():
    with pytest.raises(ValueError):
        wavelet_color_fix(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 9))


def test_color_fix_dispatch():
    target, source = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)
    assert torch.equal(color_fix("adain", target, source), adain_color_fix(target, source))
    assert torch.equal(color_fix("wavelet", target, source), wavelet_color_fix(target, source))
    assert torch.equal(color_fix("none", target, source), target)


def test_unknown_color_fix_lists_choices():
    with pytest.raises(UserError) as error:
        color_fix("histogram", torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4, 4))
    message = str(error.value)
    assert "histogram" in message and "\n" not in message
    assert all(name in message for name in COLOR_FIXES)


# --- tiling -----------------------------------------------------------------


@pytest.mark.parametrize("tile_h,tile_w", [(96, 96), (7, 7), (8, 13)])
def test_gaussian_weights_symmetric_and_peaked_at_centre(tile_h, tile_w):
    weights = gaussian_weights(tile_h, tile_w)
    assert weights.dtype == torch.float32 and weights.shape == (tile_h, tile_w)
    assert torch.equal(weights, weights.flip(0)) and torch.equal(weights, weights.flip(1))
    centre_rows = {(tile_h - 1) // 2, tile_h // 2}
    centre_cols = {(tile_w - 1) // 2, tile_w // 2}
    peak = weights.max()
    peaks = {(int(y), int(x)) for y, x in (weights == peak).nonzero()}
    assert peaks == {(y, x) for y in centre_rows for x in centre_cols}
    assert weights.min().item() > 0


def test_gaussian_weights_formula():
    tile = 96
    weights = gaussian_weights(tile, tile)
    w = lambda x: math.exp(-((x - (tile - 1) / 2) ** 2) / (2 * 0.01 * tile**2))  # noqa: E731
    for y, x in [(0, 0), (10, 50), (47, 48), (95, 3)]:
        assert abs(weights[y, x].item() - w(y) * w(x)) <= 1e-7


def test_tile_origins_upstream_layout():
    assert tile_origins(200, 96, 32) == [0, 64, 104]
    assert tile_origins(96, 96, 32) == [0]
    assert tile_origins(50, 96, 32) == [0]
    assert tile_origins(160, 96, 32) == [0, 64]


@pytest.mark.parametrize("tile,overlap", [(96, 96), (96, 100), (96, -1)])
def test_tile_origins_reject_bad_overlap(tile, overlap):
    with pytest.raises(UserError):
        tile_origins(300, tile, overlap)


sizes = st.one_of(st.integers(1, 300), st.sampled_from([1, 2, 3, 97, 127, 251, 293]))


@settings(max_examples=300, deadline=None)
@given(size=sizes, tile=st.integers(1, 128), data=st.data())
def test_tile_origins_cover_every_pixel(size, tile, data):
    overlap = data.draw(st.integers(0, tile - 1))
    origins = tile_origins(size, tile, overlap)
    covered = np.zeros(size, dtype=bool)
    for origin in origins:
        covered[origin : origin + tile] = True
    assert covered.all()
    assert origins[0] == 0 and origins[-1] == max(size - tile, 0)
    steps = np.diff(origins)
    assert (steps > 0).all() and (steps <= tile - overlap).all()


@settings(max_examples=40, deadline=None)
@given(
    height=sizes,
    width=sizes,
    tile_h=st.integers(16, 96),
    tile_w=st.integers(16, 96),
    overlap_fraction=st.floats(0.0, 0.5),
)
@example(height=97, width=5, tile_h=96, tile_w=96, overlap_fraction=1 / 3)
@example(height=1, width=1, tile_h=16, tile_w=16, overlap_fraction=0.5)
def test_blend_of_extracted_tiles_is_the_image(height, width, tile_h, tile_w, overlap_fraction):
    overlap = int(min(tile_h, tile_w) * overlap_fraction)
    origins = tile_grid(height, width, tile_h, tile_w, overlap)
    weights = gaussian_weights(tile_h, tile_w)
    assert weight_sum(origins, height, width, weights).min().item() > 0
    image = torch.rand(1, 2, height, width, generator=torch.Generator().manual_seed(height * 301 + width))
    tiles = extract_tiles(image, origins, tile_h, tile_w)
    assert tiles.shape == (len(origins), 2, tile_h, tile_w)
    restored = blend_tiles(tiles, origins, height, width, weights)
    assert restored.shape == image.shape
    assert (restored - image).abs().max().item() <= 1e-5


def test_blend_weights_tiles_by_gaussian():
    # Two overlapping tiles of constants 0 and 1: in the overlap the result is
    # the second tile's share of the weight.
    origins = tile_grid(8, 12, 8, 8, 4)
    assert origins == [(0, 0), (0, 4)]
    weights = gaussian_weights(8, 8)
    tiles = torch.stack([torch.zeros(1, 8, 8), torch.ones(1, 8, 8)])
    out = blend_tiles(tiles, origins, 8, 12, weights)[0, 0]
    share = weights[:, :4] / (weights[:, 4:] + weights[:, :4])
    assert (out[:, :4] - 0).abs().max().item() == 0
    assert (out[:, 8:] - 1).abs().max().item() == 0
    assert (out[:, 4:8] - share).abs().max().item() <= 1e-6
