"""Two-pass tiled VAE (--vae-norm two-pass): GroupNorm statistics recorded per tile, pooled
over the image, and every tile normalised with the pool.

The statistics and their pooling are checked against direct computation; the graphs against
their modules (at build) and the tiled ONNX runs against the tiled PyTorch reference; the
method itself against per-tile statistics, by its distance to a whole-image pass."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from srexport.errors import UserError
from srexport.models.group_norm_stats import (
    PooledNorm,
    StatsPool,
    TileStats,
    graph_modules,
    normalising_with,
    pool_stats,
    statistics_nodes,
)
from srexport.parity import compare
from srexport.runtime.pipeline import SRPipeline
from srexport.runtime.tiling import TilingSettings, tile_geometries, tiling_section

# the VAE's statistics methods on their own: the UNet's tiles keep their own statistics
SMALL_TILES = dict(tile=64, overlap=16, batch=4, vae_tile=64, vae_overlap=16, plan="fixed", unet_norm="per-tile")


@pytest.fixture(scope="module")
def two_pass_artifact(tmp_path_factory):
    """The demo built as conftest's demo_artifact is, but with the default VAE statistics (coarse),
    so with the two-pass VAE graphs, and 256 px VAE tiles (so that the CLI test's 160x544 output is
    three VAE tiles)."""
    from srexport.cli import main

    out = tmp_path_factory.mktemp("artifacts") / "pisa-two-pass"
    assert main(["build", "--scale", "4", "--process-size", "128", "--precision", "fp32",
                 "--vae-tile", "256", "--vae-tile-overlap", "64", "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def art_and_ref(two_pass_artifact):
    from srexport.artifact.manifest import load_artifact
    from srexport.runtime.loading import reference_for

    art = load_artifact(two_pass_artifact)
    return art, reference_for(art)


def _pipeline(art, **tiling) -> SRPipeline:
    from srexport.runtime.runners import ort_runners

    manifest = copy.deepcopy(art.manifest)
    manifest["tiling"] = tiling_section(TilingSettings(**tiling))
    return SRPipeline(manifest, ort_runners(art))


# --- statistics and pooling --------------------------------------------------------------


def _group_stats(x: torch.Tensor, groups: int) -> torch.Tensor:
    v = x.double().reshape(x.shape[0], groups, -1)
    return torch.stack([v.mean(-1), v.var(-1, unbiased=False)], -1)


def test_recorded_statistics_are_each_group_norms_input_statistics(demo_source):
    """TileStats == the (mean, variance) of every GroupNorm's input in call order, read by hooks
    on the plain encoder; the pooled graph given a tile's own statistics is the plain encoder."""
    from srexport.models.components import VaeEncoderMean

    base, _ = demo_source.load()
    encoder = VaeEncoderMean(base.vae).eval()
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.append(_group_stats(args[0], m.num_groups)))
             for m in encoder.modules() if isinstance(m, nn.GroupNorm)]
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        plain = encoder(x)
        for h in hooks:
            h.remove()
        stats = TileStats(encoder)(x)
        again = PooledNorm(encoder)(x, stats)
    assert stats.shape == (2, len(seen), 8, 2) and len(seen) == 22  # SD's encoder: 22 GroupNorms
    assert float((stats.double() - torch.stack(seen, 1)).abs().max()) < 1e-5
    assert float((again - plain).abs().max()) < 1e-5  # own statistics: the same computation


def test_pooled_statistics_of_equal_tiles_are_the_union_statistics():
    """Law of total variance: two halves of an image pool to the whole image's statistics,
    whole-tensor (pool_stats, the reference's) and streamed (StatsPool, the runtime's)."""
    norm = nn.GroupNorm(4, 8)
    x = torch.randn(1, 8, 16, 32, generator=torch.Generator().manual_seed(1)) * 3 + 2
    halves = torch.cat([x[..., :16], x[..., 16:]])
    with torch.no_grad():
        whole, per_half = TileStats(norm)(x), TileStats(norm)(halves)
    assert float((per_half[0] - per_half[1]).abs().max()) > 1e-2  # the halves differ
    assert float((pool_stats(per_half) - whole).abs().max()) < 1e-5
    pool = StatsPool()
    tiles = torch.cat([per_half, per_half[:1]])  # three tiles, streamed as batches of 2 and 1
    pool.add(tiles[:2])
    pool.add(tiles[2:])
    assert pool.count == 3 and float((pool.result() - pool_stats(tiles)).abs().max()) < 1e-6
    with torch.no_grad(), normalising_with(norm, whole.expand(2, -1, -1, -1)):
        normalised = norm(halves)
    expected = norm(x)  # the whole image's GroupNorm, cut in halves
    assert float((torch.cat([normalised[0], normalised[1]], -1) - expected[0]).abs().max()) < 1e-5


