"""Static check that TensorRT's ONNX parser can read a graph, op by op, on CPU.

TensorRT can't be installed on the development machines, so an op or dtype
that its ONNX parser rejects would otherwise only show up on a GPU box at
engine-build time. ``check_graph`` holds every node of an exported graph
(subgraphs of ``If``/``Loop``/``Scan`` and local functions included) against
the parser's operator support matrix and the restrictions it documents.

Source of the table (facts, re-encoded as data here):
  onnx/onnx-tensorrt, ``docs/operators.md``, the revision headed "TensorRT 10.15
  supports operators in the inclusive range of opset 9 to opset 24" (10.15 GA,
  changelog dated 2026-02-02). The Q/DQ, Cast and DOUBLE rules were read from
  the parser source (``onnxOpImporters.cpp``, ``WeightsContext.cpp``) at tag
  ``release/10.1-GA`` (commit 96e7811), the newest tag in our mirror.
No TensorRT 11 matrix was available; the 11.x release notes only *add* parser
support (``Swish`` in 11.0, ONNX opset 25 in 11.5, ``DFT`` via plugin in 11.2.1),
so the 11 table is the 10.15 one plus ``Swish``, with the 11.0 opset ceiling
kept at 24 (we export at opset 17 anyway).

Facts worth knowing when reading a problem list:
- DOUBLE is not a TensorRT type: the parser demotes DOUBLE weights and inputs
  to FLOAT, clamping to +-FLT_MAX, and no op lists DOUBLE. We report it, since
  the engine would then not compute what onnxruntime checked.
- INT64 is native since TensorRT 10 (no more silent INT64->INT32 narrowing).
- INT8, INT4, FP8 and FP4 are *quantized* types: they exist only between a
  QuantizeLinear and a DequantizeLinear. UINT8 is allowed only as a network
  input or output (and never as a Q/DQ type).
- Q/DQ: the zero point must be all zeros (symmetric quantization) and INT8/FP8/
  INT4 typed; constant scales must be positive with static shape; a scale with
  more than one value is per-channel (1-D, length = the ``axis`` dim) or
  blocked (same rank as the input, one blocked dim).
"""

from __future__ import annotations

import os
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from srexport.errors import UserError

TABLE_SOURCE = (
    "onnx/onnx-tensorrt docs/operators.md (TensorRT 10.15, opset 9-24); "
    "Q/DQ/Cast/DOUBLE rules from onnxOpImporters.cpp at release/10.1-GA (96e7811)"
)

# --------------------------------------------------------------------------------------
# dtype vocabulary: ONNX element types -> the names the support matrix uses.

_DTYPE_NAMES = {
    TensorProto.FLOAT: "FP32",
    TensorProto.FLOAT16: "FP16",
    TensorProto.BFLOAT16: "BF16",
    TensorProto.INT32: "INT32",
    TensorProto.INT64: "INT64",
    TensorProto.INT8: "INT8",
    TensorProto.UINT8: "UINT8",
    TensorProto.BOOL: "BOOL",
    TensorProto.DOUBLE: "DOUBLE",
    TensorProto.FLOAT8E4M3FN: "FP8",  # TensorRT's FP8 is E4M3
}
for _name, _token in (("INT4", "INT4"), ("FLOAT4E2M1", "FP4")):  # newer onnx only
    if hasattr(TensorProto, _name):
        _DTYPE_NAMES[getattr(TensorProto, _name)] = _token

# Types a TensorRT network can hold at all (anything else, e.g. INT16, UINT32,
# STRING, COMPLEX, FLOAT8E5M2, is rejected by the parser).
TRT_TENSOR_TYPES = frozenset({"FP32", "FP16", "BF16", "INT32", "INT64", "BOOL", "UINT8",
                              "INT8", "FP8", "INT4", "FP4"})
QUANTIZED_TYPES = frozenset({"INT8", "FP8", "INT4", "FP4"})


def dtype_name(elem_type: int) -> str:
    """The support matrix's name for an ONNX element type (ONNX's own name if TRT has none)."""
    if elem_type in _DTYPE_NAMES:
        return _DTYPE_NAMES[elem_type]
    try:
        return TensorProto.DataType.Name(elem_type)
    except ValueError:
        return f"type#{elem_type}"


