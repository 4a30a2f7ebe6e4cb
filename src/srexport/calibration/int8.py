"""int8 graphs with explicit Q/DQ that TensorRT 10/11 build as they are.

Made by onnxruntime's static quantizer (``quantize_static``, QDQ format) with
the settings TensorRT's ONNX parser accepts:

- symmetric int8 everywhere: zero point 0 (``ActivationSymmetric``,
  ``WeightSymmetric``; onnxruntime's default activations are asymmetric
  uint8, which TensorRT rejects);
- weights per channel on the output-channel axis (Conv: 0, MatMul [K, N]: 1,
  Gemm with transB: 0), activations per tensor;
- Q/DQ on the inputs of Conv, MatMul and Gemm only; MatMuls of two
  activations (attention's QK^T and PV) stay in float;
- no bias quantization (``QuantizeBias``: False): an INT32 DequantizeLinear
  bias is not a TensorRT pattern;
- sensitive layers excluded (``sensitive_nodes``): conv_in / conv_out of every
  network and the VAE's quant_conv / post_quant_conv (they touch images and
  latents directly), the time embedding and its per-block projections
  (Gemm), plus whatever a build's measurements add.

The quantized graph is then made **int8 + fp16**: raised to opset 19 (the
first with fp16 Q/DQ scales) and converted by ``fp16.convert_to_fp16``, so
what is not int8 runs in fp16, not fp32, under a strongly typed TensorRT
network. Its inputs and outputs stay float32.

``--target cpu`` makes the int8 graphs onnxruntime's CPU kernels run fast instead (TensorRT
refuses them): u8s8, asymmetric uint8 activations (onnxruntime's own default, the VNNI-friendly
pairing) with symmetric per-channel int8 weights; each quantized layer's output quantized too and
its bias as int32, so onnxruntime fuses DQ -> Conv/MatMul -> Q into QLinearConv / QLinearMatMul
and the int8 tensors flow from layer to layer; fp32, not fp16, between quantized layers (on CPU
fp16 runs through casts). The TensorRT-oriented graphs run on CPU through DequantizeLinear into
fp32 convolutions plus fp16 casts, slower than plain fp32 (measured 0.84x).
"""

from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import onnx
from onnx import numpy_helper

QDQ_OPSET = 19  # fp16 scales on QuantizeLinear/DequantizeLinear
INT8_TARGETS = ("gpu", "cpu")  # srexport build --target: TensorRT (default) or onnxruntime's CPU provider
INT8_SCHEMES = {
    "gpu": "symmetric int8 (zero point 0); weights per channel on the output-channel axis; activations per tensor; "
           "Q/DQ on Conv/MatMul/Gemm inputs; bias in float; the rest in fp16 (TensorRT's explicit quantization)",
    "cpu": "u8s8: asymmetric uint8 activations per tensor, symmetric int8 weights per channel; Q/DQ on the inputs "
           "and outputs of Conv/MatMul/Gemm, int32 bias, so onnxruntime fuses QLinearConv/QLinearMatMul; the rest "
           "in fp32 (onnxruntime's CPU kernels)",
}
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")
# Node-name patterns (torch.onnx scope names) excluded from int8, and why.
SENSITIVE: dict[str, str] = {
    r"(^|/)conv_in/": "first conv: reads the image / latent directly",
    r"(^|/)conv_out/": "last conv: writes the image / noise prediction directly",
    r"(^|/)quant_conv/|(^|/)post_quant_conv/": "VAE latent convs: the latent itself",
    r"(^|/)time_embedding/|(^|/)time_emb_proj/|(^|/)time_proj/": "time embedding (one vector per step)",
    # PiSA-SR adjustable (models/pisa_branches.py): what the per-call coefficients scale
    r"/lora_mix/": "LoRA branch coefficients: per-call inputs, kept exact",
    r"/lora_up/": "LoRA up-projection: its input scales with the per-call coefficients, beyond any calibrated range",
}


class TensorReader:
    """onnxruntime ``CalibrationDataReader`` over captured tensors, one sample per call.

    ``samples``: name -> array of shape (N, ...) (one batch-1 feed per row).
    """

    def __init__(self, samples: dict[str, np.ndarray]):
        self.samples = samples
        self.count = len(next(iter(samples.values())))
        self._it: Iterator | None = None
        self.rewind()

    def rewind(self) -> None:
        self._it = iter(range(self.count))

    def get_next(self) -> dict[str, np.ndarray] | None:
        i = next(self._it, None)
        if i is None:
            return None
        return {name: np.ascontiguousarray(a[i:i + 1], dtype=np.float32) for name, a in self.samples.items()}


