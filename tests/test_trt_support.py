"""TensorRT checks that run on CPU: the ONNX parser's op matrix, and the Python API names."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from srexport.errors import UserError
from srexport.export import trt_api
from srexport.export.trt_support import (
    OP_SUPPORT,
    check_graph,
    check_graph_or_raise,
    supported_ops,
)

SRC = Path(__file__).resolve().parents[1] / "src" / "srexport"

# Ops a diffusion UNet / VAE / ResNet graph can contain at opsets 17-21.
DIFFUSION_OPS = """Conv ConvTranspose MatMul Gemm Add Mul Sub Div Pow Sqrt Erf Sigmoid Tanh Relu
Softmax Reshape Transpose Concat Split Slice Gather Shape Unsqueeze Squeeze Expand Cast Constant
ConstantOfShape Range Where Equal ReduceMean ReduceSum GroupNormalization InstanceNormalization
LayerNormalization Resize Pad Clip Sin Cos Exp Log Neg GlobalAveragePool Flatten Einsum
QuantizeLinear DequantizeLinear Identity Max Min Not And Or Less Greater Floor Ceil Abs Tile
ScatterND CumSum Gelu""".split()


class TinyBlock(nn.Module):
    """SD-shaped in miniature: conv, GroupNorm+SiLU, timestep embedding, self-attention
    with LayerNorm, GELU, nearest upsampling, transposed conv, pooling."""

    def __init__(self, channels: int = 16):
        super().__init__()
        self.conv_in = nn.Conv2d(4, channels, 3, padding=1)
        self.norm = nn.GroupNorm(4, channels)
        self.time = nn.Linear(8, channels)
        self.ln = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        self.up = nn.ConvTranspose2d(channels, channels, 2, stride=2)
        self.conv_out = nn.Conv2d(channels, 4, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm(self.conv_in(x)))
        freqs = torch.exp(-torch.arange(4, dtype=torch.float32, device=x.device) * 0.7)
        angles = t[:, None].float() * freqs[None]
        emb = torch.cat([angles.sin(), angles.cos()], dim=-1).to(h.dtype)
        h = h + self.time(emb)[:, :, None, None]
        b, c, hh, ww = h.shape
        y = self.ln(h.flatten(2).transpose(1, 2))
        q, k, v = self.qkv(y).chunk(3, dim=-1)
        q, k, v = (z.reshape(b, -1, 2, c // 2).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, c)
        h = h + self.proj(a).transpose(1, 2).reshape(b, c, hh, ww)
        h = F.gelu(h) * torch.sigmoid(F.adaptive_avg_pool2d(h, 1))
        h = F.interpolate(h, scale_factor=2.0, mode="nearest") + self.up(h)
        return self.conv_out(h)


def _export(module: nn.Module, args: tuple, dynamic: bool = True) -> onnx.ModelProto:
    target = io.BytesIO()
    axes = {"x": {0: "batch", 2: "h", 3: "w"}, "t": {0: "batch"}} if dynamic else None
    torch.onnx.export(module, args, target, dynamo=False, opset_version=17,
                      input_names=["x", "t"], output_names=["y"], dynamic_axes=axes)
    return onnx.load_from_string(target.getvalue())


def _model(nodes, inputs, outputs, initializers=(), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


# ---- the op matrix ------------------------------------------------------------------


@pytest.mark.parametrize("major", sorted(OP_SUPPORT))
def test_table_covers_the_diffusion_ops(major):
    missing = [op for op in DIFFUSION_OPS if op not in supported_ops(major)]
    assert not missing


def test_tiny_diffusion_block_passes_in_memory_and_by_path(tmp_path):
    torch.manual_seed(0)
    model = TinyBlock().eval()
    args = (torch.randn(1, 4, 8, 8), torch.tensor([10.0]))
    proto = _export(model, args)
    ops = {n.op_type for n in proto.graph.node}
    assert {"Conv", "ConvTranspose", "InstanceNormalization", "LayerNormalization", "Softmax",
            "Resize", "MatMul", "Erf"} <= ops  # the export really has the interesting ops
    assert check_graph(proto) == []
    assert check_graph(proto, trt_major=11) == []
    path = tmp_path / "tiny.onnx"
    onnx.save(proto, str(path))
    assert check_graph(path) == []
    check_graph_or_raise(path)  # no raise


def test_fp16_export_passes():
    torch.manual_seed(0)
    model = TinyBlock().eval().half()
    try:
        proto = _export(model, (torch.randn(1, 4, 8, 8).half(), torch.tensor([10.0])))
    except RuntimeError as exc:  # a CPU build without half kernels for some op
        pytest.skip(f"fp16 tracing on CPU failed: {exc}")
    assert check_graph(proto) == []


def test_unsupported_ops_are_named_even_inside_subgraphs():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])
    then_graph = helper.make_graph(
        [helper.make_node("Unique", ["x"], ["u"], name="/then/Unique")], "then", [],
        [helper.make_tensor_value_info("u", TensorProto.FLOAT, None)])
    else_graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["v"], name="/else/Identity")], "else", [],
        [helper.make_tensor_value_info("v", TensorProto.FLOAT, [3])])
    model = _model(
        [helper.make_node("If", ["c"], ["y"], name="/If", then_branch=then_graph,
                          else_branch=else_graph),
         helper.make_node("Det", ["m"], ["d"], name="/x/Det")],
        [helper.make_tensor_value_info("c", TensorProto.BOOL, []), x,
         helper.make_tensor_value_info("m", TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("d", TensorProto.FLOAT, [])])
    problems = check_graph(model)
    assert "node '/x/Det' op Det: not supported by TensorRT 10's ONNX parser" in problems
    assert any("'/then/Unique' op Unique" in p for p in problems)
    assert len(problems) == 2
    with pytest.raises(UserError, match="/x/Det"):
        check_graph_or_raise(model)


def test_foreign_domain_and_unknown_ops_are_reported():
    model = _model(
        [helper.make_node("FusedGemm", ["a"], ["b"], name="fused", domain="com.microsoft"),
         helper.make_node("NoSuchOp", ["b"], ["c"], name="nosuch")],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2])])
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    problems = check_graph(model)
    assert any("'fused'" in p and "plugin" in p for p in problems)
    assert any("'nosuch' op NoSuchOp: not supported" in p for p in problems)


def test_double_is_reported_at_the_node_that_makes_it():
    class ToDouble(nn.Module):
        def forward(self, x, t):
            return (x.double() * t.double()).float()

    proto = _export(ToDouble(), (torch.randn(2, 3), torch.tensor([1.0])), dynamic=False)
    problems = check_graph(proto)
    assert any("op Cast: Cast to DOUBLE: dtype DOUBLE not supported" in p for p in problems)
    assert any("op Mul:" in p and "DOUBLE" in p for p in problems)


def test_double_graph_input_and_wrong_dtypes():
    model = _model(
        [helper.make_node("Sqrt", ["x"], ["y"], name="/Sqrt"),
         helper.make_node("Not", ["i"], ["j"], name="/Not")],
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [2]),
         helper.make_tensor_value_info("i", TensorProto.INT32, [2])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [2]),
         helper.make_tensor_value_info("j", TensorProto.INT32, [2])])
    problems = check_graph(model)
    assert any(p.startswith("graph input 'x' is DOUBLE") for p in problems)
    assert any("node '/Sqrt' op Sqrt: input 'x' is DOUBLE" in p for p in problems)
    assert any("node '/Not' op Not: input 'i' is INT32" in p for p in problems)


def test_restrictions_resize_reduce_axes_and_opset():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])
    axes = helper.make_tensor_value_info("axes", TensorProto.INT64, [1])
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    model = _model(
        [helper.make_node("Resize", ["x", "", "scales"], ["r"], name="/Resize", mode="cubic"),
         helper.make_node("ReduceMean", ["r", "axes"], ["m"], name="/ReduceMean")],
        [x, axes], [helper.make_tensor_value_info("m", TensorProto.FLOAT, None)],
        [scales], opset=18)
    problems = check_graph(model)
    assert any("'/Resize'" in p and "cubic" in p for p in problems)
    assert any("'/ReduceMean'" in p and "axes must be an initializer" in p for p in problems)
    old = _model([helper.make_node("Relu", ["x"], ["y"])], [x],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 4])], opset=8)
    assert any("opset 8 is outside" in p for p in check_graph(old))


# ---- Q/DQ (int8 graphs) ----------------------------------------------------------------


def _qdq_model(zero_point, zp_type, weight_scale=(0.1, 0.2, 0.3, 0.4)):
    zp_np = np.int8 if zp_type == TensorProto.INT8 else np.uint8
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(zero_point, zp_np), "x_zp"),
        numpy_helper.from_array(np.ones((4, 3, 3, 3), np.int8), "w_q"),
        numpy_helper.from_array(np.array(weight_scale, np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(len(weight_scale), np.int8), "w_zp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"], name="/x/Q"),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"], name="/x/DQ"),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], name="/w/DQ",
                         axis=0),
        helper.make_node("Conv", ["xd", "w"], ["y"], name="/Conv", pads=[1, 1, 1, 1]),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)


def test_symmetric_int8_qdq_passes():
    assert check_graph(_qdq_model(0, TensorProto.INT8)) == []


def test_asymmetric_or_uint8_qdq_is_reported():
    problems = check_graph(_qdq_model(3, TensorProto.INT8))
    assert any("'/x/Q'" in p and "zero point must be all zeros" in p for p in problems)
    problems = check_graph(_qdq_model(128, TensorProto.UINT8))
    assert any("'/x/Q'" in p and "zero point is UINT8" in p for p in problems)
    assert any("'/x/DQ'" in p and "input 'xq' is UINT8" in p for p in problems)


def test_per_channel_scale_must_match_the_axis():
    problems = check_graph(_qdq_model(0, TensorProto.INT8, weight_scale=(0.1, 0.2, 0.3)))
    assert any("'/w/DQ'" in p and "per-channel scale has 3 values" in p for p in problems)
    problems = check_graph(_qdq_model(0, TensorProto.INT8, weight_scale=(0.1, -0.2, 0.3, 0.4)))
    assert any("'/w/DQ'" in p and "positive" in p for p in problems)


# ---- TensorRT Python API names -----------------------------------------------------------

needs_bindings = pytest.mark.skipif(
    trt_api.bindings_so_path() is None,
    reason=f"{trt_api.BINDINGS_DISTRIBUTION} not installed "
           f"(pip install {trt_api.BINDINGS_DISTRIBUTION}; TensorRT 11.x names)")


@pytest.fixture(scope="module")
def bound():
    return trt_api.bound_names()


@needs_bindings
def test_bound_names_are_the_tensorrt_11_list(bound):
    for name in ("STRONGLY_TYPED", "execute_async_v3", "set_tensor_address",
                 "HardwareCompatibilityLevel", "Builder", "OnnxParser", "Runtime",
                 "NetworkDefinitionCreationFlag", "MemoryPoolType", "Logger"):
        assert name in bound, name
    # removed in TensorRT 11: implicit int8 calibration, weak typing, implicit batch
    for name in ("IInt8EntropyCalibrator2", "IInt8Calibrator", "IInt8MinMaxCalibrator",
                 "EXPLICIT_BATCH", "FP16", "execute_async_v2", "get_binding_index",
                 "build_engine", "max_workspace_size"):
        assert name not in bound, name


@needs_bindings
def test_methods_we_call_are_bound(bound):
    assert [m for m in trt_api.TRT_METHODS_USED if m not in bound] == []


@needs_bindings
def test_every_trt_name_in_srexport_is_bound():
    unbound = trt_api.unbound_names(SRC)
    assert unbound == {}, "\n".join(f"{n}: {', '.join(w)}" for n, w in unbound.items())


def test_names_used_in_reads_chains_aliases_and_from_imports(tmp_path):
    (tmp_path / "m.py").write_text(
        "import tensorrt as T\n"
        "from tensorrt import Runtime\n"
        "def build(trt):\n"
        "    flag = trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED\n"
        "    return T.Builder(trt.Logger(trt.Logger.WARNING)), flag\n")
    used = trt_api.names_used_in(tmp_path)
    assert set(used) == {"NetworkDefinitionCreationFlag", "STRONGLY_TYPED", "Builder", "Logger",
                         "WARNING", "Runtime"}
    assert used["STRONGLY_TYPED"] == [f"{tmp_path / 'm.py'}:4"]
