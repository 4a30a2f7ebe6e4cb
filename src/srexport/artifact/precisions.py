"""The precisions srexport knows, one entry each: what an artifact's graphs (``export.precision``)
or a benchmarked PyTorch baseline compute in, and the numbers that go with it.

Graph precisions (``srexport build --precision``) are written into the ONNX itself, as strongly
typed TensorRT needs; their conversion is ``calibration/`` (fp16.py, int8.py). bf16 is a PyTorch
baseline precision in ``srexport bench`` only. fp8 would be one more entry here and a converter.
Torch-free, so the CLI can list the choices without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Precision:
    name: str
    element_bytes: int  # per weight/activation element: the cost model's memory traffic
    graphs: bool  # an artifact precision (its graphs are converted to it), not a baseline-only one
    # Build and check bounds against the fp32 PyTorch reference: end-to-end PSNR (dB, output in
    # [0,1]) and, for fp32 graphs, each graph's max abs against its module. A converted graph is
    # bounded on its alone output PSNR (calibration/precision.py), by default this same number.
    end_to_end_min_psnr: float | None
    component_max_abs: float | None
    # srexport bench's default end-to-end bound: looser, as it also judges the PyTorch fp16 eager
    # baseline, which keeps no normalisation in fp32. It catches a broken backend.
    bench_min_psnr: float
    torch_dtype: str | None  # the torch dtype a PyTorch baseline runs at (None: no such baseline)


PRECISIONS: dict[str, Precision] = {
    "fp32": Precision("fp32", 4, True, 50.0, 1e-3, 50.0, "float32"),
    "fp16": Precision("fp16", 2, True, 40.0, None, 30.0, "float16"),
    "bf16": Precision("bf16", 2, False, None, None, 28.0, "bfloat16"),
    "int8": Precision("int8", 1, True, 30.0, None, 25.0, None),
}
GRAPH_PRECISIONS = tuple(name for name, p in PRECISIONS.items() if p.graphs)  # fp32, fp16, int8
DEFAULT_PRECISION = "fp16"
