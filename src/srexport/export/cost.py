"""A cost model counted from the ONNX graphs: FLOPs and bytes per component at a shape.

The counts come from the graph an artifact actually ships, after shape
inference at concrete input shapes (onnxruntime's symbolic shape inference,
which follows the UNet's Shape/Gather/Concat chains and the batch-expanded
prompt that ONNX's own inference leaves unknown). Conventions:

- ``flops``: the dense work of Conv, ConvTranspose, MatMul and Gemm, counted as
  2 x multiply-accumulates (a multiply and an add each), biases left out. This
  is the work tensor cores do, and what peak TFLOP/s figures are quoted for;
  it matches ``torch.utils.flop_counter`` on the modules the graphs came from.
- ``other_flops``: elementwise, normalisation and softmax work, approximated as
  a few operations per output element (``_PER_ELEMENT``). Reported, never added
  into ``flops``.
- ``weight_bytes``: every initializer read once. ``io_bytes``: the graph's
  inputs and outputs. Their sum, ``min_bytes``, is the traffic a perfectly
  fused implementation cannot avoid (the lower bound used for the floor).
- ``activation_bytes``: what every compute node reads and writes if nothing is
  fused (an upper bound on traffic; data-movement-free reshapes are left out).

``floor_seconds`` is the roofline floor: the larger of flops / peak rate and
min_bytes / peak bandwidth. ``GPU_PEAKS`` holds datasheet dense rates for the
GPUs this project is measured on (H100 by default).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

# Dense (no sparsity) datasheet peaks. fp32 graphs on tensor cores run as TF32
# (TensorRT and onnxruntime's CUDA provider allow TF32 by default), so the
# fp32 floor uses the TF32 rate: the fastest that precision could go.
GPU_PEAKS = {
    "h100-sxm": {"name": "NVIDIA H100 SXM5", "tflops": {"fp16": 989.4, "bf16": 989.4, "fp32": 494.7, "int8": 1978.9},
                 "gbps": 3350.0},
    "h100-pcie": {"name": "NVIDIA H100 PCIe", "tflops": {"fp16": 756.0, "bf16": 756.0, "fp32": 378.0, "int8": 1513.0},
                  "gbps": 2000.0},
    "h200": {"name": "NVIDIA H200 SXM", "tflops": {"fp16": 989.4, "bf16": 989.4, "fp32": 494.7, "int8": 1978.9},
             "gbps": 4800.0},
}
DEFAULT_GPU = "h100-sxm"

# Elementwise work per output element: approximate, for ``other_flops`` only.
_PER_ELEMENT = {
    **dict.fromkeys(["Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Neg", "Abs", "Relu", "Clip", "Min", "Max",
                     "Where", "Equal", "Less", "Greater", "Reciprocal"], 1),
    **dict.fromkeys(["Sigmoid", "Tanh", "Erf", "Exp", "Log", "Sin", "Cos", "Gelu"], 4),
    "Softmax": 5, "InstanceNormalization": 5, "LayerNormalization": 5, "GroupNormalization": 5,
    "BatchNormalization": 2, "ReduceMean": 1, "ReduceSum": 1, "Resize": 4,
}
# Nodes that only reinterpret a tensor (no memory traffic of their own).
_VIEWS = {"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Shape", "Constant", "ConstantOfShape", "Size"}
_DENSE = {"Conv", "ConvTranspose", "MatMul", "Gemm"}
# Initializers at least this many elements become plain inputs for shape
# inference, so multi-GB weights are never copied through it.
_LARGE_INITIALIZER = 4096


@dataclass
class GraphCost:
    """FLOPs and bytes of one graph (or a sum of graphs) at concrete shapes."""

    flops: int = 0
    other_flops: int = 0
    weight_bytes: int = 0
    io_bytes: int = 0
    activation_bytes: int = 0
    flops_by_op: dict = field(default_factory=dict)
    dtype_bytes: int = 4  # element size of the graph's float tensors

    @property
    def min_bytes(self) -> int:
        return self.weight_bytes + self.io_bytes

    def __add__(self, other: "GraphCost") -> "GraphCost":
        by_op = dict(self.flops_by_op)
        for k, v in other.flops_by_op.items():
            by_op[k] = by_op.get(k, 0) + v
        return GraphCost(self.flops + other.flops, self.other_flops + other.other_flops,
                         self.weight_bytes + other.weight_bytes, self.io_bytes + other.io_bytes,
                         self.activation_bytes + other.activation_bytes, by_op,
                         max(self.dtype_bytes, other.dtype_bytes))

    def floor_seconds(self, peak_tflops: float, peak_gbps: float, element_bytes: float | None = None) -> float:
        """Roofline floor: max(compute time at peak, unavoidable traffic at peak bandwidth).
        ``element_bytes`` rescales the traffic to a precision other than the graph's own."""
        scale = (element_bytes / self.dtype_bytes) if element_bytes else 1.0
        return max(self.flops / (peak_tflops * 1e12), self.min_bytes * scale / (peak_gbps * 1e9))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["min_bytes"] = self.min_bytes
        return d


