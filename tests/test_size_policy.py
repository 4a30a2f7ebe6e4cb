"""PiSA-SR's size policy (issue 17 item 9): "pad" (the default) gives exactly scale x the input,
"floor" keeps upstream's resize to the size floored to a multiple of 8; both through
``preprocess``/``postprocess``, the region-wise tiled path, the ONNX artifact and the manifest."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from srexport.errors import UserError
from srexport.models.pisa_reference import PisaReference, PisaSettings
from srexport.parity import compare
from srexport.processing import Processing, postprocess, preprocess
from srexport.runtime import regions
from srexport.samples import sample_image


def _processing(policy: str, process_size: int = 512) -> Processing:
    return PisaSettings(process_size=process_size, size_policy=policy).validate().processing()


def _shapes(lr_size, p: Processing):
    """(encoder input, final output) sizes of one run, the decoder standing in as the identity."""
    lr = torch.rand(1, 3, *lr_size, generator=torch.Generator().manual_seed(sum(lr_size)))
    prepared = preprocess(lr, p)
    out = postprocess(prepared.model_input, prepared, p)
    return tuple(prepared.model_input.shape[-2:]), tuple(out.shape[-2:])


# --- geometry -----------------------------------------------------------------------------

# (process size, LR size, policy) -> (encoder input, output). At process size 512 sides below
# 128 are pre-resized (upstream's int() truncation: 49 becomes 127, not 128), at 128 below 32.
CASES = [
    (512, (217, 301), "pad", (872, 1208), (868, 1204)),  # the issue's example
    (512, (217, 301), "floor", (864, 1200), (864, 1200)),  # upstream's
    (512, (127, 200), "pad", (512, 808), (508, 800)),  # pre-resized to 128x201: 512x804, padded
    (512, (127, 200), "floor", (512, 800), (508, 800)),  # ...floored; both end at 4x the original
    (512, (49, 70), "pad", (512, 728), (196, 280)),  # pre-resized to 127x182: 508x728, padded
    (512, (49, 70), "floor", (504, 728), (196, 280)),
    (128, (33, 41), "pad", (136, 168), (132, 164)),
    (128, (33, 41), "floor", (128, 160), (128, 160)),
    (128, (23, 31), "pad", (128, 176), (92, 124)),  # pre-resized to 32x43
    (128, (23, 31), "floor", (128, 168), (92, 124)),
]


@pytest.mark.parametrize("process_size,lr_size,policy,model,output", CASES,
                         ids=[f"{c[0]}-{c[1][0]}x{c[1][1]}-{c[2]}" for c in CASES])
def test_output_sizes_under_both_policies(process_size, lr_size, policy, model, output):
    p = _processing(policy, process_size)
    assert _shapes(lr_size, p) == (model, output)
    assert p.model_size(*lr_size) == regions.upscaled_size(*lr_size, p) == model
    assert p.output_size(*lr_size) == output
    assert model[0] % 8 == 0 and model[1] % 8 == 0
    if policy == "pad":
        assert output == (4 * lr_size[0], 4 * lr_size[1])


def test_pad_keeps_the_upscaled_pixels_and_reflects_past_them():
    lr = sample_image()[..., 5:38, 11:52].contiguous()  # 33x41 -> 132x164, padded to 136x168
    pad, floor = _processing("pad", 128), _processing("floor", 128)
    prepared = preprocess(lr, pad)
    x = prepared.model_input
    assert tuple(prepared.reference.shape[-2:]) == (132, 164)
    assert torch.equal(x[..., :132, :164], (prepared.reference * 2 - 1).clamp(-1, 1))
    for k in range(4):  # reflection about the last row / column, which is not repeated
        assert torch.equal(x[..., 132 + k, :], x[..., 130 - k, :])
        assert torch.equal(x[..., :, 164 + k], x[..., :, 162 - k])
    # Where x4 is already a multiple of 8 the policies differ only in pad's clamp to [-1, 1].
    even = sample_image()[..., 4:38, 10:52].contiguous()  # 34x42
    a, b = preprocess(even, pad).model_input, preprocess(even, floor).model_input
    assert tuple(a.shape[-2:]) == (136, 168) and torch.equal(a, b.clamp(-1, 1))
    assert float(b.abs().max()) > 1  # bicubic overshoots: the clamp is not vacuous here


@pytest.mark.parametrize("lr_size", [(33, 41), (23, 31)], ids=["odd", "odd-pre-resized"])
def test_regions_follow_the_pad_policy(monkeypatch, lr_size):
    """The tiled path computes the same padded encoder input and the same cropped output."""
    monkeypatch.setattr(regions, "BAND_PIXELS", 2000)
    p = _processing("pad", 128)
    lr = torch.rand(1, 3, *lr_size, generator=torch.Generator().manual_seed(5))
    prepared = preprocess(lr, p)
    source = regions.UpscaledSource(lr, p)
    height, width = source.size
    assert (height, width) == tuple(prepared.model_input.shape[-2:])
    assert source.reference_size == tuple(prepared.reference.shape[-2:])
    whole = source.model_region(np.arange(height), np.arange(width))
    assert float((whole - prepared.model_input).abs().max()) < 2e-6
    decoded = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(1)) * 2.2 - 1.1
    expected = postprocess(decoded.clone(), prepared, p)
    finished = regions.finish_in_place(decoded, source)
    assert tuple(finished.shape[-2:]) == (4 * lr_size[0], 4 * lr_size[1]) == tuple(expected.shape[-2:])
    assert float((finished - expected).abs().max()) < 2e-6


def test_policies_are_validated_and_old_settings_mean_floor():
    with pytest.raises(UserError, match="--size-policy 'ceil'.*pad, floor"):
        PisaSettings(size_policy="ceil").validate()
    with pytest.raises(UserError, match="size_policy 'ceil'.*rebuild"):
        Processing.from_dict(dict(_processing("pad").to_dict(), size_policy="ceil"))
    new = PisaSettings(process_size=128)
    recorded = dataclasses.asdict(new)
    assert PisaSettings.from_manifest(recorded) == new and new.size_policy == "pad"
    del recorded["size_policy"]  # an artifact from before the setting existed
    assert PisaSettings.from_manifest(recorded).processing().size_policy == "resize_floor"


# --- the CLI and the manifest ------------------------------------------------------------


def test_cli_passes_the_policy_and_refuses_floor_for_s3diff(monkeypatch, tmp_path, capsys):
    import srexport.export.build as build_module
    from srexport.cli import main
    from srexport.export.pisa_recipe import pisa_manifest

    seen = {}

    def fake_build(prepare, source, settings, out, **kwargs):  # what cmd_build hands the build
        seen.update(source=source, settings=settings)
        return out

    monkeypatch.setattr(build_module, "build", fake_build)
    assert main(["build", "--size-policy", "floor", "--out", str(tmp_path / "a"), "--quiet"]) == 0
    settings = seen["settings"]
    assert settings.size_policy == "floor"
    reference = type("Ref", (), {"processing": settings.processing()})()
    manifest = pisa_manifest(seen["source"], settings, reference, {"pix": 4, "sem": 4})
    assert manifest["processing"]["size_policy"] == "resize_floor"
    assert manifest["model"]["settings"]["size_policy"] == "floor" and "floored" in manifest["description"]
    assert main(["build", "--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert seen["settings"].size_policy == "pad"
    capsys.readouterr()

    assert main(["build", "--model", "s3diff", "--size-policy", "floor", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("srexport: error: --size-policy")
    assert "--model pisa-sr" in err and "drop --size-policy" in err
    assert "Traceback" not in err and not (tmp_path / "s").exists()


def test_demo_artifact_records_the_pad_policy(demo_artifact):
    from srexport.artifact.manifest import load_artifact

    m = load_artifact(demo_artifact).manifest
    assert m["processing"]["size_policy"] == "reflect_pad" and m["processing"]["size_multiple"] == 8
    assert m["model"]["settings"]["size_policy"] == "pad"
    assert "exactly scale x the input" in m["description"]


# --- the artifact against the PyTorch reference, tiled and untiled ------------------------

SMALL_TILES = dict(tile=64, overlap=16, batch=4, vae_tile=64, vae_overlap=16, vae_norm="per-tile", unet_norm="per-tile")


@pytest.fixture(scope="module")
def artifact(demo_artifact):
    from srexport.artifact.manifest import load_artifact

    return load_artifact(demo_artifact)


@pytest.fixture(scope="module")
def runners(artifact):
    """One set of onnxruntime sessions for every pipeline below (sessions are the slow part)."""
    from srexport.runtime.runners import ort_runners

    return ort_runners(artifact)


def _pipeline(runners, manifest, tiling=None):
    from srexport.runtime.pipeline import SRPipeline
    from srexport.runtime.tiling import TilingSettings, tiling_section

    manifest = copy.deepcopy(manifest)
    if tiling is not None:
        manifest["tiling"] = tiling_section(TilingSettings(**tiling))
    return SRPipeline(manifest, runners)


def _old_manifest(manifest: dict) -> dict:
    """The manifest as srexport wrote it before the size policy was a setting."""
    old = copy.deepcopy(manifest)
    old["processing"]["size_policy"] = "resize_floor"
    del old["model"]["settings"]["size_policy"]
    return old


@pytest.mark.parametrize("policy", ["pad", "floor"])
def test_artifact_matches_reference_tiled_and_untiled(artifact, runners, demo_source, policy):
    """fp32 ort vs the PyTorch reference on an odd size (33x41: 132x164 padded to 136x168, or
    floored to 128x160), whole and in 64 px tiles; "floor" runs the demo's graphs under an
    old-style manifest, which must keep flooring."""
    from srexport.models.tiled_reference import TiledReference
    from srexport.runtime.tiling import TilingSettings

    manifest = artifact.manifest if policy == "pad" else _old_manifest(artifact.manifest)
    settings = PisaSettings.from_manifest(manifest["model"]["settings"])
    assert settings.size_policy == policy
    base, ckpt = demo_source.load()
    reference = PisaReference(base, ckpt, settings)
    assert reference.processing.to_dict() == manifest["processing"]
    lr = sample_image()[..., 5:38, 11:52].contiguous()
    expected_size = (132, 164) if policy == "pad" else (128, 160)

    whole = _pipeline(runners, manifest).run_stages(lr, tiled=False).tensors
    expected = reference(lr)
    assert tuple(whole["image"].shape[-2:]) == ((136, 168) if policy == "pad" else (128, 160))
    assert tuple(whole["output"].shape[-2:]) == tuple(expected.shape[-2:]) == expected_size
    assert compare(whole["output"], expected, 1.0).psnr_db >= 50

    tiled_pipeline = _pipeline(runners, manifest, SMALL_TILES)
    assert tiled_pipeline.will_tile(*lr.shape[-2:])
    tiled = tiled_pipeline(lr)
    tiled_expected = TiledReference(reference, TilingSettings(**SMALL_TILES))(lr)
    assert tuple(tiled.shape[-2:]) == tuple(tiled_expected.shape[-2:]) == expected_size
    assert compare(tiled, tiled_expected, 1.0).psnr_db >= 50


def test_pre_resized_odd_input_ends_at_scale_times_the_original(artifact, runners):
    from srexport.runtime.loading import reference_for

    lr = sample_image()[..., 20:43, 3:34].contiguous()  # 23x31: pre-resized to 32x43, padded 128x176
    run = _pipeline(runners, artifact.manifest).run_stages(lr, tiled=False).tensors
    assert tuple(run["image"].shape[-2:]) == (128, 176)
    expected = reference_for(artifact)(lr)
    assert tuple(run["output"].shape[-2:]) == tuple(expected.shape[-2:]) == (92, 124)
    assert compare(run["output"], expected, 1.0).psnr_db >= 50