def test_statistics_of_the_wrong_length_are_refused():
    norm = nn.Sequential(nn.GroupNorm(2, 4), nn.GroupNorm(2, 4))
    with pytest.raises(ValueError, match="statistics for 1 GroupNorms"):
        with torch.no_grad(), normalising_with(norm, torch.ones(1, 1, 2, 2)):
            norm(torch.randn(1, 4, 3, 3))
    with pytest.raises(ValueError, match="statistics for 3 GroupNorms, but the network called 2"):
        with torch.no_grad(), normalising_with(norm, torch.ones(1, 3, 2, 2)):
            norm(torch.randn(1, 4, 3, 3))
    assert "forward" not in vars(norm[0])  # the modules are themselves again


# --- the artifact: graphs, manifest, engine shapes ------------------------------------------


def test_artifact_holds_two_pass_graphs_and_records_the_method(art_and_ref):
    art, _ = art_and_ref
    m = art.manifest
    assert m["tiling"]["vae"]["norm"] == "coarse" and "averaged over" in m["tiling"]["description"]
    assert TilingSettings.from_manifest(m["tiling"]) == TilingSettings(vae_tile=256, vae_overlap=64)  # the defaults
    specs = art.components
    assert specs["vae_encoder_stats"].outputs[0].dims == ("batch", 22, 8, 2)
    assert specs["vae_decoder_pooled"].input_names == ["denoised", "decoder_norm_stats"]
    assert specs["vae_decoder_pooled"].outputs == specs["vae_decoder"].outputs
    for name in ("vae_encoder_stats", "vae_encoder_pooled", "vae_decoder_stats", "vae_decoder_pooled"):
        assert m["checks"]["components"][name]["rel_l2"] < 1e-4
        assert not any(m["checks"]["tensorrt_parser"][name].values())  # TensorRT 10/11 parse them
        plain = "vae_encoder" if "encoder" in name else "vae_decoder"
        assert tile_geometries(m, name) == tile_geometries(m, plain)
    # the statistics graph stops at the last GroupNorm: the encoder's conv_out is not in it
    stats = onnx.load(str(art.component_file("vae_encoder_stats")))
    assert not any("conv_out" in n.name for n in stats.graph.node)
    # an older (format 1) manifest's sentence reads as per-tile, through the migration
    from srexport.artifact.manifest import migrate

    old = copy.deepcopy(m)
    old["format_version"] = 1
    old["tiling"]["vae"]["norm"] = "per tile (each tile's own GroupNorm statistics), blended"
    assert TilingSettings.from_manifest(migrate(old)["tiling"]).vae_norm == "per-tile"


def test_fp16_keeps_the_statistics_in_fp32(art_and_ref):
    """Converted as a build converts, the pooled decoder's GroupNorm arithmetic stays fp32 and
    its GPU-like fp16 rounding stays close to the fp32 graph on real statistics."""
    import onnxruntime as ort

    from srexport.calibration.fp16 import convert_to_fp16, emulate_fp16, fp32_nodes

    art, ref = art_and_ref
    fp32 = onnx.load(str(art.component_file("vae_decoder_pooled")))
    keep = statistics_nodes(fp32)
    reduce_means = sum(n.op_type == "ReduceMean" for n in fp32.graph.node)  # none: given statistics
    converted = convert_to_fp16(copy.deepcopy(fp32), keep)
    kept = fp32_nodes(converted)
    assert kept.get("Sqrt", 0) == sum(n.op_type == "Sqrt" for n in fp32.graph.node) == 30  # one per GroupNorm
    assert reduce_means == 0 and len(keep) > 30 * 5
    stats_graph = onnx.load(str(art.component_file("vae_decoder_stats")))
    stats_fp16 = convert_to_fp16(stats_graph, statistics_nodes(stats_graph))
    assert [o.type.tensor_type.elem_type for o in stats_fp16.graph.output] == [onnx.TensorProto.FLOAT]
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        stats = graph_modules(ref)["vae_decoder_stats"](latent)
    feeds = {"denoised": latent.numpy(), "decoder_norm_stats": stats.numpy()}

    def run(model):
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]

    exact, rounded = run(fp32), run(emulate_fp16(converted))
    as_is = run(converted)  # loads: no node left with mixed fp16/fp32 inputs (a shared constant did that)
    assert np.isfinite(rounded).all()
    for result in (rounded, as_is):
        assert compare(torch.from_numpy(result), torch.from_numpy(exact), 2.0).rel_l2 < 1e-2