def _elem_bytes(elem_type: int) -> int:
    from onnx import helper

    try:
        return int(np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize)
    except (KeyError, TypeError, ValueError):
        return 4


def _prepare(model, input_shapes: dict[str, tuple[int, ...]]):
    """Concrete input dims, no stale value_info, large or external initializers turned into inputs."""
    from onnx import TensorProto, helper

    graph = model.graph
    names = {i.name for i in graph.input}
    missing = set(input_shapes) - names
    if missing:
        raise ValueError(f"graph has no inputs {sorted(missing)} (it has {sorted(names)})")
    for inp in graph.input:
        if inp.name not in input_shapes:
            continue
        dims = inp.type.tensor_type.shape.dim
        shape = input_shapes[inp.name]
        if len(dims) != len(shape):
            raise ValueError(f"input {inp.name} has rank {len(dims)}; got shape {tuple(shape)}")
        for d, v in zip(dims, shape):
            d.ClearField("dim_param")
            d.dim_value = int(v)
    for out in graph.output:
        for d in out.type.tensor_type.shape.dim:
            d.ClearField("dim_param")
            d.ClearField("dim_value")
    del graph.value_info[:]
    weights = {}
    keep = []
    for init in graph.initializer:
        n = int(np.prod(init.dims)) if len(init.dims) else 1
        weights[init.name] = (tuple(init.dims), _elem_bytes(init.data_type))
        # Externally stored tensors (graphs over 2 GB keep even small ones outside) become
        # inputs too: shape inference needs only their dims, and cannot read the data file.
        external = init.data_location == TensorProto.EXTERNAL
        if n >= _LARGE_INITIALIZER or external:
            graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            keep.append(init)
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return weights


