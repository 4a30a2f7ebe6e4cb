"""fp16 graphs that a strongly typed TensorRT network builds as they are.

TensorRT 10/11 take each layer's precision from the ONNX types, so the fp16
graph is made here, once, and is the same file onnxruntime checks. The
conversion is onnxconverter-common's ``convert_float_to_float16`` (weights and
tensors to FLOAT16, Casts at the borders of what stays FLOAT), with:

- **float32 inputs and outputs** (``keep_io_types``): a service feeds and reads
  float32 whatever the precision; the first and last Casts are in the graph.
- **kept in fp32**: normalisations (GroupNorm is exported as
  Reshape+InstanceNormalization, LayerNormalization): their mean/variance sums
  overflow or lose all precision in fp16; attention Softmax (its exp and sum);
  Resize (onnxruntime's CPU Resize has no fp16 kernel, and nearest-neighbour
  upsampling is exact in either type), and any node that the fp32 graph's
  measured activations show near fp16's range (``overflow_nodes``): SD's VAE
  decoder is the classic place.
- repairs of the converter's output: it duplicates value_info entries that
  the exporter's shape inference already wrote (then it types a tensor twice),
  and it leaves ``Cast(to=FLOAT)`` nodes of shape arithmetic (attention's
  1/sqrt(head_dim)) casting to FLOAT while their consumers became FLOAT16;
  a graph output made by a node kept in fp32 comes out FLOAT16 despite
  ``keep_io_types``; and an initializer shared by a kept and a converted node
  is typed for one of them only (so kept nodes get their own copies first).

``emulate_fp16`` makes the fp32 twin of an fp16 graph that rounds every fp16
tensor to fp16 after the node that makes it. onnxruntime's CPU provider has no
fp16 kernel for Conv, MatMul and most others and runs such nodes in fp32 with
Casts at the borders of whole fp16 regions, so inside a region nothing is
rounded and it under-states the error; the twin rounds exactly where a GPU's
fp16 kernels (fp32 accumulation, fp16 storage) round.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..runtime.runners import session_options

FP16_MAX = 65504.0
# Op types computed in fp32 inside fp16 graphs, and why (recorded in the manifest).
FP32_OPS: dict[str, str] = {
    "InstanceNormalization": "GroupNorm's mean/variance: sums of squares overflow fp16",
    "GroupNormalization": "mean/variance sums overflow fp16",
    "LayerNormalization": "mean/variance sums overflow fp16",
    "Softmax": "attention softmax: exp and its sum overflow fp16",
    "Resize": "onnxruntime CPU has no fp16 Resize; nearest upsampling is exact in fp32",
    # onnxconverter-common's defaults that can occur in exported graphs
    "Range": "index arithmetic", "CumSum": "index arithmetic", "TopK": "index arithmetic",
    "Upsample": "as Resize", "Min": "converter default", "Max": "converter default",
}
# An fp32 activation whose magnitude exceeds this is kept in fp32 (headroom for
# inputs the calibration set did not show).
OVERFLOW_FRACTION = 0.25


def dedupe_value_info(model: onnx.ModelProto) -> None:
    seen, keep = set(), []
    for v in model.graph.value_info:
        if v.name not in seen:
            seen.add(v.name)
            keep.append(v)
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)


def overflow_nodes(model: onnx.ModelProto, peaks: dict[str, float],
                   limit: float = FP16_MAX * OVERFLOW_FRACTION) -> list[str]:
    """Nodes with an output whose measured fp32 magnitude (``activation_peaks``) reaches ``limit``."""
    return [node.name for node in model.graph.node if any(peaks.get(o, 0.0) >= limit for o in node.output)]


def activation_peaks(fp32_path, samples: dict[str, np.ndarray], cache=None) -> dict[str, float]:
    """max |x| of every float tensor of an fp32 graph over the calibration inputs.

    The graph gets one ReduceMax(Abs(x)) output per tensor (a scalar each, so a
    sample's cost is one forward pass), and runs one sample at a time."""
    import json
    from pathlib import Path

    import onnxruntime as ort

    if cache is not None and Path(cache).is_file():
        return json.loads(Path(cache).read_text())
    fp32_path = Path(fp32_path)
    model = onnx.load(str(fp32_path), load_external_data=False)
    types = _value_types(onnx.shape_inference.infer_shapes(model) if _small(model) else model)
    names = [o for n in model.graph.node for o in n.output if types.get(o) == TensorProto.FLOAT]
    names += [i.name for i in model.graph.input if i.type.tensor_type.elem_type == TensorProto.FLOAT]
    for k, name in enumerate(names):
        model.graph.node.extend([
            helper.make_node("Abs", [name], [f"__peak{k}_abs"], name=f"__peak{k}_abs"),
            helper.make_node("ReduceMax", [f"__peak{k}_abs"], [f"__peak{k}"], name=f"__peak{k}", keepdims=0)])
        model.graph.output.append(helper.make_tensor_value_info(f"__peak{k}", TensorProto.FLOAT, []))
    augmented = fp32_path.with_name(f".peaks-{fp32_path.name}")  # beside it: external data resolves
    onnx.save_model(model, str(augmented))
    del model
    try:
        session = ort.InferenceSession(str(augmented), session_options(ort, optimization="ORT_ENABLE_BASIC"),
                                       providers=["CPUExecutionProvider"])
        wanted = [f"__peak{k}" for k in range(len(names))]
        peaks = np.zeros(len(names))
        count = len(next(iter(samples.values())))
        for i in range(count):
            feeds = {k: np.ascontiguousarray(v[i:i + 1], dtype=np.float32) for k, v in samples.items()}
            peaks = np.maximum(peaks, np.asarray(session.run(wanted, feeds), dtype=np.float64))
    finally:
        augmented.unlink(missing_ok=True)
    out = {name: float(p) for name, p in zip(names, peaks)}
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        Path(cache).write_text(json.dumps(out))
    return out


def _small(model: onnx.ModelProto) -> bool:
    return sum(len(t.raw_data) for t in model.graph.initializer) < 2**31 - 2**26


def convert_to_fp16(model: onnx.ModelProto, keep_fp32_nodes: list[str] | tuple = (),
                    large: bool = False) -> onnx.ModelProto:
    """fp32 graph -> fp16 graph with float32 I/O; see the module doc for what stays fp32."""
    from onnxconverter_common import float16

    dedupe_value_info(model)
    cast_to_float = {n.name for n in model.graph.node
                     if n.op_type == "Cast" and helper.get_attribute_value(n.attribute[0]) == TensorProto.FLOAT}
    if not large:
        del model.graph.value_info[:]  # the converter infers them again
    _unshare_initializers(model, lambda node: node.name in keep_fp32_nodes or node.op_type in FP32_OPS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns for every weight it clamps to fp16's range
        converted = float16.convert_float_to_float16(
            model, keep_io_types=True, disable_shape_infer=large, op_block_list=list(FP32_OPS),
            node_block_list=list(keep_fp32_nodes))
    for node in converted.graph.node:
        if node.name in cast_to_float and node.op_type == "Cast":
            node.attribute[0].i = TensorProto.FLOAT16
    _float_outputs(converted, {o.name for o in model.graph.output
                               if o.type.tensor_type.elem_type == TensorProto.FLOAT})
    dedupe_value_info(converted)
    return converted


def _float_outputs(model: onnx.ModelProto, names: set[str]) -> None:
    """Keep float32 graph outputs float32. When the node making an output is kept fp32, the
    converter still ends it with a Cast to FLOAT16 and types the output FLOAT16 (seen: the
    two-pass statistics graphs' final Concat); that Cast is turned back into one to FLOAT."""
    producers = {o: n for n in model.graph.node for o in n.output}
    for output in model.graph.output:
        if output.name in names and output.type.tensor_type.elem_type != TensorProto.FLOAT:
            node = producers.get(output.name)
            if node is None or node.op_type != "Cast":
                raise RuntimeError(f"fp16 conversion left graph output {output.name} in "
                                   f"{TensorProto.DataType.Name(output.type.tensor_type.elem_type)}")
            node.attribute[0].i = TensorProto.FLOAT
            output.type.tensor_type.elem_type = TensorProto.FLOAT
            for info in model.graph.value_info:
                if info.name == output.name:
                    info.type.tensor_type.elem_type = TensorProto.FLOAT


def _unshare_initializers(model: onnx.ModelProto, kept) -> None:
    """Give the nodes that stay fp32 their own copy of every float initializer they share with
    nodes that become fp16. The converter types a shared initializer once (fp32, if any consumer
    stays fp32), which leaves the fp16 consumer with mixed input types; seen: the constant 1.0
    that onnxslim shares between the two-pass graphs' GroupNorm arithmetic and the decoder's Clip."""
    floats = {t.name: t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT}
    users: dict[str, set[bool]] = {}
    for node in model.graph.node:
        for name in node.input:
            if name in floats:
                users.setdefault(name, set()).add(bool(kept(node)))
    shared = {name for name, kinds in users.items() if kinds == {True, False}}
    for name in shared:
        copy = onnx.TensorProto()
        copy.CopyFrom(floats[name])
        copy.name = name + "__fp32"
        model.graph.initializer.append(copy)
    for node in model.graph.node:
        if kept(node):
            for i, name in enumerate(node.input):
                if name in shared:
                    node.input[i] = name + "__fp32"


def fp32_nodes(model: onnx.ModelProto) -> dict[str, int]:
    """Compute nodes (not Casts) whose float outputs are FLOAT in an fp16 graph, by op type."""
    types = _value_types(model)
    out: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in ("Cast", "Shape", "Constant"):
            continue
        if any(types.get(o) == TensorProto.FLOAT for o in node.output):
            out[node.op_type] = out.get(node.op_type, 0) + 1
    return out


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    if not model.graph.value_info:
        model = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in
             (*model.graph.value_info, *model.graph.input, *model.graph.output)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    return types


def emulate_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The fp32 twin of an fp16 graph that rounds each fp16 tensor where it is made.

    Weights become the fp32 values of their fp16 numbers; every node output
    typed FLOAT16 is computed in fp32 and passed through Cast(FLOAT16)+Cast(FLOAT)
    (onnxruntime keeps such explicit pairs), so overflow still gives inf.
    """
    model = onnx.shape_inference.infer_shapes(model)
    types = _value_types(model)
    graph = model.graph
    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT16:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), init.name))
    nodes = []
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == TensorProto.FLOAT16:
                    attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float32)))
        if node.op_type == "ConstantOfShape":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == TensorProto.FLOAT16:
                    attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float32)))
        if node.op_type == "Cast" and node.attribute[0].i == TensorProto.FLOAT16:
            node.attribute[0].i = TensorProto.FLOAT
        nodes.append(node)
        for i, name in enumerate(node.output):
            if types.get(name) == TensorProto.FLOAT16:
                raw = f"{name}__fp32"
                node.output[i] = raw
                nodes.append(helper.make_node("Cast", [raw], [f"{name}__fp16"], to=TensorProto.FLOAT16,
                                              name=f"{name}__round_to_fp16"))
                nodes.append(helper.make_node("Cast", [f"{name}__fp16"], [name], to=TensorProto.FLOAT,
                                              name=f"{name}__round_back"))
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    return model
