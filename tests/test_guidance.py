"""Guidance chosen per call (issue 14): PiSA-SR's adjustable UNet, exact artifacts at any scales,
the plans of artifact/guidance.py, and every refusal. S3Diff's cfg input and given scores are in
tests/test_s3diff_export.py, beside its artifact."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from srexport.artifact.guidance import (Controls, Resolved, default_mode, pisa_guidance_section, pisa_plan,
                                       pisa_unets, resolve)
from srexport.errors import UserError
from srexport.models.pisa_reference import PisaReference, PisaSettings
from srexport.parity import compare


def _reference(source, **settings):
    base, ckpt = source.load()
    return PisaReference(base, ckpt, PisaSettings(process_size=128, **settings))


def _latent(seed=0, batch=1, h=16, w=24):
    return torch.randn(batch, 4, h, w, generator=torch.Generator().manual_seed(seed))


def _upstream_exact(exact_ref, z, lp, ls):
    """Upstream's two passes with separately merged W_pix and W_sem: z - [lp eps_pix + ls (eps_sem - eps_pix)]."""
    eps_pix = exact_ref.unets["unet_pix"].epsilon(z)
    eps_sem = exact_ref.unets["unet_sem"].epsilon(z)
    return z - (lp * eps_pix + ls * (eps_sem - eps_pix))


@pytest.fixture(scope="module")
def exact_reference(demo_source):
    with torch.no_grad():
        return _reference(demo_source, guidance="exact")


# --- the two-branch module ----------------------------------------------------------------------


def test_adjustable_reference_runs_upstream_exact_and_merged(demo_source, exact_reference):
    """The adjustable reference at per-call scales: exact equals upstream's two-pass formula on
    separately merged weights, merged equals a merged reference built at those scales."""
    adjustable = _reference(demo_source, guidance="adjustable")
    merged = _reference(demo_source, lambda_pix=0.8, lambda_sem=0.5, guidance="merged")
    z = _latent(1)
    with torch.no_grad():
        exact = adjustable.denoise(z, Resolved(pisa_plan("adjustable", "exact", 0.8, 0.5)))
        assert float((exact - _upstream_exact(exact_reference, z, 0.8, 0.5)).abs().max()) < 1e-5
        as_merged = adjustable.denoise(z, Resolved(pisa_plan("adjustable", "merged", 0.8, 0.5)))
        assert float((as_merged - merged.denoise(z)).abs().max()) < 1e-5
        assert float((as_merged - exact).abs().max()) > 1e-4  # the two modes differ off lambda_pix = 1


# --- the graphs, in onnxruntime -----------------------------------------------------------------


def _ort_unet(folder, name="unet"):
    from srexport.artifact.manifest import load_artifact
    from srexport.runtime.runners import ort_runners

    return ort_runners(load_artifact(folder))[name]


def _combine(plan, z, outputs):
    z0 = plan["latent_weight"] * z
    for term, out in zip(plan["terms"], outputs):
        z0 = z0 + term["weight"] * out
    return z0


def test_adjustable_merged_equals_merged_artifacts_in_onnxruntime(adjustable_artifact, demo_artifact, demo_source,
                                                                  tmp_path):
    """z0 of the adjustable graph in merged mode == a merged graph built at those scales, both in
    onnxruntime: (1, 1) is the demo artifact, (0.8, 0.5) a merged UNet exported here."""
    from srexport.artifact.specs import Geometry
    from srexport.export.onnx_export import export_onnx
    from srexport.export.pisa_recipe import pisa_specs
    from srexport.runtime.runners import OnnxRuntimeRunner

    manifest = json.loads((adjustable_artifact / "manifest.json").read_text())
    unet = _ort_unet(adjustable_artifact)
    z = _latent(2)
    merged_08 = _reference(demo_source, lambda_pix=0.8, lambda_sem=0.5)
    spec = pisa_specs(merged_08.settings)["unet"]
    export_onnx(merged_08.unets["unet"], spec, tmp_path / "unet.onnx", Geometry(1, 128, 128))
    for scales, merged in (((1.0, 1.0), _ort_unet(demo_artifact)), ((0.8, 0.5), OnnxRuntimeRunner(tmp_path / "unet.onnx",
                                                                                            spec))):
        plan = resolve(manifest, Controls(*scales)).plan
        term = plan["terms"][0]
        assert term["lora_scales"] == [1.0, scales[1] / scales[0]]
        ours = _combine(plan, z, [unet({"latent": z, "lora_scales": torch.tensor([term["lora_scales"]])})["denoised"]])
        assert float((ours - merged({"latent": z})["denoised"]).abs().max()) < 1e-5


