"""Attention fused into com.microsoft.MultiHeadAttention for onnxruntime (export/attention_fusion.py):
the rewrite itself, the twins every build writes, and the runtime's choice between them."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from srexport.artifact.manifest import ORT_GRAPH, load_artifact
from srexport.errors import UserError
from srexport.export import attention_fusion
from srexport.export.attention_fusion import fuse_attention
from srexport.parity import compare
from srexport.runtime.runners import OnnxRuntimeRunner, ort_graph, session_options

FP32_MAX_ABS = 1e-4  # fused vs plain pipeline on the demo (issue 16's bound)
# Tiles small enough that a 24x32 LR (96x128 output) runs as several of each kind.
SMALL_TILES = dict(tile=64, overlap=16, batch=2, vae_tile=64, vae_overlap=16, vae_norm="per-tile", unet_norm="per-tile")


def _attention_graph(heads: int = 2, tokens: int = 48, kv_tokens: int = 48, head_dim: int = 8, mask: bool = False):
    """q/k/v [1, tokens, heads * head_dim] -> the exporter's pattern over [B, H, S, D] -> [1, tokens, C]."""
    c = heads * head_dim
    f = TensorProto.FLOAT
    inits = [onnx.numpy_helper.from_array(np.array([1, -1, heads, head_dim], np.int64), "split"),
             onnx.numpy_helper.from_array(np.array([1, -1, c], np.int64), "merge"),
             onnx.numpy_helper.from_array(np.array(head_dim ** -0.25, np.float32), "root_scale"),
             onnx.numpy_helper.from_array(np.full([1, 1, tokens, kv_tokens], -0.5, np.float32), "bias")]
    nodes = []
    for role in "qkv":
        nodes.append(helper.make_node("Reshape", [role, "split"], [f"{role}4"]))
    nodes += [helper.make_node("Transpose", ["q4"], ["qh"], perm=[0, 2, 1, 3]),
              helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),
              helper.make_node("Transpose", ["v4"], ["vh"], perm=[0, 2, 1, 3]),
              helper.make_node("Mul", ["qh", "root_scale"], ["qs"]),
              helper.make_node("Mul", ["kt", "root_scale"], ["ks"]),
              helper.make_node("MatMul", ["qs", "ks"], ["scores"])]
    if mask:  # an additive bias before the softmax: not the pattern, must be left alone
        nodes.append(helper.make_node("Add", ["scores", "bias"], ["biased"]))
    nodes += [helper.make_node("Softmax", ["biased" if mask else "scores"], ["probs"], axis=-1),
              helper.make_node("MatMul", ["probs", "vh"], ["oh"]),
              helper.make_node("Transpose", ["oh"], ["o4"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["o4", "merge"], ["out"])]
    inputs = [helper.make_tensor_value_info("q", f, [1, tokens, c]),
              helper.make_tensor_value_info("k", f, [1, kv_tokens, c]),
              helper.make_tensor_value_info("v", f, [1, kv_tokens, c])]
    graph = helper.make_graph(nodes, "attention", inputs, [helper.make_tensor_value_info("out", f, [1, tokens, c])],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, feeds):
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


@pytest.mark.parametrize("heads,kv_tokens", [(1, 48), (2, 48), (4, 13)])
def test_fusion_replaces_the_pattern_and_keeps_the_numbers(heads, kv_tokens):
    model = _attention_graph(heads=heads, kv_tokens=kv_tokens)
    fused, facts = fuse_attention(model)
    ops = [n.op_type for n in fused.graph.node]
    assert [f.heads for f in facts] == [heads] and facts[0].kv_tokens == kv_tokens
    assert ops.count("MultiHeadAttention") == 1 and "Softmax" not in ops and ops.count("MatMul") == 0
    onnx.checker.check_model(fused)
    rng = np.random.default_rng(0)
    feeds = {"q": rng.standard_normal((1, 48, heads * 8), dtype=np.float32),
             "k": rng.standard_normal((1, kv_tokens, heads * 8), dtype=np.float32),
             "v": rng.standard_normal((1, kv_tokens, heads * 8), dtype=np.float32)}
    plain, twin = _run(model, feeds), _run(fused, feeds)
    assert np.abs(plain - twin).max() < 1e-5
    # and both are attention: torch's reference on the same tensors
    q, k, v = (torch.from_numpy(feeds[r]).view(1, -1, heads, 8).transpose(1, 2) for r in "qkv")
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, 48, -1)
    assert np.abs(twin - expected.numpy()).max() < 1e-5