def test_raising_the_opset_for_int8_moves_reduce_mean_axes_to_an_input():
    """int8 graphs go to opset 19 for Q/DQ; ReduceMean's axes became an input at 18."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from srexport.calibration.int8 import raise_opset

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["y"], name="mean", axes=[-1], keepdims=0)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = raise_opset(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), 19)
    assert model.opset_import[0].version == 19 and not model.graph.node[0].attribute[1:]
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert y.tolist() == [1.0, 4.0]


# --- tiled runs --------------------------------------------------------------------------


def test_two_pass_onnx_equals_the_two_pass_reference_and_beats_per_tile(art_and_ref, small_lr):
    from srexport.checking import check_image, failures

    art, ref = art_and_ref
    two_pass = check_image(_pipeline(art, **SMALL_TILES, vae_norm="two-pass"), ref, small_lr, "small")
    per_tile = check_image(_pipeline(art, **SMALL_TILES, vae_norm="per-tile"), ref, small_lr, "small")
    assert two_pass.tiles == {"encode stats": 12, "encode": 12, "denoise": 12, "decode stats": 12, "decode": 12}
    assert two_pass.tiled.psnr_db >= 50, two_pass.tiled.describe()
    assert not failures(two_pass, 1e-3, 50)  # every graph, statistics standardised, within 1e-3
    # 64 px VAE tiles on a 128x168 px image, both vs the whole-image reference: measured 32.4 dB
    # (two-pass) vs 24.4 dB (per-tile)
    gain = two_pass.tiled_vs_whole.psnr_db - per_tile.tiled_vs_whole.psnr_db
    assert gain > 3, (two_pass.tiled_vs_whole.describe(), per_tile.tiled_vs_whole.describe())


def test_two_pass_batches_of_1_and_4_are_identical_and_one_tile_is_untiled(art_and_ref, small_lr):
    art, _ = art_and_ref
    one = _pipeline(art, **dict(SMALL_TILES, batch=1), vae_norm="two-pass")
    four = _pipeline(art, **SMALL_TILES, vae_norm="two-pass")
    seen = []
    four.progress = lambda stage, done, total: seen.append((stage, done, total))
    assert torch.equal(one(small_lr), four(small_lr))
    assert ("encode stats", 12, 12) in seen and seen[-1] == ("decode", 12, 12)
    whole = _pipeline(art, tile=192, overlap=64, vae_tile=192, vae_overlap=64, vae_norm="two-pass")
    assert torch.equal(whole(small_lr), whole.run_stages(small_lr, tiled=False).tensors["output"])


def test_coarse_onnx_equals_the_coarse_reference_and_beats_per_tile(art_and_ref):
    """The coarse norm: statistics from the VAE input averaged over 3x3 pixels (one statistics
    pass over a ninth of the area), then every tile normalised with them. ONNX equals the tiled
    PyTorch reference of the same plan, and it is closer to the whole-image result than per-tile."""
    from srexport.checking import check_image

    art, ref = art_and_ref
    from srexport.samples import sample_image

    lr = sample_image()  # 256x256 px: coarse 80x80; a photo, as its statistics
    # are what an average over 3x3 pixels keeps (white noise loses 8/9 of its variance)
    even = dict(SMALL_TILES, plan="even")
    coarse = check_image(_pipeline(art, **even, vae_norm="coarse"), ref, lr, "coarse")
    per_tile = check_image(_pipeline(art, **even, vae_norm="per-tile"), ref, lr, "per-tile")
    # the statistics passes run over the coarse input's own grid: a ninth of the tiles' area
    assert coarse.tiles["encode stats"] < coarse.tiles["encode"] / 3
    assert coarse.tiles["decode stats"] < coarse.tiles["decode"] / 3
    assert coarse.tiled.psnr_db >= 50, coarse.tiled.describe()
    gain = coarse.tiled_vs_whole.psnr_db - per_tile.tiled_vs_whole.psnr_db
    assert gain > 2, (coarse.tiled_vs_whole.describe(), per_tile.tiled_vs_whole.describe())


def test_coarse_unet_statistics_onnx_equal_the_reference_and_beat_per_tile(art_and_ref):
    """The UNet's coarse statistics: its stats graph over the latent averaged over 3x3 (8x8 latent
    pixels here), pooled, then every UNet tile normalised with them. ONNX equals the tiled PyTorch
    reference of the same plan, and the UNet's share of the tiling error shrinks."""
    from srexport.checking import check_image
    from srexport.samples import sample_image

    art, ref = art_and_ref
    lr = sample_image()  # 256x256 px: a 32x32 latent in 64 px (8 latent) UNet tiles; coarse 8x8
    tiles = dict(tile=64, overlap=16, batch=4, vae_tile=256, vae_overlap=64, plan="even", vae_norm="per-tile")
    coarse = check_image(_pipeline(art, **tiles, unet_norm="coarse"), ref, lr, "coarse")
    per_tile = check_image(_pipeline(art, **tiles, unet_norm="per-tile"), ref, lr, "per-tile")
    assert coarse.tiles["denoise stats"] == 1 and "denoise stats" not in per_tile.tiles
    assert coarse.tiled.psnr_db >= 50, coarse.tiled.describe()
    gain = coarse.tiled_vs_whole.psnr_db - per_tile.tiled_vs_whole.psnr_db
    assert gain > 1, (coarse.tiled_vs_whole.describe(), per_tile.tiled_vs_whole.describe())
    assert set(art.components) >= {"unet_stats", "unet_pooled"}  # the default build holds them