def test_adjustable_exact_is_one_batch_equal_to_upstream_two_passes(adjustable_artifact, exact_reference):
    """Exact guidance on the adjustable graph: ONE onnxruntime call of batch 2, (1, 0) and (1, 1),
    combined by the plan, equals upstream's formula on separately merged W_pix and W_sem."""
    from srexport.runtime.pipeline import SRPipeline

    manifest = json.loads((adjustable_artifact / "manifest.json").read_text())
    unet = _ort_unet(adjustable_artifact)
    calls = []
    counted = type("Counted", (), {"spec": unet.spec, "backend": "ort",
                                   "__call__": lambda self, feeds: calls.append(feeds) or unet(feeds)})()
    pipeline = SRPipeline(manifest, {"unet": counted})
    z = _latent(4)
    resolved = pipeline.controls(lambda_pix=0.8, lambda_sem=0.5, guidance="exact")
    z0 = pipeline._denoise({"latent": z}, resolved.plan)
    assert len(calls) == 1 and calls[0]["latent"].shape[0] == 2
    assert calls[0]["lora_scales"].tolist() == [[1.0, 0.0], [1.0, 1.0]]
    with torch.no_grad():
        expected = _upstream_exact(exact_reference, z, 0.8, 0.5)
    assert float((z0 - expected).abs().max()) < 1e-5


def test_a_batch_of_images_with_different_scales_equals_each_alone(adjustable_artifact, demo_source):
    """Per-sample coefficients inside the graph: a batch of two latents at two scales equals each
    alone (onnxruntime and the PyTorch module)."""
    unet = _ort_unet(adjustable_artifact)
    module = _reference(demo_source, guidance="adjustable").unets["unet"]
    z = torch.cat([_latent(5), _latent(6)])
    scales = torch.tensor([[1.0, 0.3], [1.0, 1.4]])
    together = unet({"latent": z, "lora_scales": scales})["denoised"]
    with torch.no_grad():
        torch_together = module(z, scales)
    for i in range(2):
        alone = unet({"latent": z[i:i + 1], "lora_scales": scales[i:i + 1]})["denoised"]
        assert float((together[i:i + 1] - alone).abs().max()) < 1e-5
        assert float((torch_together[i:i + 1] - alone).abs().max()) < 1e-4
    assert float((together[0] - together[1]).abs().max()) > 1e-3


@pytest.mark.parametrize("lambda_sem", [0.0, 1.0])
def test_merged_equals_exact_at_lambda_pix_one_through_the_pipeline(adjustable_artifact, small_lr, lambda_sem):
    from srexport.runtime.loading import load_pipeline

    pipeline = load_pipeline(adjustable_artifact)
    merged = pipeline(small_lr, lambda_pix=1.0, lambda_sem=lambda_sem, guidance="merged")
    exact = pipeline(small_lr, lambda_pix=1.0, lambda_sem=lambda_sem, guidance="exact")
    assert float((merged - exact).abs().max()) < 1e-5
    other = pipeline(small_lr, lambda_pix=0.8, lambda_sem=0.5)
    assert float((other - merged).abs().max()) > 1e-3  # the scales reach the image


def test_adjustable_pipeline_equals_the_reference_at_per_call_scales(adjustable_artifact, demo_source, small_lr):
    """End to end, onnxruntime at (0.8, 0.5) exact vs the adjustable reference at the same call."""
    from srexport.runtime.loading import load_pipeline

    pipeline = load_pipeline(adjustable_artifact)
    resolved = pipeline.controls(lambda_pix=0.8, lambda_sem=0.5, guidance="exact")
    ref = _reference(demo_source, guidance="adjustable")
    out = pipeline.run_stages(small_lr, resolved=resolved).tensors["output"]
    assert compare(out, ref(small_lr, resolved), 1.0).psnr_db > 90


