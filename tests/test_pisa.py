"""PiSA-SR: checkpoint format, LoRA maths vs peft, guidance algebra, ONNX parity."""

from __future__ import annotations

import copy

import pytest
import torch

from srexport.models.pisa import BRANCHES, PARTS, branch_deltas, select_lora_modules
from srexport.models.pisa_reference import PisaReference, PisaSettings
from srexport.parity import compare


def test_module_selection_matches_sd21_counts():
    """UPSTREAM.md: 94 + 148 + 16 = 258 modules per branch on SD 2.1."""
    from diffusers import UNet2DConditionModel

    from srexport.models.configs import SD21_UNET

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD21_UNET)
    split = select_lora_modules(unet)
    assert [len(split[p]) for p in PARTS] == [94, 148, 16]
    assert "conv_in" in split["encoder"] and "conv_out" in split["decoder"]


def test_demo_has_sd21_module_structure(demo_source):
    base, ckpt = demo_source.load()
    split = select_lora_modules(base.unet)
    assert [len(split[p]) for p in PARTS] == [94, 148, 16]
    assert ckpt.ranks == {"pix": 4, "sem": 4}
    assert all(float(b.abs().max()) > 0 for k, b in ckpt.state_dict.items() if ".lora_B." in k)


def test_checkpoint_round_trips_exact_upstream_keys(demo_source):
    raw = torch.load(demo_source.checkpoint, map_location="cpu", weights_only=True)
    assert len(raw) == 9
    assert raw["state_dict_unet"]["conv_in.lora_A.default_encoder_pix.weight"].shape == (4, 4, 3, 3)
    assert raw["state_dict_unet"]["conv_in.lora_B.default_encoder_pix.weight"].shape[1:] == (4, 1, 1)


def _peft_merged_unet(base_unet, ckpt, branches):
    """peft's own merge of the checkpoint's adapters (lora_alpha=8 as upstream)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    unet = copy.deepcopy(base_unet)
    adapters = []
    for branch in BRANCHES:
        for part in PARTS:
            name = f"default_{part}_{branch}"
            config = LoraConfig(r=ckpt.ranks[branch], lora_alpha=8, init_lora_weights="gaussian",
                                target_modules=ckpt.modules[branch][part])
            inject_adapter_in_model(config, unet, adapter_name=name)
            if branch in branches:
                adapters.append(name)
    missing, unexpected = unet.load_state_dict(ckpt.state_dict, strict=False)
    assert not unexpected
    for module in unet.modules():
        if isinstance(module, LoraLayer):
            active = [a for a in adapters if a in module.lora_A]
            if active:
                module.merge(adapter_names=active)
    return {name: m.base_layer.weight.detach() for name, m in unet.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("branches", [("pix",), ("pix", "sem")])
def test_lora_merge_matches_peft(demo_source, branches):
    from srexport.models.lora import add_deltas

    base, ckpt = demo_source.load()
    expected = _peft_merged_unet(base.unet, ckpt, branches)
    ours = copy.deepcopy(base.unet)
    for branch in branches:
        add_deltas(ours, branch_deltas(ckpt, base.unet, branch))
    modules = dict(ours.named_modules())
    assert len(expected) == 258  # every LoRA target wrapped once
    worst = max(float((modules[n].weight - w).abs().max()) for n, w in expected.items())
    changed = max(float((modules[n].weight - dict(base.unet.named_modules())[n].weight).abs().max())
                  for n in expected)
    assert changed > 1e-3  # the deltas are not negligible...
    assert worst < 1e-6  # ...and ours equal peft's


def _reference(source, **settings):
    base, ckpt = source.load()
    return PisaReference(base, ckpt, PisaSettings(process_size=128, **settings))


@pytest.mark.parametrize("coefficients,branches", [((1.0, 0.0), ("pix",)), ((1.0, 1.0), ("pix", "sem"))])
def test_branched_layers_equal_peft_merged_weights(demo_source, coefficients, branches):
    """The adjustable UNet at (1, 0) is peft's merge of the pix adapters, at (1, 1) of both."""
    from srexport.models.components import EpsilonDenoiser
    from srexport.models.base import encode_prompt

    base, ckpt = demo_source.load()
    merged = _peft_merged_unet(base.unet, ckpt, branches)
    plain = copy.deepcopy(base.unet)
    for name, weight in merged.items():
        plain.get_submodule(name).weight.data.copy_(weight)
    adjustable = _reference(demo_source, guidance="adjustable").unets["unet"]  # LoRA as branches
    expected = EpsilonDenoiser(plain, encode_prompt(base, ""), 1)
    z = torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = adjustable(z, torch.tensor([coefficients]))
        theirs = expected(z)
    assert float((ours - theirs).abs().max()) < 1e-5
    assert float((ours - adjustable(z, torch.tensor([[1.0, 0.5]]))).abs().max()) > 1e-4  # b matters


@pytest.mark.parametrize("lambda_sem", [0.0, 1.0])
def test_merged_equals_exact_at_lambda_pix_one(demo_source, small_lr, lambda_sem):
    merged = _reference(demo_source, lambda_pix=1.0, lambda_sem=lambda_sem, guidance="merged")
    exact = _reference(demo_source, lambda_pix=1.0, lambda_sem=lambda_sem, guidance="exact")
    z = torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(0))
    assert float((merged.denoise(z) - exact.denoise(z)).abs().max()) < 1e-5
    assert compare(merged(small_lr), exact(small_lr), 1.0).psnr_db > 90