# --------------------------------------------------------------------------------------
# The operator support matrix. Value: supported dtypes of the op's data tensor;
# None: listed as not supported. Ops absent from the dict are not in the matrix.

_F = frozenset({"FP32", "FP16", "BF16"})
_F2 = frozenset({"FP32", "FP16"})
_FI = _F | {"INT32", "INT64"}
_FIB = _FI | {"BOOL"}
_B = frozenset({"BOOL"})
_CONST = _F | {"FP8", "FP4", "INT4", "INT32", "INT64", "BOOL"}
_REDUCE = _FI

_TRT10: dict[str, frozenset[str] | None] = {
    # element-wise arithmetic and comparison
    "Abs": _FI, "Add": _FI, "Sub": _FI, "Mul": _FI, "Div": _FI, "Mod": _FI, "Pow": _FI,
    "Neg": _FI, "Sign": _FI, "Max": _FI, "Min": _FI, "Sum": _FI,
    "Mean": _FI | {"FP8"},
    "Equal": _FI, "Greater": _FI, "GreaterOrEqual": _FI, "Less": _FI, "LessOrEqual": _FI,
    "And": _B, "Or": _B, "Xor": _B, "Not": _B,
    "BitShift": None, "BitwiseAnd": None, "BitwiseNot": None, "BitwiseOr": None,
    "BitwiseXor": None,
    # element-wise float math and activations
    "Acos": _F, "Acosh": _F, "Asin": _F, "Asinh": _F, "Atan": _F, "Atanh": _F,
    "Cos": _F, "Cosh": _F, "Sin": _F, "Sinh": _F, "Tan": _F, "Tanh": _F,
    "Ceil": _F, "Floor": _F, "Round": _F, "Erf": _F, "Exp": _F, "Log": _F, "Sqrt": _F,
    "Reciprocal": _F, "IsInf": _F, "IsNaN": _FI,
    "Sigmoid": _F, "HardSigmoid": _F, "HardSwish": _F, "Relu": _FI, "LeakyRelu": _F,
    "PRelu": _F, "Elu": _F, "Selu": _F, "Celu": _F, "ThresholdedRelu": _F, "Softplus": _F,
    "Softsign": _F, "ParametricSoftplus": _F, "ScaledTanh": _F, "Mish": _F2,
    "Gelu": _FI | {"INT8"}, "Clip": _F, "Shrink": _FI,
    "Softmax": _F, "LogSoftmax": _F, "Hardmax": _F,
    # linear algebra, convolution, pooling
    "MatMul": _F, "Gemm": _F, "Einsum": _F, "MatMulInteger": None, "QLinearMatMul": None,
    "Conv": _F, "ConvTranspose": _F, "ConvInteger": None, "QLinearConv": None,
    "DeformConv": _F2,
    "AveragePool": _F, "MaxPool": _F, "LpPool": _F, "GlobalAveragePool": _F,
    "GlobalMaxPool": _F, "GlobalLpPool": _F, "MaxRoiPool": None, "MaxUnpool": None,
    "RoiAlign": _F2, "Col2Im": None,
    # normalisation
    "BatchNormalization": _F, "InstanceNormalization": _F, "GroupNormalization": _F,
    "LayerNormalization": _F, "RMSNormalization": _F, "LpNormalization": _F, "LRN": _F,
    "MeanVarianceNormalization": _F,
    # reductions (axes, an input since opset 18, must be an initializer)
    "ReduceL1": _REDUCE, "ReduceL2": _REDUCE, "ReduceLogSum": _REDUCE,
    "ReduceLogSumExp": _REDUCE, "ReduceMax": _REDUCE, "ReduceMean": _REDUCE,
    "ReduceMin": _REDUCE, "ReduceProd": _REDUCE, "ReduceSum": _REDUCE,
    "ReduceSumSquare": _REDUCE, "ArgMax": _FI, "ArgMin": _FI, "CumSum": _F, "TopK": _FI,
    # shape and data movement
    "Reshape": _FIB, "Transpose": _FIB, "Concat": _FIB, "Split": _FIB, "Slice": _FIB,
    "Squeeze": _FIB, "Unsqueeze": _FIB, "Flatten": _FIB, "Expand": _FIB, "Tile": _FIB,
    "Gather": _FIB, "GatherElements": _FIB, "GatherND": _FIB, "Shape": _FIB, "Size": _FIB,
    "Identity": _FIB, "Where": _FIB, "Trilu": _FIB, "EyeLike": _FIB, "OneHot": _FIB,
    "ReverseSequence": _FIB, "Pad": _FI, "DepthToSpace": _FI, "SpaceToDepth": _FI,
    "Scatter": _FI, "ScatterElements": _FI, "ScatterND": _FI,
    "TensorScatter": _F | {"INT32"},
    "Resize": _F, "Upsample": _F, "GridSample": _F2, "AffineGrid": None,
    "CenterCropPad": None, "Compress": None, "NonZero": _F2, "Unique": None,
    "Range": _FI, "Cast": _FI | {"UINT8", "BOOL"}, "CastLike": _FI | {"UINT8", "BOOL"},
    "Constant": _CONST, "ConstantOfShape": _CONST, "Dropout": _F,
    # quantization
    "QuantizeLinear": _F, "DequantizeLinear": frozenset({"INT8", "FP8", "FP4", "INT4"}),
    "DynamicQuantizeLinear": None,
    # control flow (types are those of the outputs)
    "If": _FIB, "Loop": _FIB, "Scan": _F,
    # sequence, optional, string and other unsupported families
    "ConcatFromSequence": None, "SequenceAt": None, "SequenceConstruct": None,
    "SequenceEmpty": None, "SequenceErase": None, "SequenceInsert": None,
    "SequenceLength": None, "SequenceMap": None, "SplitToSequence": None,
    "Optional": None, "OptionalGetElement": None, "OptionalHasElement": None,
    "StringConcat": None, "StringNormalizer": None, "StringSplit": None,
    "RegexFullMatch": None, "TfIdfVectorizer": None, "ImageDecoder": None,
    "Det": None, "Multinomial": None, "Bernoulli": None,
    "NegativeLogLikelihoodLoss": None, "SoftmaxCrossEntropyLoss": None,
    "MelWeightMatrix": None, "DFT": None,
    # the rest of the matrix
    "RandomNormal": _F, "RandomNormalLike": _F, "RandomUniform": _F,
    "RandomUniformLike": _F, "BlackmanWindow": _F2, "HammingWindow": _F2,
    "HannWindow": _F2, "STFT": frozenset({"FP32"}), "NonMaxSuppression": _F2,
    "GRU": _F, "LSTM": _F, "RNN": _F, "ImageScaler": _F, "RotaryEmbedding": _F,
    "Attention": _F | {"INT8", "FP8"},
}