# --- exact artifacts take per-call scales --------------------------------------------------------


def _torch_pipeline(ref, built, lp=1.0, ls=1.0, tiling=None):
    from srexport.export.pisa_recipe import pisa_specs, pisa_unets
    from srexport.models.group_norm_stats import graph_modules, two_pass_specs
    from srexport.runtime.pipeline import SRPipeline
    from srexport.runtime.runners import TorchRunner

    specs = pisa_specs(ref.settings)
    modules = graph_modules(ref)
    if tiling is not None:
        specs.update(two_pass_specs(specs, modules, plains=pisa_unets(ref.settings)))
    manifest = {"processing": ref.processing.to_dict(), "denoise": ref.settings.denoise_plan(),
                "model": {"kind": "pisa-sr"},
                "guidance": pisa_guidance_section(built, lp, ls, pisa_unets(ref.settings))}
    if tiling is not None:
        from srexport.artifact.tile_settings import tiling_section

        manifest["tiling"] = tiling_section(tiling)
        manifest["components"] = {n: {} for n in specs}
    return SRPipeline(manifest, {n: TorchRunner(modules[n], specs[n]) for n in specs})


def test_exact_artifact_at_per_call_scales_equals_one_built_at_them(demo_source, exact_reference, small_lr):
    built_there = _reference(demo_source, lambda_pix=0.8, lambda_sem=0.5, guidance="exact")
    pipeline = _torch_pipeline(exact_reference, "exact")
    out = pipeline(small_lr, lambda_pix=0.8, lambda_sem=0.5)
    assert float((out - _torch_pipeline(built_there, "exact", 0.8, 0.5)(small_lr)).abs().max()) < 1e-6
    with torch.no_grad():
        z = _latent(7)
        plan = pipeline.controls(lambda_pix=0.8, lambda_sem=0.5).plan
        assert float((exact_reference.denoise(z, Resolved(plan)) - _upstream_exact(exact_reference, z, 0.8, 0.5)
                      ).abs().max()) < 1e-5


def test_tiled_adjustable_exact_with_coarse_unet_statistics_matches_the_tiled_reference(demo_source):
    """Exact guidance's two samples share one batch per tile batch, and so do their statistics
    passes: each copy is pooled apart (copy-major), as the tiled reference's two passes record."""
    from srexport.artifact.tile_settings import TilingSettings
    from srexport.models.tiled_reference import TiledReference

    ref = _reference(demo_source, guidance="adjustable")
    tiling = TilingSettings(tile=128, overlap=32, batch=2, vae_tile=512, vae_overlap=0, vae_norm="per-tile",
                            unet_norm="coarse")
    pipeline = _torch_pipeline(ref, "adjustable", tiling=tiling)
    lr = torch.rand(1, 3, 96, 64, generator=torch.Generator().manual_seed(8))
    resolved = pipeline.controls(lambda_pix=0.8, lambda_sem=0.5, guidance="exact")
    assert pipeline.tile_counts(96, 64, resolved)["denoise stats"] >= 1
    out = pipeline.run_stages(lr, resolved=resolved).tensors["output"]
    expected = TiledReference(ref, tiling)(lr, resolved)
    assert compare(out, expected, 1.0).psnr_db > 90
    per_tile = TiledReference(ref, dataclasses.replace(tiling, unet_norm="per-tile"))(lr, resolved)
    assert compare(out, per_tile, 1.0).psnr_db < 80  # the pooled statistics changed something


# --- what an artifact lets a call change ---------------------------------------------------------


def _pisa_manifest(built, lp=1.0, ls=1.0):
    unets = pisa_unets(built)
    return {"model": {"kind": "pisa-sr"}, "guidance": pisa_guidance_section(built, lp, ls, unets),
            "denoise": pisa_plan(built, default_mode(built, lp), lp, ls, unets)}