def test_merged_is_first_order_away_from_exact(demo_source):
    """At lambda_pix != 1 merged and exact differ (second order), so the manifest's number matters."""
    merged = _reference(demo_source, lambda_pix=0.5, lambda_sem=1.5, guidance="merged")
    exact = _reference(demo_source, lambda_pix=0.5, lambda_sem=1.5, guidance="exact")
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    assert float((merged.denoise(z) - exact.denoise(z)).abs().max()) > 1e-4


def test_exact_denoise_plan_matches_upstream_formula(demo_source, small_lr):
    """The runtime's affine combination of the two z0 graphs equals
    z - [lp*eps_pix + ls*(eps_sem - eps_pix)] (computed by the reference)."""
    from srexport.export.pisa_recipe import pisa_specs
    from srexport.runtime.pipeline import SRPipeline
    from srexport.runtime.runners import TorchRunner

    settings = dict(lambda_pix=0.7, lambda_sem=1.3, guidance="exact")
    ref = _reference(demo_source, **settings)
    specs = pisa_specs(ref.settings)
    runners = {n: TorchRunner(m, specs[n]) for n, m in ref.components().items()}
    manifest = {"processing": ref.processing.to_dict(), "denoise": ref.settings.denoise_plan()}
    out = SRPipeline(manifest, runners)(small_lr)
    assert compare(out, ref(small_lr), 1.0).max_abs < 1e-5
    z = torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # the plan the reference runs is upstream's formula
        eps_pix, eps_sem = ref.unets["unet_pix"].epsilon(z), ref.unets["unet_sem"].epsilon(z)
        upstream = z - (0.7 * eps_pix + 1.3 * (eps_sem - eps_pix))
        assert float((ref.denoise(z) - upstream).abs().max()) < 1e-5


def test_merged_refuses_lambda_pix_zero():
    from srexport.errors import UserError

    with pytest.raises(UserError, match="--guidance exact"):
        PisaSettings(lambda_pix=0.0, guidance="merged").validate()


# --- ONNX parity -----------------------------------------------------------------


@pytest.fixture(scope="module")
def artifact_and_reference(demo_artifact):
    from srexport.artifact.manifest import load_artifact
    from srexport.runtime.loading import reference_for

    art = load_artifact(demo_artifact)
    return art, reference_for(art)


@pytest.mark.parametrize("geometry", [(1, 64, 64), (2, 96, 160)], ids=["64x64", "2x96x160"])
def test_onnx_components_match_pytorch(artifact_and_reference, geometry):
    from srexport.artifact.specs import Geometry
    from srexport.runtime.runners import OnnxRuntimeRunner, TorchRunner

    art, ref = artifact_and_reference
    g = Geometry(*geometry)
    modules = ref.components()
    assert set(art.components) == {"vae_encoder", "unet", "vae_decoder"}
    for name, spec in art.components.items():
        feeds = spec.sample_inputs(g, seed=7)
        expected = TorchRunner(modules[name], spec)(feeds)
        actual = OnnxRuntimeRunner(art.component_file(name), spec)(feeds)
        for out_name, value in expected.items():
            assert actual[out_name].shape == spec.output_shapes(g)[out_name]
            err = float((actual[out_name] - value).abs().max())
            assert err < 1e-4, f"{name}.{out_name} at {geometry}: max abs {err:.2e}"


def test_onnx_pipeline_matches_reference_end_to_end(artifact_and_reference, small_lr):
    from srexport.runtime.loading import load_pipeline

    art, ref = artifact_and_reference
    pipeline = load_pipeline(art.folder, backend="ort")
    out = pipeline(small_lr)
    assert out.shape == (1, 3, 4 * small_lr.shape[-2], 4 * small_lr.shape[-1])
    assert compare(out, ref(small_lr), 1.0).psnr_db >= 50


def test_torch_backend_equals_reference(artifact_and_reference, small_lr):
    from srexport.runtime.loading import load_pipeline

    art, ref = artifact_and_reference
    out = load_pipeline(art.folder, backend="torch", reference=ref)(small_lr)
    assert compare(out, ref(small_lr), 1.0).max_abs < 1e-6


def test_manifest_is_self_describing(artifact_and_reference):
    from srexport.export.onnx_export import graph_io, opset_of

    art, _ = artifact_and_reference
    m = art.manifest
    assert m["model"]["kind"] == "pisa-sr" and m["model"]["demo"] is True
    assert m["export"]["opset"] == opset_of(art.component_file("unet")) == 17
    assert m["checks"]["end_to_end"]["psnr_db"] >= 50
    assert m["checks"]["merged_vs_exact"]["psnr_db"] > 90
    for key in ("torch", "diffusers", "peft", "onnx"):
        assert m["versions"][key]
    for entry in m["files"].values():
        assert len(entry["sha256"]) == 64
    # graph I/O carries exactly the spec's names and symbolic dims
    for name, spec in art.components.items():
        io = graph_io(art.component_file(name))
        assert io["inputs"] == {t.name: list(t.dims) for t in spec.inputs}
        assert io["outputs"] == {t.name: list(t.dims) for t in spec.outputs}


def test_concurrent_calls_are_safe(artifact_and_reference, small_lr):
    from concurrent.futures import ThreadPoolExecutor

    import srexport

    art, _ = artifact_and_reference
    pipeline = srexport.load(art.folder, backend="ort")
    inputs = [small_lr, small_lr.flip(-1), small_lr.flip(-2)]
    alone = [pipeline(x) for x in inputs]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(pipeline, inputs))
    for a, b in zip(alone, together):
        assert torch.equal(a, b)


def test_exported_graphs_pass_tensorrt_parser_check(artifact_and_reference):
    from srexport.export.trt_support import check_graph

    art, _ = artifact_and_reference
    for name in art.components:
        for major in (10, 11):
            assert check_graph(art.component_file(name), trt_major=major) == [], name