def test_fusion_leaves_other_softmaxes_alone():
    model = _attention_graph(mask=True)
    fused, facts = fuse_attention(model)
    assert facts == [] and fused is model


def test_every_build_writes_checked_twins_for_its_attention_graphs(demo_artifact):
    art = load_artifact(demo_artifact)
    record = art.manifest["checks"]["attention_fusion"]
    # SD 2.1's structure: 16 transformer blocks x (self + cross) in the UNet, one mid-block attention per VAE half
    assert {name: r["fused"] for name, r in record.items()} == {"unet": 32, "vae_encoder": 1, "vae_decoder": 1}
    for name, r in record.items():
        assert r["rel_l2"] <= attention_fusion.FUSED_MAX_REL_L2["fp32"] and r["max_abs"] < 1e-4
        twin = onnx.load(str(art.component_file(name, ORT_GRAPH)))
        ops = [n.op_type for n in twin.graph.node]
        assert ops.count("MultiHeadAttention") == r["fused"] and "Softmax" not in ops
        plain_ops = [n.op_type for n in onnx.load(str(art.component_file(name))).graph.node]
        assert plain_ops.count("Softmax") == r["fused"] and "MultiHeadAttention" not in plain_ops
        assert ort_graph(art, name).name == f"{name}.ort.onnx" and ort_graph(art, name, "plain").name == f"{name}.onnx"
    assert ORT_GRAPH not in art.manifest["components"].get("degradation", {}).get("files", {})


def _pipelines(folder):
    import srexport

    return srexport.load(folder, attention="fused"), srexport.load(folder, attention="plain")


@pytest.mark.parametrize("tiled", [False, True])
def test_fused_pipeline_equals_plain_pisa(demo_artifact, retile, small_lr, tiled):
    folder = retile(demo_artifact, **SMALL_TILES) if tiled else demo_artifact
    fused, plain = _pipelines(folder)
    lr = small_lr if tiled else small_lr[..., :16, :16]
    a, b = fused(lr), plain(lr)
    parity = compare(a, b, peak_to_peak=1.0)
    assert a.shape == b.shape and parity.max_abs <= FP32_MAX_ABS, parity.describe()


@pytest.mark.parametrize("tiled", [False, True])
def test_fused_pipeline_equals_plain_s3diff(s3diff_artifact, retile, small_lr, tiled):
    art, _ = s3diff_artifact
    assert {"unet", "vae_encoder", "vae_decoder"} <= set(art.manifest["checks"]["attention_fusion"])
    folder = retile(art.folder, **SMALL_TILES) if tiled else art.folder
    fused, plain = _pipelines(folder)
    lr = small_lr[..., :16, :16]
    a, b = fused(lr), plain(lr)
    parity = compare(a, b, peak_to_peak=1.0)
    assert parity.max_abs <= FP32_MAX_ABS, parity.describe()