def test_plans_of_each_build():
    assert resolve(_pisa_manifest("merged")).plan == {"latent_weight": 0.0,
                                                      "terms": [{"component": "unet", "weight": 1.0}]}
    exact = resolve(_pisa_manifest("exact"), Controls(0.8, 0.5)).plan
    assert exact["latent_weight"] == pytest.approx(0.2)
    assert [(t["component"], round(t["weight"], 6)) for t in exact["terms"]] == [("unet_pix", 0.3), ("unet_sem", 0.5)]
    # a term of weight 0 is left out: exact at lambda_pix = lambda_sem is one UNet pass
    assert [t["component"] for t in resolve(_pisa_manifest("exact"), Controls(0.7, 0.7)).plan["terms"]] == [
        "unet_sem"]
    adjustable = resolve(_pisa_manifest("adjustable"), Controls(0.8, 0.5, "exact")).plan
    assert [t["lora_scales"] for t in adjustable["terms"]] == [[1.0, 0.0], [1.0, 1.0]]
    assert resolve(_pisa_manifest("adjustable", lp=0.0)).mode == "exact"  # lambda_pix 0 has no merged form


@pytest.mark.parametrize("manifest,controls,message", [
    (_pisa_manifest("adjustable"), Controls(float("nan"), 1.0), "--lambda-pix nan is not finite"),
    (_pisa_manifest("adjustable"), Controls(1.0, float("inf")), "--lambda-sem inf is not finite"),
    (_pisa_manifest("adjustable"), Controls(0.0, 1.0, "merged"), "has no merged form"),
    (_pisa_manifest("adjustable"), Controls(guidance="both"), "is not one of merged, exact"),
    (_pisa_manifest("merged"), Controls(0.8, 0.5), "--guidance adjustable"),
    (_pisa_manifest("merged"), Controls(guidance="exact"), "rebuild with --guidance adjustable"),
    (_pisa_manifest("exact"), Controls(guidance="merged"), "rebuild with --guidance adjustable"),
    (_pisa_manifest("adjustable"), Controls(cfg_scale=1.2), "--cfg-scale does not apply to a pisa-sr artifact"),
    (_pisa_manifest("adjustable"), Controls(degradation=(0.1, 0.2)), "--degradation does not apply"),
])
def test_bad_controls_are_refused_in_one_line(manifest, controls, message):
    with pytest.raises(UserError, match=message) as error:
        resolve(manifest, controls)
    assert "\n" not in str(error.value)


def test_adjustable_manifest_and_engine_profiles(adjustable_artifact):
    from srexport.artifact.manifest import load_artifact
    from srexport.export.engines import engine_geometries

    artifact = load_artifact(adjustable_artifact)
    guidance = artifact.manifest["guidance"]
    assert guidance["built"] == "adjustable" and guidance["modes"] == ["merged", "exact"]
    assert artifact.components["unet"].input_names == ["latent", "lora_scales"]
    geometries, _ = engine_geometries(artifact.manifest, artifact.components)
    batch = artifact.manifest["tiling"]["batch"]
    assert [g.batch for g in geometries["unet"]] == [1, 2 * batch, 2 * batch]  # exact's two samples per tile
    assert [g.batch for g in geometries["vae_decoder"]][2] <= artifact.manifest["tiling"]["vae"]["decoder"]["batch"]
    assert "merged_vs_exact" in artifact.manifest["checks"]


def test_calibration_covers_both_modes(demo_source):
    """An adjustable UNet's calibration samples hold each tile at merged's and exact's (a, b)."""
    from srexport.artifact.specs import vae_decoder_spec
    from srexport.calibration.capture import capture_inputs
    from srexport.export.pisa_recipe import pisa_specs

    ref = _reference(demo_source, lambda_pix=0.8, lambda_sem=0.5, guidance="adjustable")
    specs = {**pisa_specs(ref.settings), "vae_decoder": vae_decoder_spec()}
    tiles = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    inputs = capture_inputs(ref, specs, tiles)
    assert inputs["unet"]["lora_scales"].tolist() == [[1.0, 0.625], [1.0, 0.0], [1.0, 1.0]] * 2
    assert inputs["unet"]["latent"].shape[0] == 6 and inputs["vae_decoder"]["denoised"].shape[0] == 2