def sensitive_nodes(model: onnx.ModelProto, extra_patterns: Iterable[str] = ()) -> dict[str, str]:
    """Conv/MatMul/Gemm nodes kept in float: node name -> reason."""
    patterns = {**SENSITIVE, **{p: "excluded by measurement" for p in extra_patterns}}
    constants = {t.name for t in model.graph.initializer} | {
        o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    out = {}
    for node in model.graph.node:
        if node.op_type not in QUANTIZED_OPS:
            continue
        if node.op_type == "MatMul" and node.input[1] not in constants:
            # onnxruntime's MatMulConstBOnly is honoured in QOperator mode only
            out[node.name] = "MatMul of two activations (attention QK^T, PV)"
            continue
        if node.op_type == "Gemm":
            out[node.name] = "Gemm: time embedding path"
            continue
        for pattern, reason in patterns.items():
            if re.search(pattern, node.name):
                out[node.name] = reason
                break
    return out


def activation_ranges(fp32_path: Path, samples: dict[str, np.ndarray], work: Path,
                      op_types: Iterable[str] | None = QUANTIZED_OPS, method: str = "minmax", cache: Path | None = None):
    """onnxruntime's calibrator over ``samples``, one sample per pass (its own batching
    keeps every intermediate tensor of every sample in memory, and its
    ``CalibMaxIntermediateOutputs`` drops data), as ``TensorsData``; saved to and
    read from ``cache`` (onnxruntime's JSON range cache) when given."""
    from onnxruntime.quantization.calibrate import (CalibrationMethod, create_calibrator, load_tensors_data,
                                                    save_tensors_data)

    if cache is not None and cache.is_file():
        return load_tensors_data(cache)
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    extra = {"symmetric": True} if method == "minmax" else {"symmetric": True, "percentile": 99.999}
    calibrator = create_calibrator(Path(fp32_path), list(op_types) if op_types else None,
                                   augmented_model_path=str(Path(work) / "augmented.onnx"),
                                    calibrate_method=methods[method], use_external_data_format=_large_file(fp32_path),
                                   extra_options=extra if method != "minmax" else {})
    reader = TensorReader(samples)
    for i in range(reader.count):
        calibrator.collect_data(TensorReader({k: v[i:i + 1] for k, v in samples.items()}))
    ranges = calibrator.compute_data()
    del calibrator
    if cache is not None:
        save_tensors_data(ranges, cache)
    return ranges


def _large_file(path: Path) -> bool:
    data = Path(str(path) + ".data")
    return data.exists() and data.stat().st_size > 2**30


def quantize_int8(fp32_path: Path, out_path: Path, ranges_json: Path, exclude: Iterable[str] = (),
                  method: str = "minmax", fp16: bool = True, large: bool = False,
                  keep_fp32: Iterable[str] = (), target: str = "gpu") -> onnx.ModelProto:
    """Quantize ``fp32_path`` with the activation ranges in ``ranges_json`` (``activation_ranges``);
    returns the int8 (+ fp16) model, the nodes named in ``keep_fp32`` staying fp32 as well as
    fp16.FP32_OPS. ``out_path``'s folder holds the temporary files. ``target`` "cpu": the u8s8
    graph for onnxruntime's CPU kernels, fp32 between its int8 layers (module docstring)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as _quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    extra = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
             "DedicatedQDQPair": False, "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
             "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OPS)}
    activation_type = QuantType.QInt8
    if target == "cpu":
        extra = {"ActivationSymmetric": False, "WeightSymmetric": True, "QuantizeBias": True,
                 "DedicatedQDQPair": False, "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}}
        activation_type, fp16 = QuantType.QUInt8, False
    with tempfile.TemporaryDirectory(dir=Path(out_path).parent, prefix=".quant-") as tmp:
        qdq = Path(tmp) / "qdq.onnx"
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)  # its advice to pre-process with shape inference: done at export
        try:
            _quantize_static(str(fp32_path), str(qdq), None, quant_format=QuantFormat.QDQ,
                             op_types_to_quantize=list(QUANTIZED_OPS), per_channel=True, reduce_range=False,
                             activation_type=activation_type, weight_type=QuantType.QInt8,
                             nodes_to_exclude=list(exclude), use_external_data_format=large,
                             calibrate_method=methods[method], extra_options=extra,
                             calibration_cache_path=str(ranges_json))
        finally:
            logging.disable(previous)
        model = onnx.load(str(qdq), load_external_data=True)
    if fp16:
        from .fp16 import convert_to_fp16

        model = raise_opset(model, QDQ_OPSET)
        model = convert_to_fp16(model, list(keep_fp32), large=large)
    return model


# Reductions whose ``axes`` moved from an attribute to an input at opset 18 (ReduceSum: at 13).
_AXES_INPUT_AT_18 = ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
                     "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")


def raise_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """Raise the default-domain opset. The ops our graphs use read the same at 17 and
    19 (the changes in between add optional inputs/attributes with the old
    defaults, and fp16/bf16/fp8 types to Q/DQ), except the reductions whose
    ``axes`` attribute became an input at 18 (the two-pass VAE statistics
    graphs' ReduceMean): those are rewritten. Then the import is raised and the
    result checked, as onnx's version converter would do node by node."""
    from onnx import helper

    current = next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), opset)
    if current < 18 <= opset:
        for k, node in enumerate(model.graph.node):
            axes = [a for a in node.attribute if a.name == "axes"]
            if node.op_type in _AXES_INPUT_AT_18 and axes:
                name = f"{node.name or node.op_type}_axes_{k}"
                model.graph.initializer.append(numpy_helper.from_array(
                    np.asarray(helper.get_attribute_value(axes[0]), dtype=np.int64), name))
                node.attribute.remove(axes[0])
                node.input.append(name)
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and imp.version < opset:
            imp.version = opset
    onnx.checker.check_model(model) if _fits(model) else None
    return model


