"""``config.pbtxt`` text for Triton, from the component specs (nothing restated).

A component model's batch dim is Triton's (``max_batch_size`` > 0), so its dims
are the spec's without ``batch``; every symbolic dim is -1. The orchestrator
(``srexport``) takes one image per request, so it has no batch dim.
"""

from __future__ import annotations

from ..artifact.specs import ComponentSpec, TensorSpec

TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "uint8": "TYPE_UINT8", "bytes": "TYPE_STRING"}
PLATFORMS = {"onnx": "onnxruntime_onnx", "trt": "tensorrt_plan"}

# The orchestrator's request and response: (name, dtype, dims, optional)
ORCHESTRATOR_INPUTS = (
    ("IMAGE", "uint8", (-1, -1, 3), True),
    ("IMAGE_BYTES", "bytes", (1,), True),
    ("LAMBDA_PIX", "float32", (1,), True),
    ("LAMBDA_SEM", "float32", (1,), True),
    ("GUIDANCE", "bytes", (1,), True),
    ("CFG_SCALE", "float32", (1,), True),
    ("DEGRADATION", "float32", (2,), True),
    ("COLOR_FIX", "bytes", (1,), True),
)
ORCHESTRATOR_OUTPUTS = (("IMAGE", "uint8", (-1, -1, 3)),)


def _dims(tensor: TensorSpec) -> str:
    dims = [d for d in tensor.dims if d != "batch"]
    return ", ".join(str(d) if isinstance(d, int) else "-1" for d in dims)


def _tensor(name: str, dtype: str, dims: str, optional: bool = False) -> str:
    extra = " optional: true" if optional else ""
    return f'  {{ name: "{name}" data_type: {TRITON_DTYPES[dtype]} dims: [ {dims} ]{extra} }}'


def _instances(count: int, kind: str) -> str:
    return f"instance_group [ {{ kind: {kind} count: {count} }} ]"


def component_config(spec: ComponentSpec, max_batch_size: int, instances: int, backend: str | None,
                     platform: str | None = None, kind: str = "KIND_CPU", parameters: dict | None = None,
                     queue_delay_us: int = 2000) -> str:
    """One component model: its spec's tensors, dynamic batching up to ``max_batch_size``."""
    head = f'backend: "{backend}"' if backend else f'platform: "{platform}"'
    lines = [f'name: "{spec.name}"', head, f"max_batch_size: {max_batch_size}",
             "input [", ",\n".join(_tensor(t.name, t.dtype, _dims(t)) for t in spec.inputs), "]",
             "output [", ",\n".join(_tensor(t.name, t.dtype, _dims(t)) for t in spec.outputs), "]",
             f"dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}",
             _instances(instances, kind)]
    lines += _parameters(parameters or {})
    return "\n".join(lines) + "\n"


def orchestrator_config(instances: int, parameters: dict) -> str:
    lines = ['name: "srexport"', 'backend: "python"', "max_batch_size: 0",
             "input [", ",\n".join(_tensor(n, d, ", ".join(map(str, dims)), o)
                                   for n, d, dims, o in ORCHESTRATOR_INPUTS), "]",
             "output [", ",\n".join(_tensor(n, d, ", ".join(map(str, dims))) for n, d, dims in ORCHESTRATOR_OUTPUTS),
             "]", _instances(instances, "KIND_CPU")]
    lines += _parameters(parameters)
    return "\n".join(lines) + "\n"


def _parameters(parameters: dict) -> list[str]:
    return [f'parameters {{ key: "{k}" value: {{ string_value: "{_quoted(v)}" }} }}' for k, v in parameters.items()]


def _quoted(value) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"')
