"""The precisions srexport knows, one entry each: what an artifact's graphs (``export.precision``)
or a benchmarked PyTorch baseline compute in, and the numbers that go with it.

Graph precisions (``srexport build --precision``) are written into the ONNX itself, as strongly
typed TensorRT needs; their conversion is ``calibration/`` (fp16.py, int8.py). bf16 is a PyTorch
baseline precision in ``srexport bench`` only. fp8 would be one more entry here and a converter.
Torch-free, so the CLI can list the choices without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
    # The module of calibration/ that converts fp32 graphs to it (None: fp32 itself, or baseline only)
    converter: str | None = None
    # trt.DataType of its compute: strongly typed engines take the types from the graph; recorded
    # with each engine so a reader need not open the plan to know what it computes in
    tensorrt_dtype: str | None = None
    # Pipeline stages (ComponentSpec.stage) whose graphs a build of this precision makes in another
    # precision: stage -> (precision, why)
    stage_precisions: dict[str, tuple[str, str]] = field(default_factory=dict)

    def for_stage(self, stage: str) -> "Precision":
        """The precision a graph serving ``stage`` is converted to in a build of this one."""
        return PRECISIONS[self.stage_precisions[stage][0]] if stage in self.stage_precisions else self


PRECISIONS: dict[str, Precision] = {
    "fp32": Precision("fp32", 4, True, 50.0, 1e-3, 50.0, "float32", tensorrt_dtype="FLOAT"),
    "fp16": Precision("fp16", 2, True, 40.0, None, 30.0, "float16", converter="calibration.fp16",
                      tensorrt_dtype="HALF"),
    "bf16": Precision("bf16", 2, False, None, None, 28.0, "bfloat16", tensorrt_dtype="BF16"),
    "int8": Precision("int8", 1, True, 30.0, None, 25.0, None, converter="calibration.int8",
                      tensorrt_dtype="INT8", stage_precisions={
                          "degradation": ("fp16", "S3Diff's estimator runs once per image on the LR image; its "
                                                  "scores modulate every LoRA layer")}),
}
GRAPH_PRECISIONS = tuple(name for name, p in PRECISIONS.items() if p.graphs)  # fp32, fp16, int8
DEFAULT_PRECISION = "fp16"


def bounds_for(precision: str, specs: dict) -> dict:
    """The bounds a build of ``precision`` records (``checks.bounds``) for these component specs
    (artifact.specs.ComponentSpec). fp32: each graph's max abs against its module. fp16/int8: per
    component, the output PSNR (dB, output in [0,1]) of the pipeline with only that graph converted
    (its spec's ``min_output_psnr``, else the end-to-end bound of the precision it is converted to),
    and end to end PSNR, both against the fp32 PyTorch reference. A graph's own rel L2 is recorded,
    not bounded: what it says about the image differs per graph (S3Diff's UNet returns z0, its eps
    error amplified 14.6x at t=999; at 1.8e-2 rel L2 in fp16 the demo still reaches 47 dB end to
    end). The numbers are chosen from the README's table, with margin."""
    p = PRECISIONS[precision]
    bounds = {"component_max_abs": p.component_max_abs, "component_rel_l2": None,
              "end_to_end_min_psnr": p.end_to_end_min_psnr, "precision": precision}
    if precision != "fp32":
        bounds["components"] = {
            name: {"min_output_psnr": spec.min_output_psnr.get(precision, p.for_stage(spec.stage).end_to_end_min_psnr)}
            for name, spec in specs.items()}
    return bounds