def test_fp16_keeps_the_coefficients_in_fp32(adjustable_artifact):
    """The (a, b) multiplies stay float32 in the fp16 graph, so a coefficient is not rounded to fp16."""
    import onnx

    from srexport.calibration.fp16 import convert_to_fp16
    from srexport.models.pisa_branches import coefficient_nodes

    model = onnx.load(str(adjustable_artifact / "unet.onnx"))
    keep = coefficient_nodes(model)
    muls = [n for n in model.graph.node if n.name in set(keep) and n.op_type == "Mul"]
    assert len(muls) == 258  # one (a, b) multiply per LoRA layer (onnxslim shares the (a, b) -> c MatMul)
    converted = convert_to_fp16(model, keep)
    floats = {t.name for t in converted.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    mixes = [n for n in converted.graph.node if n.name in set(keep) and n.op_type == "MatMul"]
    assert mixes and all(n.input[1] in floats for n in mixes)  # the (a, b) -> c expansion stays fp32
    made_by = {o: n for n in converted.graph.node for o in n.output}
    kept_muls = [n for n in converted.graph.node if n.name in {m.name for m in muls}]
    # each multiply reads the low-rank activations through a Cast to float32
    assert all(made_by[n.input[0]].op_type == "Cast" for n in kept_muls)
    from srexport.calibration.int8 import sensitive_nodes

    excluded = sensitive_nodes(model)  # int8: the up-projections and the (a, b) expansion stay float
    ups = [n.name for n in model.graph.node if "/lora_up/" in n.name and n.op_type in ("Conv", "MatMul")]
    assert len(ups) == 258 and all(n in excluded for n in ups)
    assert sum("per-call coefficients" in excluded[n] for n in ups) >= 256  # conv_in/out's own rule comes first
    assert all(n.name in excluded for n in mixes)


# --- the command line --------------------------------------------------------------------------


def test_cli_run_takes_scales_and_refuses_bad_ones(adjustable_artifact, demo_artifact, small_lr, tmp_path, capsys):
    from srexport.cli import main
    from srexport.runtime.images import load_image, save_image

    photo = tmp_path / "lr.png"
    save_image(small_lr, photo)
    out = tmp_path / "sr.png"
    assert main(["run", str(adjustable_artifact), str(photo), "-o", str(out), "--lambda-pix", "0.8",
                 "--lambda-sem", "0.5", "--guidance", "exact"]) == 0
    from srexport.runtime.loading import load_pipeline

    expected = load_pipeline(adjustable_artifact)(load_image(photo), lambda_pix=0.8, lambda_sem=0.5, guidance="exact")
    assert compare(load_image(out), expected, 1.0).max_abs <= 1 / 255 + 1e-6
    capsys.readouterr()
    bad = [
        (adjustable_artifact, ["--lambda-pix", "nan"], "not finite"),
        (adjustable_artifact, ["--lambda-pix", "0", "--guidance", "merged"], "pass --guidance exact"),
        (demo_artifact, ["--lambda-pix", "0.8"], "--guidance adjustable"),
        (adjustable_artifact, ["--cfg-scale", "1.2"], "does not apply to a pisa-sr artifact"),
        (adjustable_artifact, ["--degradation", "0.3,2"], "in [0, 1]"),
    ]
    for artifact, flags, message in bad:
        target = tmp_path / "refused.png"
        assert main(["run", str(artifact), str(photo), "-o", str(target), *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
        assert not target.exists()


def test_cli_check_and_bench_take_the_same_options(adjustable_artifact, tmp_path, capsys):
    from srexport.cli import main

    assert main(["check", str(adjustable_artifact), "--lambda-pix", "0.8", "--lambda-sem", "0.5",
                 "--guidance", "exact"]) == 0
    out = capsys.readouterr().out
    assert "lambda_pix=0.8, lambda_sem=0.5 (exact)" in out and "all parity bounds hold" in out
    report = tmp_path / "bench.json"
    assert main(["bench", str(adjustable_artifact), "--backends", "ort", "--iters", "1", "--warmup", "0",
                 "--inputs", "1", "--lambda-pix", "0.8", "--lambda-sem", "0.5", "--json", str(report)]) == 0
    config = json.loads(report.read_text())["config"]
    assert config["guidance"] == {"lambda_pix": 0.8, "lambda_sem": 0.5, "mode": "merged"}
    capsys.readouterr()
    assert main(["check", str(adjustable_artifact), "--cfg-scale", "1.1"]) == 2
    assert "does not apply to a pisa-sr artifact" in capsys.readouterr().err
