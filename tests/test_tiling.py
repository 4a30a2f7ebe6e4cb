"""Tiled execution: grids, blending, per-image inputs, region pre/post-processing, and the
tiled pipeline against the tiled PyTorch reference on the demo artifact."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from srexport.errors import UserError
from srexport.artifact.specs import (
    ComponentSpec,
    Geometry,
    degradation_spec,
    unet_spec,
    vae_decoder_spec,
    vae_encoder_spec,
)
from srexport.kernels.tiling import blend_tiles, extract_tiles, gaussian_weights
from srexport.parity import compare
from srexport.processing import Processing, postprocess, preprocess
from srexport.runtime import regions
from srexport.runtime.pipeline import SRPipeline
from srexport.runtime.runners import TorchRunner
from srexport.runtime.tiling import (
    BlendCanvas,
    StageTiling,
    TilingSettings,
    tile_feeds,
    tile_geometries,
    tiling_section,
)

PISA = Processing(4, "bicubic", "adain", min_lr_side=32, size_policy="resize_floor", size_multiple=8)
S3DIFF = Processing(4, "bilinear", "wavelet", min_lr_side=0, size_policy="reflect_pad", size_multiple=64)

# --- the latent grid the pipeline uses ---------------------------------------------------

latent_sizes = st.one_of(st.integers(1, 200), st.sampled_from([1, 2, 3, 7, 13, 61, 64, 97, 127, 131, 193]))


@settings(max_examples=100, deadline=None)
@given(height=latent_sizes, width=latent_sizes, tile=st.sampled_from([8, 16, 24, 64, 96]),
       overlap_eighths=st.integers(0, 4), pad=st.booleans(), decode=st.booleans())
@example(height=97, width=5, tile=64, overlap_eighths=2, pad=False, decode=True)
@example(height=1, width=131, tile=8, overlap_eighths=4, pad=True, decode=False)
def test_latent_grid_covers_every_pixel_with_weight(height, width, tile, overlap_eighths, pad, decode):
    """Every output pixel gets a positive blending weight from tiles of one shape; without
    padding no tile leaves the image, with it every tile is exactly the tile."""
    overlap = tile * overlap_eighths // 8
    stage = StageTiling("decode" if decode else "denoise", tile, overlap, 4, 8 if decode else 1, 1, pad)
    grid = stage.grid(height, width)
    if pad:
        assert (grid.tile_h, grid.tile_w) == (tile, tile)
    else:
        assert (grid.tile_h, grid.tile_w) == (min(tile, height), min(tile, width))
        assert grid.rows[-1] + grid.tile_h == height and grid.cols[-1] + grid.tile_w == width
    for origins, size, t in ((grid.rows, height, grid.tile_h), (grid.cols, width, grid.tile_w)):
        assert origins[0] == 0 and origins[-1] == max(size - t, 0)
        assert all(0 < b - a <= t - min(overlap, t - 1) for a, b in zip(origins, origins[1:]))
    total = BlendCanvas(grid, stage, 1, "cpu").weight_sum()
    assert total.shape == (stage.out(height), stage.out(width))
    assert float(total.min()) > 0


def test_reflect_padding_of_tiles_matches_torch_and_repeats_past_the_image():
    from srexport.kernels.tiling import reflect_indices

    x = torch.rand(1, 2, 5, 7)
    assert torch.equal(extract_tiles(x, [(0, 0)], 9, 13, pad_mode="reflect"), F.pad(x, (0, 6, 0, 4), mode="reflect"))
    assert reflect_indices(torch.arange(-5, 12), 4).tolist() == [1, 2, 3, 2, 1, 0, 1, 2, 3, 2, 1, 0, 1, 2, 3, 2, 1]
    assert extract_tiles(x[..., :1, :], [(0, 0)], 3, 7, pad_mode="reflect").eq(x[..., :1, :]).all()


def test_blend_canvas_equals_kernel_blend_and_one_tile_is_exact():
    stage = StageTiling("decode", 8, 2, 3, 8, 1)
    grid = stage.grid(21, 30)
    tiles = torch.randn(grid.count, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    canvas = BlendCanvas(grid, stage, 3, "cpu")
    for i in range(0, grid.count, 3):  # streamed in batches
        canvas.add(tiles[i : i + 3], grid.origins[i : i + 3])
    expected = blend_tiles(tiles, [(8 * y, 8 * x) for y, x in grid.origins], 168, 240, gaussian_weights(64, 64))
    assert float((canvas.result() - expected).abs().max()) < 1e-5
    one = StageTiling("denoise", 32, 8, 1, 1, 1).grid(20, 30)
    single = BlendCanvas(one, StageTiling("denoise", 32, 8, 1, 1, 1), 2, "cpu")
    tile = torch.randn(1, 2, 20, 30)
    single.add(tile, one.origins)
    assert torch.equal(single.result(), tile)


def test_tile_feeds_repeat_per_image_inputs_only():
    spec = unet_spec(with_scores=True)
    scores = torch.tensor([[0.25, 0.75]])
    tiles = torch.randn(3, 4, 8, 8)
    feeds = tile_feeds(spec, "latent", tiles, {"latent": None, "scores": scores})
    assert feeds["latent"] is tiles and feeds["scores"].shape == (3, 2)
    assert torch.equal(feeds["scores"], scores.expand(3, 2))
    two_spatial = ComponentSpec("x", (spec.inputs[0], vae_decoder_spec().inputs[0]), spec.outputs)
    with pytest.raises(ValueError, match="only latent is tiled"):
        tile_feeds(two_spatial, "latent", tiles, {"denoised": tiles})


# --- settings, manifest, engine shapes ---------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(length=st.one_of(st.integers(1, 3000), st.sampled_from([7, 13, 61, 127, 131, 193, 509, 1021, 2039, 2999])),
       tile_units=st.integers(1, 16), overlap_eighths=st.integers(0, 4), kind=st.sampled_from(["denoise", "decode",
                                                                                                "encode"]),
       pad=st.booleans(), width_factor=st.sampled_from([1, 3, 17]))
@example(length=1536 // 8, tile_units=8, overlap_eighths=1, kind="denoise", pad=False, width_factor=1)
@example(length=65, tile_units=8, overlap_eighths=4, kind="decode", pad=False, width_factor=17)
def test_even_plan_covers_keeps_the_overlap_and_never_computes_more_than_fixed(length, tile_units, overlap_eighths,
                                                                               kind, pad, width_factor):
    """The even plan against the fixed one on the same stage: every pixel covered with positive
    weight, neighbours overlapping by at least the stage's overlap, tiles no larger than the
    tile and on the stage's units, and the computed area never above fixed's (primes, sizes
    below one tile, very wide and very tall images)."""
    unit = 8 if kind == "denoise" else 1
    down, up = (8, 1) if kind == "encode" else (1, 8 if kind == "decode" else 1)
    tile = tile_units * 8 * (8 if kind == "encode" else 1)
    overlap = tile * overlap_eighths // 8 // down * down
    if kind == "encode":
        length = -(-length // 8) * 8  # the encoder's input is a multiple of the VAE factor
    even, fixed = (StageTiling(kind, tile, overlap, 4, up, down, pad, plan, unit) for plan in ("even", "fixed"))
    height, width = length, max(down, length * width_factor // down * down)
    grid, old = even.grid(height, width), fixed.grid(height, width)
    assert (grid.tile_h * len(grid.rows)) * (grid.tile_w * len(grid.cols)) <= (
        (old.tile_h * len(old.rows)) * (old.tile_w * len(old.cols)))
    for origins, size, side in ((grid.rows, height, grid.tile_h), (grid.cols, width, grid.tile_w)):
        assert side <= max(tile, size if not pad else tile)
        assert origins[0] == 0 and origins[-1] == max(size - side, 0) and list(origins) == sorted(set(origins))
        assert all(o % down == 0 for o in origins)
        assert all(a + side - b >= min(overlap, side - 1) for a, b in zip(origins, origins[1:]))
        if size > tile:
            assert side % max(unit, down) == 0 and (side == tile if pad else True)
    if height * width <= 2**16:
        assert float(BlendCanvas(grid, even, 1, "cpu").weight_sum().min()) > 0


def test_even_plan_spreads_fewer_shorter_tiles_than_fixed():
    """1536 px at 512/64 px denoiser tiles: fixed runs 4 tiles of 512 (2048 px computed per
    axis), even 4 of 448 (1792 px); the smallest planned tile is where engine profiles start."""
    even = TilingSettings(tile=512, overlap=64, plan="even").stages()["denoise"]
    assert even.axis(1536 // 8) == (56, [0, 45, 90, 136])
    assert TilingSettings(tile=512, overlap=64, plan="fixed").stages()["denoise"].axis(192) == (64, [0, 56, 112, 128])
    # the defaults (768/64 px): 3 tiles of 576 px instead of fixed's 3 of 768
    assert TilingSettings().stages()["denoise"].axis(192) == (72, [0, 60, 120])
    assert even.smallest_planned_tile() == 40  # (64 + 8) / 2 latent, rounded up to the UNet's 8


def test_settings_validate_and_round_trip():
    s = TilingSettings()
    assert (s.tile, s.overlap, s.batch, s.vae_tile, s.vae_overlap, s.vae_batch) == (768, 64, 2, 1024, 48, 1)
    assert (s.plan, s.vae_norm) == ("even", "coarse")
    section = tiling_section(s)
    assert section["latent_tile"] == 96 and section["latent_overlap"] == 8 and "even plan" in section["description"]
    assert TilingSettings.from_manifest(section) == s
    for bad, flag in ((dict(tile=500), "--tile 500"), (dict(overlap=400), "--tile-overlap"),
                      (dict(vae_overlap=12), "--vae-tile-overlap"), (dict(batch=0), "--tile-batch"),
                      (dict(plan="diagonal"), "--tile-plan 'diagonal' is not one of fixed, even")):
        with pytest.raises(UserError, match=flag):
            TilingSettings(**bad).validate()


def test_tile_geometries_for_engine_profiles():
    from srexport.artifact.specs import degradation_spec, unet_spec, vae_decoder_spec

    components = {s.name: {"spec": s.to_dict()} for s in (vae_encoder_spec(), unet_spec(), vae_decoder_spec(),
                                                           degradation_spec())}
    manifest = {"processing": PISA.to_dict(), "tiling": tiling_section(TilingSettings()), "components": components}
    # PiSA at min_lr_side 32 (process size 128): sides never go below 128 px, but the coarse
    # statistics passes of the VAE and the UNet go down to 8 latent pixels (64 px)
    assert tile_geometries(manifest, "unet") == (Geometry(1, 64, 64), Geometry(2, 768, 768), Geometry(2, 768, 768))
    assert tile_geometries(manifest, "vae_decoder") == (Geometry(1, 64, 64), Geometry(1, 1024, 1024),
                                                        Geometry(1, 1024, 1024))
    assert tile_geometries(manifest) == (Geometry(1, 64, 64), Geometry(2, 768, 768), Geometry(2, 1024, 1024))
    # upstream's process size 512: the even plan's shortest denoiser tile, (96 + 8) / 2 latent
    # rounded up to 8, is 448 px; per-tile statistics need no coarse shapes
    at_512 = dict(PISA.to_dict(), min_lr_side=128)
    per_tile_unet = tiling_section(TilingSettings(unet_norm="per-tile"))
    assert tile_geometries({"processing": at_512, "tiling": per_tile_unet, "components": components},
                           "unet")[0] == Geometry(1, 448, 448)
    fixed = tiling_section(TilingSettings(tile=512, overlap=128, plan="fixed", vae_norm="per-tile", unet_norm="per-tile"))
    # fixed plan: int(128 / h * h) = 127 for h in (49, 98, 103, 107) gives the 504 px sides
    assert tile_geometries({"processing": at_512, "tiling": fixed, "components": components},
                           "unet")[0] == Geometry(1, 504, 504)
    assert tile_geometries({"processing": at_512, "tiling": fixed, "components": components},
                           "vae_decoder")[0] == Geometry(1, 504, 504)
    padded = {"processing": S3DIFF.to_dict(), "tiling": tiling_section(TilingSettings(pad=True)),
              "components": components}
    low, typical, high = tile_geometries(padded, "vae_encoder")
    assert low == Geometry(1, 1024, 1024) and high == Geometry(1, 1024, 1024)
    profile = vae_encoder_spec(with_scores=True).profile(low, typical, high)
    assert profile["image"][0] == (1, 3, 1024, 1024) and profile["scores"][2] == (1, 2)
    with pytest.raises(ValueError):
        tile_geometries(padded, "degradation")


# --- pre- and post-processing by regions -------------------------------------------------


@pytest.mark.parametrize("processing", [PISA, S3DIFF, Processing(4, "bicubic", "wavelet", 0, "resize_floor", 8)],
                         ids=["pisa", "s3diff", "wavelet-floor"])
@pytest.mark.parametrize("lr_size", [(24, 32), (37, 53), (61, 45)])
def test_regions_equal_whole_image_processing(monkeypatch, processing, lr_size):
    monkeypatch.setattr(regions, "BAND_PIXELS", 2000)  # many bands, each at least one halo tall
    lr = torch.rand(1, 3, *lr_size, generator=torch.Generator().manual_seed(sum(lr_size)))
    prepared = preprocess(lr, processing)
    source = regions.UpscaledSource(lr, processing)
    height, width = source.size
    assert (height, width) == tuple(prepared.model_input.shape[-2:]) == regions.upscaled_size(*lr_size, processing)
    whole = source.model_region(np.arange(height), np.arange(width))
    assert float((whole - prepared.model_input).abs().max()) < 2e-6
    beyond = source.model_region(np.arange(height + 70), np.arange(width + 9))  # tile padding: reflect
    assert float((beyond - F.pad(prepared.model_input, (0, 9, 0, 70), mode="reflect")).abs().max()) < 2e-6
    tile = source.model_tile(8, 16, 40, 24)
    assert float((tile - prepared.model_input[..., 8:48, 16:40]).abs().max()) < 2e-6
    decoded = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(1)) * 2.2 - 1.1
    expected = postprocess(decoded.clone(), prepared, processing)
    finished = regions.finish_in_place(decoded, source)
    assert finished.shape == expected.shape
    assert float((finished - expected).abs().max()) < 2e-6


def test_uint8_conversion_in_bands_rounds_as_before(monkeypatch):
    from srexport.runtime.images import tensor_to_pil

    monkeypatch.setattr(regions, "BAND_PIXELS", 100)
    image = torch.rand(1, 3, 37, 29) * 1.2 - 0.1
    whole = (image[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
    assert np.array_equal(regions.to_uint8_hwc(image), whole)
    assert np.array_equal(np.asarray(tensor_to_pil(image)), whole)


# --- the tiled pipeline on stand-in networks: any size, scores per image ------------------


class _Degradation(torch.nn.Module):
    def forward(self, lr_image):
        return torch.stack([lr_image.mean(dim=(1, 2, 3)), lr_image.std(dim=(1, 2, 3))], dim=1)


class _Encoder(torch.nn.Module):  # 8x8 average pooling: exact under tiles aligned to 8 px
    def forward(self, image, scores):
        pooled = F.avg_pool2d(image, 8)
        return torch.cat([pooled, pooled.mean(1, keepdim=True)], 1) * (1 + scores[:, :1, None, None])


class _Denoiser(torch.nn.Module):  # per pixel
    def forward(self, latent, scores):
        return latent * 0.5 + scores[:, 1:, None, None]


class _Decoder(torch.nn.Module):  # 8x nearest upsampling
    def forward(self, denoised):
        return F.interpolate(denoised[:, :3], scale_factor=8, mode="nearest").clamp(-1, 1)


def _standin_pipeline(processing: Processing, tiling: TilingSettings | None) -> SRPipeline:
    specs = {"degradation": degradation_spec(), "vae_encoder": vae_encoder_spec(with_scores=True),
             "unet": unet_spec(with_scores=True), "vae_decoder": vae_decoder_spec()}
    modules = {"degradation": _Degradation(), "vae_encoder": _Encoder(), "unet": _Denoiser(),
               "vae_decoder": _Decoder()}
    manifest = {"processing": processing.to_dict(),
                "denoise": {"latent_weight": 0.0, "terms": [{"component": "unet", "weight": 1.0}]}}
    if tiling is not None:
        manifest["tiling"] = tiling_section(tiling)
    return SRPipeline(manifest, {n: TorchRunner(modules[n], specs[n]) for n in specs})


@settings(max_examples=8, deadline=None)
@given(lr_h=st.sampled_from([16, 17, 31, 53, 64, 97]), lr_w=st.sampled_from([16, 23, 41, 64, 101]),
       s3diff=st.booleans(), pad=st.booleans())
def test_tiled_pipeline_equals_whole_for_local_networks(lr_h, lr_w, s3diff, pad):
    """With networks that tiles cannot change (pooling, per-pixel, upsampling), tiled and
    whole-image runs agree for any size: the grids, per-image scores, region pre-processing,
    blending and in-place post-processing are right."""
    processing = S3DIFF if s3diff else PISA
    tiling = TilingSettings(tile=64, overlap=16, batch=3, vae_tile=128, vae_overlap=32, pad=pad, vae_norm="per-tile", unet_norm="per-tile")
    pipeline = _standin_pipeline(processing, tiling)
    lr = torch.rand(1, 3, lr_h, lr_w, generator=torch.Generator().manual_seed(lr_h * 7 + lr_w))
    tiled = pipeline.run_stages(lr)
    whole = pipeline.run_stages(lr, tiled=False)
    assert pipeline.will_tile(lr_h, lr_w) == (pad or max(whole.tensors["image"].shape[-2:]) > 64)
    assert float((tiled.tensors["output"] - whole.tensors["output"]).abs().max()) < 1e-5
    assert torch.equal(tiled.tensors["scores"], whole.tensors["scores"])


def test_untiled_runs_above_the_limit_are_refused():
    pipeline = _standin_pipeline(PISA, TilingSettings(tile=64, overlap=16, vae_tile=128, vae_overlap=32,
                                                      untiled_max_megapixels=0.05, vae_norm="per-tile", unet_norm="per-tile"))
    assert pipeline.will_tile(64, 64)  # 256x256 = 0.066 MP: tiled by default...
    with pytest.raises(UserError, match="--untiled-max-mp"):
        pipeline.run_stages(torch.rand(1, 3, 64, 64), tiled=False)  # ...refused whole
    pipeline.untiled_max_megapixels = 1.0
    assert pipeline.run_stages(torch.rand(1, 3, 64, 64), tiled=False).tensors["output"].shape == (1, 3, 256, 256)


# --- the demo artifact: ONNX tiled runs against the tiled PyTorch reference --------------


@pytest.fixture(scope="module")
def artifact_and_reference(demo_artifact):
    from srexport.artifact.manifest import load_artifact
    from srexport.runtime.loading import reference_for

    art = load_artifact(demo_artifact)
    return art, reference_for(art)


SMALL_TILES = TilingSettings(tile=64, overlap=16, batch=4, vae_tile=64, vae_overlap=16, vae_norm="per-tile", unet_norm="per-tile")


def _pipeline(art, tiling: TilingSettings, backend="ort", reference=None) -> SRPipeline:
    from srexport.runtime.runners import ort_runners, torch_runners

    manifest = copy.deepcopy(art.manifest)
    manifest["tiling"] = tiling_section(tiling)
    runners = ort_runners(art) if backend == "ort" else torch_runners(art, reference)
    return SRPipeline(manifest, runners)


def test_demo_artifact_records_default_tiling(artifact_and_reference):
    art, _ = artifact_and_reference
    # the demo fixture is built with --vae-norm per-tile; the rest is the default geometry and plan
    assert TilingSettings.from_manifest(art.manifest["tiling"]) == TilingSettings(vae_norm="per-tile", unet_norm="per-tile")
    assert "Whole-image runs" in art.manifest["tiling"]["description"]


def test_tiled_onnx_equals_tiled_reference_and_reports_tiling_error(artifact_and_reference, small_lr):
    from srexport.checking import check_image, failures

    art, ref = artifact_and_reference
    pipeline = _pipeline(art, SMALL_TILES)
    report = check_image(pipeline, ref, small_lr, "small")
    assert report.tiles == {"encode": 12, "denoise": 12, "decode": 12}  # 128x168 px in 64 px tiles
    assert report.tiled.psnr_db >= 50, report.tiled.describe()
    assert report.end_to_end.psnr_db >= 50  # whole-image, as before tiling
    assert report.tiled_vs_whole.psnr_db < report.tiled.psnr_db  # what tiling changes, reported apart
    assert "tiled" in report.to_dict() and not failures(report, 1e-3, 50)


def test_tiled_batches_of_1_and_4_are_identical(artifact_and_reference, small_lr):
    art, _ = artifact_and_reference
    one = _pipeline(art, TilingSettings(tile=64, overlap=16, batch=1, vae_tile=64, vae_overlap=16, vae_norm="per-tile", unet_norm="per-tile"))
    four = _pipeline(art, SMALL_TILES)
    seen = []
    four.progress = lambda stage, done, total: seen.append((stage, done, total))
    assert torch.equal(one(small_lr), four(small_lr))
    assert seen[-1] == ("decode", 12, 12) and [s for s in seen if s[0] == "encode"][0] == ("encode", 4, 12)


def test_tile_covering_the_image_equals_untiled_exactly(artifact_and_reference, small_lr):
    art, _ = artifact_and_reference
    pipeline = _pipeline(art, TilingSettings(tile=192, overlap=64, vae_tile=192, vae_overlap=64, vae_norm="per-tile", unet_norm="per-tile"))
    assert not pipeline.will_tile(*small_lr.shape[-2:])  # 128x168 px within one 192 px tile
    assert torch.equal(pipeline(small_lr), pipeline.run_stages(small_lr, tiled=False).tensors["output"])


def test_cli_run_tiles_by_default_and_refuses_big_untiled_runs(demo_artifact, tmp_path, capsys):
    from srexport.cli import main
    from srexport.runtime.images import load_image, save_image

    lr = torch.rand(1, 3, 40, 272, generator=torch.Generator().manual_seed(3))  # 160x1088 px: 2 tiles a stage
    save_image(lr, tmp_path / "in.png")
    out = tmp_path / "out.png"
    assert main(["run", str(demo_artifact), str(tmp_path / "in.png"), "-o", str(out), "--no-tile",
                 "--untiled-max-mp", "0.05"]) == 2
    assert "--untiled-max-mp" in capsys.readouterr().err and not out.exists()
    assert main(["run", str(demo_artifact), str(tmp_path / "in.png"), "-o", str(out)]) == 0
    assert "tile" in capsys.readouterr().err  # the progress bar over tiles
    assert load_image(out).shape == (1, 3, 160, 1088)
    # -v: the plan per stage and its work against an untiled pass, for the run's plan
    for plan, work in (("even", "1.05x"), ("fixed", "1.80x")):  # 2 tiles of 568 px vs 2 of 1024
        assert main(["run", str(demo_artifact), str(tmp_path / "in.png"), "-o", str(out), "--force", "-v",
                     "--tile-plan", plan]) == 0
        line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("in.png: "))
        assert f"{plan} tile plan: encode 2 x" in line and f"work {work} an untiled pass" in line, line


def test_s3diff_tiles_share_the_whole_image_scores(tmp_path):
    """S3Diff's modulated graphs through the tiled pipeline (torch backend): scores from the
    whole LR image, repeated over every tile batch; equal to the tiled reference."""
    from srexport.artifact.guidance import s3diff_guidance_section
    from srexport.export.s3diff_recipe import S3DiffSettings, s3diff_specs
    from srexport.models.base import build_base
    from srexport.models.s3diff import load_de_net, load_s3diff_checkpoint, write_demo_checkpoints
    from srexport.models.s3diff.reference import S3DiffReference
    from srexport.models.tiled_reference import TiledReference

    checkpoint, de_net = write_demo_checkpoints(tmp_path, seed=0)
    ref = S3DiffReference(build_base("demo", seed=0), load_s3diff_checkpoint(checkpoint), load_de_net(de_net))
    specs = s3diff_specs(S3DiffSettings())
    tiling = TilingSettings(tile=64, overlap=0, batch=3, vae_tile=64, vae_overlap=0, vae_norm="per-tile", unet_norm="per-tile")  # two tiles
    manifest = {"processing": ref.processing.to_dict(), "denoise": ref.denoise_plan(), "tiling": tiling_section(tiling),
                "model": {"kind": "s3diff", "degradation": {"mode": "dynamic"}},
                "guidance": s3diff_guidance_section(ref.cfg_scale)}
    modules = ref.components()
    pipeline = SRPipeline(manifest, {n: TorchRunner(modules[n], specs[n]) for n in specs})
    lr = torch.rand(1, 3, 16, 28, generator=torch.Generator().manual_seed(5))  # 64x112 px, padded to 64x128
    assert pipeline.tile_counts(16, 28) == {"encode": 2, "denoise": 2, "decode": 2}
    run = pipeline.run_stages(lr)
    assert torch.equal(run.tensors["scores"], ref.scores(lr))
    expected = TiledReference(ref, tiling)(lr)
    assert run.tensors["output"].shape == expected.shape == (1, 3, 64, 112)
    assert compare(run.tensors["output"], expected, 1.0).psnr_db > 90