def test_coarse_statistics_input_is_the_average_of_the_input(art_and_ref):
    """The runtime reads the encoder's coarse input in bands; it equals avg_pool2d of the whole
    encoder input (what the reference computes), cropped to whole latent pixels."""
    import torch.nn.functional as F

    from srexport.processing import preprocess
    from srexport.runtime.regions import UpscaledSource

    art, ref = art_and_ref
    lr = torch.rand(1, 3, 61, 97, generator=torch.Generator().manual_seed(2))
    source = UpscaledSource(lr, ref.processing)
    stage = TilingSettings(**SMALL_TILES, vae_norm="coarse").stages()["encode"]
    k, h, w = stage.coarse_size(*source.size)
    assert (k, h % 8, w % 8) == (3, 0, 0) and h == source.size[0] // 3 // 8 * 8
    whole = preprocess(lr, ref.processing).model_input
    expected = F.avg_pool2d(whole[..., : h * k, : w * k], k)
    assert torch.allclose(source.coarse_model_input(k, h, w), expected, atol=1e-5)
    assert stage.coarse_size(64, 64 * 3 * 8 - 1) is None  # a side under 8 latent pixels: no coarse input


@pytest.mark.parametrize("norm, unet_norm, lr_size", [("two-pass", "per-tile", (16, 28)),
                                                      ("coarse", "per-tile", (48, 48)),
                                                      ("per-tile", "coarse", (48, 48))])