def count_model(model, input_shapes: dict[str, tuple[int, ...]]) -> GraphCost:
    """Count an ``onnx.ModelProto`` (modified in place: load it fresh) at the given input shapes."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    graph_inputs = [i.name for i in model.graph.input]
    graph_outputs = [o.name for o in model.graph.output]
    weights = _prepare(model, input_shapes)
    inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    if inferred is None:
        raise RuntimeError("shape inference failed on the graph")
    shapes: dict[str, tuple[tuple, int]] = dict(weights)
    for vi in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
        shapes.setdefault(vi.name, (dims, _elem_bytes(tt.elem_type)))

    def numel(name: str) -> int | None:
        if name not in shapes or any(d is None for d in shapes[name][0]):
            return None
        return int(np.prod(shapes[name][0])) if shapes[name][0] else 1

    def nbytes(name: str) -> int:
        n = numel(name)
        return 0 if n is None else n * shapes[name][1]

    def dims(name: str) -> tuple:
        value = shapes.get(name)
        if value is None or any(d is None for d in value[0]):
            raise RuntimeError(f"shape of {name!r} is unknown after shape inference; cannot count its FLOPs")
        return value[0]

    cost = GraphCost()
    cost.weight_bytes = sum(int(np.prod(d)) * b if d else b for d, b in weights.values())
    cost.io_bytes = sum(nbytes(n) for n in (*(i for i in graph_inputs if i not in weights), *graph_outputs))
    float_inputs = [shapes[n][1] for n in graph_inputs if n in shapes and n not in weights]
    cost.dtype_bytes = max(float_inputs) if float_inputs else 4
    for node in inferred.graph.node:
        op = node.op_type
        if op in _VIEWS:
            continue
        cost.activation_bytes += sum(nbytes(n) for n in node.input if n and n not in weights)
        cost.activation_bytes += sum(nbytes(n) for n in node.output if n)
        if op in _DENSE:
            f = _dense_flops(node, dims)
            cost.flops += f
            cost.flops_by_op[op] = cost.flops_by_op.get(op, 0) + f
        elif op in _PER_ELEMENT and node.output and numel(node.output[0]):
            cost.other_flops += _PER_ELEMENT[op] * numel(node.output[0])
    return cost


def _attr(node, name: str, default):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _dense_flops(node, dims) -> int:
    op = node.op_type
    if op == "MatMul":
        a, y = dims(node.input[0]), dims(node.output[0])
        k = a[-1]
        # y holds the broadcast batch and M x N: every output element is a K-long dot product.
        return 2 * int(np.prod(y)) * k
    if op == "Gemm":
        a, y = dims(node.input[0]), dims(node.output[0])
        k = a[0] if _attr(node, "transA", 0) else a[1]
        return 2 * int(np.prod(y)) * k
    if op == "Conv":
        w, y = dims(node.input[1]), dims(node.output[0])
        # w: (C_out, C_in / groups, *kernel); each output element sums C_in/groups * prod(kernel) products.
        return 2 * int(np.prod(y)) * int(np.prod(w[1:]))
    if op == "ConvTranspose":
        x, w = dims(node.input[0]), dims(node.input[1])
        # w: (C_in, C_out / groups, *kernel); every input element scatters into C_out/groups * prod(kernel) outputs.
        return 2 * int(np.prod(x)) * int(np.prod(w[1:]))
    raise ValueError(op)


@lru_cache(maxsize=64)
def _count_file(path: str, mtime: float, shapes: tuple) -> GraphCost:
    import onnx

    model = onnx.load(path, load_external_data=False)  # external weights: dims are enough
    return count_model(model, dict(shapes))


def count_graph(path: str | Path, input_shapes: dict[str, tuple[int, ...]]) -> GraphCost:
    """Cost of one ONNX file at the given input shapes (cached per file and shapes)."""
    path = Path(path)
    key = tuple(sorted((k, tuple(int(d) for d in v)) for k, v in input_shapes.items()))
    return _count_file(str(path.absolute()), path.stat().st_mtime, key)


def artifact_costs(artifact, calls: dict[str, list[dict[str, tuple]]]) -> dict[str, GraphCost]:
    """Per component, the summed cost of the calls a run made (input shapes per call)."""
    out = {}
    for component, shape_list in calls.items():
        total = GraphCost()
        for shapes in shape_list:
            total = total + count_graph(artifact.component_file(component), shapes)
        out[component] = total
    return out


def resolve_peaks(gpu: str = DEFAULT_GPU, tflops: float | None = None, gbps: float | None = None) -> dict:
    """The named GPU's peaks, with user overrides (``tflops`` replaces every precision's rate)."""
    from ..errors import UserError

    if gpu not in GPU_PEAKS:
        raise UserError(f"--gpu {gpu!r} is not one of {', '.join(GPU_PEAKS)}; give --peak-tflops and --peak-gbps "
                        "for another device")
    base = GPU_PEAKS[gpu]
    rates = dict(base["tflops"])
    if tflops is not None:
        if tflops <= 0:
            raise UserError("--peak-tflops must be positive")
        rates = dict.fromkeys(rates, tflops)
    if gbps is not None and gbps <= 0:
        raise UserError("--peak-gbps must be positive")
    return {"gpu": gpu, "name": base["name"] + (" (overridden)" if tflops or gbps else ""),
            "tflops": rates, "gbps": gbps or base["gbps"]}


def detect_gpu(device_name: str) -> str:
    """Our preset for a CUDA device name (H100 SXM when unsure: the default)."""
    name = device_name.lower()
    if "h200" in name:
        return "h200"
    if "h100" in name and "pcie" in name:
        return "h100-pcie"
    return DEFAULT_GPU