_TRT11 = dict(_TRT10)
_TRT11["Swish"] = _F  # added to the parser in TensorRT 11.0 (release notes)

OP_SUPPORT: dict[int, dict[str, frozenset[str] | None]] = {10: _TRT10, 11: _TRT11}
OPSET_RANGE: dict[int, tuple[int, int]] = {10: (9, 24), 11: (9, 24)}

# Which inputs carry the dtype the matrix lists (default: input 0).
_TYPED_INPUTS = {"Where": (1, 2)}
# Ops whose listed types are those of their outputs.
_TYPED_BY_OUTPUT = frozenset({"If", "Loop", "Scan", "Constant", "ConstantOfShape",
                              "RandomNormal", "RandomUniform", "EyeLike"})
# Inputs that must be constant weights (initializer or Constant node output).
_WEIGHT_INPUTS = {op: {1: "axes"} for op in (
    "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
    "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare")}
_WEIGHT_INPUTS["Dropout"] = {2: "training_mode"}
# Inputs that must be resolvable to a build-time constant (foldable from constants).
_CONSTANT_INPUTS = {"Squeeze": {1: "axes"}, "Unsqueeze": {1: "axes"}, "CumSum": {1: "axis"},
                    "OneHot": {1: "depth"}}

_RESIZE_COORD_MODES = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn",
                       "asymmetric", "align_corners"}
_RESIZE_MODES = {"nearest", "linear"}
_RESIZE_NEAREST_MODES = {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}
_RANDOM_OPS = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform",
                         "RandomUniformLike", "Multinomial", "Bernoulli"})


# --------------------------------------------------------------------------------------
# Graph walking.