def test_artifact_without_twins_runs_its_portable_graphs(demo_artifact, tmp_path):
    """An artifact built before fusion (or with --ort-attention plain) has no onnx_ort entries."""
    folder = tmp_path / "old"
    shutil.copytree(demo_artifact, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    for name, component in manifest["components"].items():
        twin = component["files"].pop(ORT_GRAPH, None)
        if twin:
            manifest["files"].pop(twin)
            (folder / twin).unlink()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    art = load_artifact(folder)
    assert {ort_graph(art, n).name for n in art.components} == {f"{n}.onnx" for n in art.components}
    import srexport

    assert srexport.load(folder)(torch.rand(1, 3, 16, 16)).shape == (1, 3, 64, 64)


def test_twin_failing_its_parity_fails_the_build_in_one_line(demo_artifact, tmp_path, monkeypatch):
    """The parity gate itself, on a copy of a built artifact's folder: a bound nothing meets."""
    from srexport.export.build import CHECK_GEOMETRIES

    folder = tmp_path / "copy"
    shutil.copytree(demo_artifact, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    monkeypatch.setitem(attention_fusion.FUSED_MAX_REL_L2, "fp32", 0.0)
    with pytest.raises(UserError) as e:
        attention_fusion.write_fused_graphs(folder, manifest, CHECK_GEOMETRIES, lambda *a, **k: None)
    message = str(e.value)
    assert "\n" not in message and "fused attention differs" in message and "--ort-attention plain" in message


def test_build_with_a_failing_twin_leaves_nothing(tmp_path, monkeypatch, capsys):
    from srexport.cli import main

    monkeypatch.setitem(attention_fusion.FUSED_MAX_REL_L2, "fp32", 0.0)
    out = tmp_path / "never"
    assert main(["build", "--process-size", "64", "--precision", "fp32", "--vae-norm", "per-tile",
                 "--unet-norm", "per-tile", "--out", str(out), "--quiet"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--ort-attention plain" in err and "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bad_attention_and_arena_names_are_refused(demo_artifact):
    import srexport

    with pytest.raises(UserError, match="--attention 'flash' is not one of fused, plain"):
        srexport.load(demo_artifact, attention="flash")
    import onnxruntime as ort

    with pytest.raises(ValueError, match="arena"):
        session_options(ort, arena="big")


def test_shared_arena_is_onnxruntime_environment_allocator(demo_artifact):
    import onnxruntime as ort

    shared, own, off = (session_options(ort, arena=a) for a in ("shared", "session", "off"))
    assert shared.get_session_config_entry("session.use_env_allocators") == "1" and shared.enable_cpu_mem_arena
    with pytest.raises(RuntimeError, match="does not have configuration"):  # a session's own arena
        own.get_session_config_entry("session.use_env_allocators")
    assert own.enable_cpu_mem_arena
    assert not off.enable_cpu_mem_arena
    art = load_artifact(demo_artifact)
    spec = art.components["vae_decoder"]
    feeds = spec.sample_inputs(spec_geometry(), seed=1)
    a = OnnxRuntimeRunner(ort_graph(art, "vae_decoder"), spec, arena="shared")(feeds)
    b = OnnxRuntimeRunner(ort_graph(art, "vae_decoder"), spec, arena="off")(feeds)
    assert all(torch.equal(a[k], b[k]) for k in a)


def spec_geometry():
    from srexport.artifact.specs import Geometry

    return Geometry(batch=1, height=16, width=16)


def test_cli_runs_either_attention(demo_artifact, tmp_path):
    from PIL import Image

    from srexport.cli import main

    image = tmp_path / "lr.png"
    Image.fromarray((np.random.default_rng(3).random((20, 24, 3)) * 255).astype(np.uint8)).save(image)
    outputs = {}
    for attention in ("fused", "plain"):
        out = tmp_path / f"{attention}.png"
        assert main(["run", str(demo_artifact), str(image), "-o", str(out), "--attention", attention,
                     "--ort-arena", "session"]) == 0
        outputs[attention] = np.asarray(Image.open(out), dtype=np.int16)
    assert outputs["fused"].shape == (80, 96, 3)
    assert np.abs(outputs["fused"] - outputs["plain"]).max() <= 1  # the same image, to 8-bit rounding