def test_s3diff_two_pass_tiles_match_the_reference(tmp_path, norm, unet_norm, lr_size):
    """The scores-modulated S3Diff encoder through its two-pass graphs (torch backend), with
    the whole image's scores, equals the tiled reference of the same statistics method
    (two-pass; coarse on an image whose third is still 8 latent pixels a side)."""
    from srexport.artifact.guidance import s3diff_guidance_section
    from srexport.export.s3diff_recipe import S3DiffSettings, s3diff_specs
    from srexport.models.base import build_base
    from srexport.models.group_norm_stats import two_pass_specs
    from srexport.models.s3diff import load_de_net, load_s3diff_checkpoint, write_demo_checkpoints
    from srexport.models.s3diff.reference import S3DiffReference
    from srexport.models.tiled_reference import TiledReference
    from srexport.runtime.runners import TorchRunner

    checkpoint, de_net = write_demo_checkpoints(tmp_path, seed=0)
    ref = S3DiffReference(build_base("demo", seed=0), load_s3diff_checkpoint(checkpoint), load_de_net(de_net))
    modules = graph_modules(ref)
    specs = s3diff_specs(S3DiffSettings())
    specs.update(two_pass_specs(specs, modules))
    specs.update(two_pass_specs(specs, modules, plains=["unet"]))
    assert specs["vae_encoder_pooled"].input_names == ["image", "scores", "encoder_norm_stats"]
    assert specs["unet_pooled"].input_names == ["latent", "scores", "cfg_scale", "unet_norm_stats"]
    tiling = TilingSettings(tile=64, overlap=0, batch=3, vae_tile=64, vae_overlap=0, vae_norm=norm, unet_norm=unet_norm)
    manifest = {"processing": ref.processing.to_dict(), "denoise": ref.denoise_plan(),
                "tiling": tiling_section(tiling), "components": {n: {} for n in specs},
                "model": {"kind": "s3diff", "degradation": {"mode": "dynamic"}},
                "guidance": s3diff_guidance_section(ref.cfg_scale)}
    pipeline = SRPipeline(manifest, {n: TorchRunner(modules[n], specs[n]) for n in specs})
    lr = torch.rand(1, 3, *lr_size, generator=torch.Generator().manual_seed(5))
    if "coarse" in (norm, unet_norm):  # 192x192 px: the coarse pass runs on 64x64 px and 8x8 latent pixels
        stages = tiling.stages()
        assert stages["encode"].coarse_size(192, 192) == (3, 64, 64)
        assert stages["decode"].coarse_size(24, 24) == (3, 8, 8) == stages["denoise"].coarse_size(24, 24)
    expected = TiledReference(ref, tiling)(lr)
    per_tile = TiledReference(ref, dataclasses.replace(tiling, vae_norm="per-tile", unet_norm="per-tile"))(lr)
    out = pipeline(lr)
    assert compare(out, expected, 1.0).psnr_db > 90
    assert compare(out, per_tile, 1.0).psnr_db < 80  # the shared statistics changed something


# --- choosing the method at run time -------------------------------------------------------


def test_cli_run_chooses_the_method_and_refuses_two_pass_without_its_graphs(demo_artifact, two_pass_artifact,
                                                                           tmp_path, capsys):
    from srexport.cli import main
    from srexport.runtime.images import load_image, save_image

    lr = torch.rand(1, 3, 40, 136, generator=torch.Generator().manual_seed(3))  # 160x544 px: 3 VAE tiles of 256
    save_image(lr, tmp_path / "in.png")
    out = tmp_path / "out.png"
    assert main(["run", str(demo_artifact), str(tmp_path / "in.png"), "-o", str(out), "--vae-norm", "two-pass"]) == 2
    err = capsys.readouterr().err
    assert "no two-pass VAE graphs" in err and "--vae-norm two-pass" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert main(["run", str(demo_artifact), str(tmp_path / "in.png"), "-o", str(out), "--unet-norm", "coarse"]) == 2
    err = capsys.readouterr().err
    assert "no UNet statistics graphs (unet_stats, unet_pooled)" in err and "--unet-norm coarse" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
    for method in ("two-pass", "per-tile"):
        assert main(["run", str(two_pass_artifact), str(tmp_path / "in.png"), "-o", str(tmp_path / f"{method}.png"),
                     "--vae-norm", method]) == 0
        assert ("encode stats" in capsys.readouterr().err) == (method == "two-pass")  # the progress bar
    a, b = load_image(tmp_path / "two-pass.png"), load_image(tmp_path / "per-tile.png")
    assert a.shape == b.shape == (1, 3, 160, 544)
    assert compare(a, b, 1.0).psnr_db < 60  # two methods, two results
    with pytest.raises(UserError, match="not one of"):
        SRPipeline(art_manifest_with(two_pass_artifact, "three-pass"), {})


def art_manifest_with(folder, method: str) -> dict:
    from srexport.artifact.manifest import read_manifest

    manifest = read_manifest(folder)
    manifest["tiling"]["vae"]["norm"] = method
    return manifest