class _Scope:
    """What is known about tensor names: dtypes, constant values, producers, consumers."""

    def __init__(self, model: onnx.ModelProto, base_dir: Path | None):
        self.base_dir = base_dir
        self.dtypes: dict[str, int] = {}
        self.shapes: dict[str, list] = {}  # dims: int, or the symbol's name
        self.initializers: dict[str, TensorProto] = {}
        self.constant_nodes: dict[str, onnx.NodeProto] = {}
        self.producers: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
        self._foldable: dict[str, bool] = {}
        for graph in _all_graphs(model):
            self._index(graph)
        for fn in model.functions:
            for node in fn.node:
                self._index_node(node)

    def _index(self, graph: onnx.GraphProto) -> None:
        for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
            if not vi.type.HasField("tensor_type"):
                continue
            tt = vi.type.tensor_type
            if tt.elem_type:
                self.dtypes[vi.name] = tt.elem_type
            if tt.HasField("shape"):
                self.shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else d.dim_param
                                        for d in tt.shape.dim]
        for init in graph.initializer:
            self.initializers[init.name] = init
            self.dtypes[init.name] = init.data_type
            self.shapes[init.name] = list(init.dims)
        for node in graph.node:
            self._index_node(node)

    def _index_node(self, node: onnx.NodeProto) -> None:
        for out in node.output:
            if out:
                self.producers[out] = node
        for i, name in enumerate(node.input):
            if name:
                self.consumers[name].append((node, i))
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
            self.constant_nodes[node.output[0]] = node
            value = _constant_value_proto(node)
            if value is not None:
                self.dtypes.setdefault(node.output[0], value.data_type)

    def is_weights(self, name: str) -> bool:
        """An initializer or Constant output: what the parser imports as weights."""
        return name in self.initializers or name in self.constant_nodes

    def is_foldable(self, name: str) -> bool:
        """Resolvable to a build-time constant: weights, or computed only from weights."""
        if name in self._foldable:
            return self._foldable[name]
        self._foldable[name] = False  # cycle guard
        if self.is_weights(name):
            result = True
        else:
            node = self.producers.get(name)
            result = (node is not None and node.op_type not in _RANDOM_OPS
                      and not any(a.type in (onnx.AttributeProto.GRAPH,
                                             onnx.AttributeProto.GRAPHS)
                                  for a in node.attribute)
                      and all(self.is_foldable(i) for i in node.input if i))
        self._foldable[name] = result
        return result

    def value(self, name: str) -> np.ndarray | None:
        """The constant value of a weights tensor (through Identity), or None."""
        seen = 0
        while name in self.producers and self.producers[name].op_type == "Identity" and seen < 8:
            name, seen = self.producers[name].input[0], seen + 1
        proto = self.initializers.get(name)
        if proto is None and name in self.constant_nodes:
            proto = _constant_value_proto(self.constant_nodes[name])
        if proto is None:
            return None
        try:
            if proto.data_location == TensorProto.EXTERNAL:
                if self.base_dir is None:
                    return None
                from onnx.external_data_helper import load_external_data_for_tensor

                proto = TensorProto.FromString(proto.SerializeToString())
                load_external_data_for_tensor(proto, str(self.base_dir))
            return numpy_helper.to_array(proto)
        except Exception:  # a dtype numpy_helper can't read (int4, fp4...) or unreadable data
            return None


def _constant_value_proto(node: onnx.NodeProto) -> TensorProto | None:
    for attr in node.attribute:
        if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
            return attr.t
    for attr in node.attribute:  # value_float(s) / value_int(s) as tensors
        if attr.name in ("value_float", "value_floats"):
            return numpy_helper.from_array(np.asarray(
                attr.f if attr.name == "value_float" else list(attr.floats), np.float32))
        if attr.name in ("value_int", "value_ints"):
            return numpy_helper.from_array(np.asarray(
                attr.i if attr.name == "value_int" else list(attr.ints), np.int64))
    return None


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _all_graphs(model: onnx.ModelProto) -> Iterator[onnx.GraphProto]:
    """The main graph, then every subgraph (If/Loop/Scan bodies, also inside functions)."""
    stack = [model.graph]
    for fn in model.functions:
        for node in fn.node:
            stack.extend(_subgraphs(node))
    while stack:
        graph = stack.pop(0)
        yield graph
        for node in graph.node:
            stack.extend(_subgraphs(node))


def _all_nodes(model: onnx.ModelProto) -> Iterator[tuple[onnx.NodeProto, bool]]:
    """Every node, with True where it sits in a local function (dtypes unknown there)."""
    for graph in _all_graphs(model):
        for node in graph.node:
            yield node, False
    for fn in model.functions:
        for node in fn.node:
            yield node, True