def _fits(model: onnx.ModelProto) -> bool:
    return sum(len(t.raw_data) for t in model.graph.initializer) < 2**31 - 2**26


# --- structure checks (tests and build) ----------------------------------------


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def qdq_summary(model: onnx.ModelProto, target: str = "gpu") -> dict:
    """What the Q/DQ nodes are: counts, and every rule of the target's scheme as a list of problems
    (empty when the graph is clean). gpu: TensorRT's parser (symmetric int8, no int32 bias). cpu:
    uint8 activations (any zero point), symmetric int8 per-channel weights, int32 biases allowed."""
    values = _constants(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    problems, quantized = [], {op: 0 for op in QUANTIZED_OPS}
    weights_per_channel = weights_per_tensor = activations = 0
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        scale = values.get(node.input[1])
        zero = values.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        source = node.input[0]
        constant = values.get(source)
        if target == "cpu" and constant is not None and constant.dtype == np.int32:
            if zero is not None and np.any(zero != 0):
                problems.append(f"{node.name}: int32 bias with a nonzero zero point")
            continue  # the int32 bias QLinearConv takes
        if target == "cpu" and not (constant is not None and constant.dtype == np.int8):
            if zero is None or zero.dtype != np.uint8:  # an activation: u8 with its own zero point
                problems.append(f"{node.name}: activation zero point is {None if zero is None else zero.dtype}, "
                                "not uint8")
        elif zero is None or zero.dtype != np.int8:
            problems.append(f"{node.name}: zero point is {None if zero is None else zero.dtype}, not int8")
        elif np.any(zero != 0):
            problems.append(f"{node.name}: zero point is not 0 (asymmetric)")
        if scale is None or not np.all(scale > 0):
            problems.append(f"{node.name}: scale is not a positive constant")
        if node.op_type != "DequantizeLinear":
            continue
        is_weight = source in values and values[source].dtype == np.int8
        users = consumers.get(node.output[0], [])
        if is_weight:
            w = values[source]
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            user = users[0] if users else None
            want = _output_channel_axis(user, w.ndim) if user is not None else None
            if scale is not None and scale.size > 1:
                weights_per_channel += 1
                if want is not None and axis % w.ndim != want:
                    problems.append(f"{node.name}: per-channel axis {axis}, output channels are on {want}")
            else:
                weights_per_tensor += 1
                problems.append(f"{node.name}: weight scale is per tensor")
            if users:
                quantized[users[0].op_type] = quantized.get(users[0].op_type, 0) + 1
        else:
            activations += 1
            if scale is not None and scale.size != 1:
                problems.append(f"{node.name}: activation scale is not per tensor")
        if source not in values and source in producers and producers[source].op_type != "QuantizeLinear":
            problems.append(f"{node.name}: dequantizes a computed tensor that no QuantizeLinear made")
    for node in model.graph.node if target == "gpu" else ():
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            for name in node.input[:1]:
                if node.op_type == "DequantizeLinear" and values.get(name) is not None and values[name].dtype == np.int32:
                    problems.append(f"{node.name}: INT32 DequantizeLinear (quantized bias)")
    return {"quantized_layers": quantized, "weights_per_channel": weights_per_channel,
            "weights_per_tensor": weights_per_tensor, "activation_dequantizers": activations,
            "problems": problems}


def _output_channel_axis(node, rank: int) -> int | None:
    if node.op_type == "Conv":
        return 0
    if node.op_type == "MatMul":
        return rank - 1
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return None