def _attr(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            value = onnx.helper.get_attribute_value(attr)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _label(node: onnx.NodeProto, index: int) -> str:
    name = node.name or (f"<unnamed #{index}, output {node.output[0]}>" if node.output
                         else f"<unnamed #{index}>")
    return f"node '{name}' op {node.op_type}"


# --------------------------------------------------------------------------------------
# Checks.


def _load(model_or_path) -> tuple[onnx.ModelProto, Path | None, list[str]]:
    """The model with inferred types; shape inference by path for big models."""
    problems: list[str] = []
    if isinstance(model_or_path, onnx.ModelProto):
        try:
            model = onnx.shape_inference.infer_shapes(model_or_path)
        except Exception as exc:
            model = model_or_path
            problems.append(f"shape inference failed ({' '.join(str(exc).split())[:200]}); "
                            "dtypes unchecked where unknown")
        return model, None, problems
    path = Path(model_or_path)
    if not path.is_file():
        raise UserError(f"ONNX graph not found: {path}")
    with tempfile.TemporaryDirectory() as tmp:
        inferred = os.path.join(tmp, "inferred.onnx")
        try:
            onnx.shape_inference.infer_shapes_path(str(path), inferred)
            model = onnx.load(inferred, load_external_data=False)
        except Exception as exc:
            problems.append(f"shape inference failed ({' '.join(str(exc).split())[:200]}); "
                            "dtypes unchecked where unknown")
            model = onnx.load(str(path), load_external_data=False)
    return model, path.parent, problems


def _check_node(node: onnx.NodeProto, index: int, scope: _Scope, table, trt_major: int,
                in_function: bool) -> list[str]:
    op = node.op_type
    label = _label(node, index)
    if node.domain not in ("", "ai.onnx"):
        return [f"{label}: domain '{node.domain}' is not ONNX's; TensorRT needs a plugin "
                f"registered under this name"]
    if op not in table:
        return [f"{label}: not supported by TensorRT {trt_major}'s ONNX parser (not in its "
                f"operator support matrix)"]
    supported = table[op]
    if supported is None:
        return [f"{label}: not supported by TensorRT {trt_major}'s ONNX parser"]

    problems: list[str] = []

    def dtype_problem(tensor: str, what: str) -> None:
        if in_function or tensor not in scope.dtypes:
            return
        name = dtype_name(scope.dtypes[tensor])
        if name not in supported and not _quantized_constant_ok(node, name, scope):
            problems.append(f"{label}: {what} '{tensor}' is {name}; TensorRT supports "
                            f"{', '.join(sorted(supported))} here"
                            + (" (it demotes DOUBLE to FLOAT)" if name == "DOUBLE" else ""))

    if op in _TYPED_BY_OUTPUT:
        for out in node.output[:1]:
            if out:
                dtype_problem(out, "output")
    else:
        for i in _TYPED_INPUTS.get(op, (0,)):
            if i < len(node.input) and node.input[i]:
                dtype_problem(node.input[i], "input")
    if op == "Cast":
        to = _attr(node, "to")
        if to is not None and dtype_name(to) not in supported:
            problems.append(f"{label}: Cast to {dtype_name(to)}: dtype {dtype_name(to)} not "
                            f"supported (TensorRT casts to {', '.join(sorted(supported))})")

    for i, what in _WEIGHT_INPUTS.get(op, {}).items():
        if i < len(node.input) and node.input[i] and not scope.is_weights(node.input[i]):
            problems.append(f"{label}: input {what} must be an initializer or Constant")
    for i, what in _CONSTANT_INPUTS.get(op, {}).items():
        if i < len(node.input) and node.input[i] and not scope.is_foldable(node.input[i]):
            problems.append(f"{label}: input {what} must be a build-time constant")
    problems.extend(_op_restrictions(node, label, scope))
    return problems


def _quantized_constant_ok(node: onnx.NodeProto, dtype: str, scope: _Scope) -> bool:
    """An INT8/UINT8 Constant that only feeds Q/DQ (data or zero point) is imported as weights."""
    if node.op_type != "Constant" or dtype not in ("INT8", "UINT8"):
        return False
    users = scope.consumers.get(node.output[0], [])
    return bool(users) and all(u.op_type in ("QuantizeLinear", "DequantizeLinear")
                               for u, _ in users)


def _op_restrictions(node: onnx.NodeProto, label: str, scope: _Scope) -> list[str]:
    op, problems = node.op_type, []
    if op == "Resize":
        mode = _attr(node, "mode", "nearest")
        coord = _attr(node, "coordinate_transformation_mode", "half_pixel")
        nearest = _attr(node, "nearest_mode", "round_prefer_floor")
        if mode not in _RESIZE_MODES:
            problems.append(f"{label}: Resize mode '{mode}' not supported (nearest, linear)")
        if coord not in _RESIZE_COORD_MODES:
            problems.append(f"{label}: coordinate_transformation_mode '{coord}' not supported")
        if mode == "nearest" and nearest not in _RESIZE_NEAREST_MODES:
            problems.append(f"{label}: nearest_mode '{nearest}' not supported")
        if _attr(node, "antialias", 0):
            problems.append(f"{label}: antialiasing not supported")
        if _attr(node, "keep_aspect_ratio_policy", "stretch") != "stretch":
            problems.append(f"{label}: keep_aspect_ratio_policy must be 'stretch'")
    elif op in ("AveragePool", "MaxPool", "LpPool"):
        kernel = _attr(node, "kernel_shape", [])
        if len(kernel) not in (2, 3) and op != "LpPool":
            problems.append(f"{label}: only 2D or 3D pooling is supported")
        if any(d != 1 for d in _attr(node, "dilations", []) or []):
            problems.append(f"{label}: dilations must be empty or all ones")
        if op == "MaxPool" and len(node.output) > 1 and node.output[1]:
            problems.append(f"{label}: the Indices output is not supported")
    elif op == "LayerNormalization":
        if any(node.output[1:]):
            problems.append(f"{label}: only the first output Y is supported")
    elif op == "ScatterND":
        if _attr(node, "reduction", "none") != "none":
            problems.append(f"{label}: reduction other than 'none' not supported")
    elif op == "TopK":
        if _attr(node, "sorted", 1) != 1:
            problems.append(f"{label}: sorted must be 1")
    elif op == "Constant":
        if any(a.name in ("sparse_value", "value_string", "value_strings")
               for a in node.attribute):
            problems.append(f"{label}: sparse and string values are not supported")
    elif op == "Dropout":
        if len(node.input) > 2 and node.input[2]:
            training = scope.value(node.input[2])
            if training is not None and bool(np.asarray(training).any()):
                problems.append(f"{label}: training_mode must be False")
    elif op in ("QuantizeLinear", "DequantizeLinear"):
        problems.extend(_qdq_restrictions(node, label, scope))
    return problems


def _qdq_restrictions(node: onnx.NodeProto, label: str, scope: _Scope) -> list[str]:
    problems = []
    if len(node.input) < 2 or not node.input[1]:
        return [f"{label}: TensorRT needs the scale input"]
    scale_name = node.input[1]
    if not scope.is_foldable(scale_name):
        problems.append(f"{label}: scale '{scale_name}' must be a constant")
    scale = scope.value(scale_name)
    if scale is not None:
        if scale.size == 0:
            problems.append(f"{label}: scale has no values")
        elif not np.all(scale.astype(np.float64) > 0):
            problems.append(f"{label}: scale values must all be positive")

    zero_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if zero_name is not None:
        zp_type = scope.dtypes.get(zero_name)
        if zp_type is not None and dtype_name(zp_type) not in ("INT8", "FP8", "INT4"):
            problems.append(f"{label}: zero point is {dtype_name(zp_type)}; TensorRT "
                            f"quantizes only to INT8, FP8 or INT4")
        zero = scope.value(zero_name)
        if zero is not None and np.any(zero.astype(np.float64) != 0):
            problems.append(f"{label}: zero point must be all zeros (TensorRT quantization "
                            f"is symmetric)")
        if zero is not None and scale is not None and zero.size != scale.size:
            problems.append(f"{label}: scale and zero point sizes differ "
                            f"({scale.size} vs {zero.size})")
    if scale is not None and scale.size > 1:
        data_shape = _shape_of(node.input[0], scope)
        rank = len(data_shape) if data_shape is not None else None
        axis = _attr(node, "axis", 1)
        if rank is not None and axis < 0:
            axis += rank
        if scale.ndim == 1:
            if data_shape is not None and 0 <= axis < rank:
                dim = data_shape[axis]
                if isinstance(dim, int) and dim != scale.size:
                    problems.append(f"{label}: per-channel scale has {scale.size} values but "
                                    f"axis {axis} has {dim}")
        elif rank is not None and scale.ndim != rank:
            problems.append(f"{label}: scale rank {scale.ndim} is neither 1 (per-channel) nor "
                            f"the input rank {rank} (blocked)")
    return problems


def _shape_of(name: str, scope: _Scope) -> list | None:
    value = scope.value(name)
    if value is not None:
        return list(value.shape)
    return scope.shapes.get(name)


def _graph_io_problems(model: onnx.ModelProto, scope: _Scope) -> list[str]:
    """Tensors the parser can't hold at all (DOUBLE is demoted, others rejected)."""
    problems = []
    graph = model.graph
    for kind, items in (("input", graph.input), ("output", graph.output)):
        for vi in items:
            if vi.name in scope.initializers:
                continue
            name = dtype_name(vi.type.tensor_type.elem_type) if vi.type.HasField(
                "tensor_type") else "non-tensor"
            if name == "DOUBLE":
                problems.append(f"graph {kind} '{vi.name}' is DOUBLE: TensorRT demotes it to "
                                f"FLOAT; export float32")
            elif name not in TRT_TENSOR_TYPES or name in QUANTIZED_TYPES:
                problems.append(f"graph {kind} '{vi.name}' is {name}: not a TensorRT "
                                f"network I/O type")
    for g in _all_graphs(model):
        for init in g.initializer:
            name = dtype_name(init.data_type)
            if name == "DOUBLE":
                problems.append(f"initializer '{init.name}' is DOUBLE: TensorRT demotes it to "
                                f"FLOAT, clamping to +-FLT_MAX")
            elif name not in TRT_TENSOR_TYPES:
                problems.append(f"initializer '{init.name}' is {name}: not a TensorRT type")
    return problems


def check_graph(model_or_path, trt_major: int = 10) -> list[str]:
    """Every reason TensorRT ``trt_major``'s ONNX parser would reject this graph, one line each.

    ``model_or_path``: an ``onnx.ModelProto`` or a path to a .onnx file (shape
    inference then runs by path, so graphs over 2 GB with external data work).
    An empty list means every op, dtype and documented restriction checked out.
    """
    if trt_major not in OP_SUPPORT:
        raise ValueError(f"no TensorRT operator table for major version {trt_major}; "
                         f"known: {sorted(OP_SUPPORT)}")
    table = OP_SUPPORT[trt_major]
    model, base_dir, problems = _load(model_or_path)
    scope = _Scope(model, base_dir)

    lo, hi = OPSET_RANGE[trt_major]
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and not lo <= imp.version <= hi:
            problems.append(f"model opset {imp.version} is outside TensorRT {trt_major}'s "
                            f"supported range {lo}-{hi}")
    problems.extend(_graph_io_problems(model, scope))
    for index, (node, in_function) in enumerate(_all_nodes(model)):
        problems.extend(_check_node(node, index, scope, table, trt_major, in_function))
    return list(dict.fromkeys(problems))  # de-duplicate, keep order


def check_graph_or_raise(model_or_path, trt_major: int = 10, *, show: int = 5) -> None:
    """``check_graph``, raising ``UserError`` with the first ``show`` problems joined."""
    problems = check_graph(model_or_path, trt_major)
    if not problems:
        return
    where = "" if isinstance(model_or_path, onnx.ModelProto) else f"{model_or_path}: "
    more = f" (+{len(problems) - show} more)" if len(problems) > show else ""
    raise UserError(f"{where}{len(problems)} problem(s) for TensorRT {trt_major}'s ONNX parser: "
                    + "; ".join(problems[:show]) + more)


def supported_ops(trt_major: int = 10) -> frozenset[str]:
    """Ops the parser imports natively (the matrix's 'Y' rows)."""
    return frozenset(op for op, types in OP_SUPPORT[trt_major].items() if types is not None)


__all__ = ["check_graph", "check_graph_or_raise", "supported_ops", "dtype_name",
           "OP_SUPPORT", "OPSET_RANGE", "TABLE_SOURCE"]
