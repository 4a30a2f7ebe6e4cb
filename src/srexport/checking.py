"""``srexport check``: an artifact's graphs and pipeline against the PyTorch reference.

Per component, each graph gets exactly the inputs the reference's own module
gets at that stage (so errors do not compound), and the outputs are compared.
End to end, the backend's pipeline and the reference each upscale the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .parity import Parity, compare
from .processing import postprocess
from .runtime.pipeline import SRPipeline
from .runtime.runners import TorchRunner

# Default bounds for fp32 graphs.
COMPONENT_MAX_ABS = 1e-3
END_TO_END_MIN_PSNR = 50.0
# PSNR ranges: images are compared on their own scale, latents on the reference's range.
_PEAK_TO_PEAK = {"decoded": 2.0, "image": 2.0, "scores": 1.0}


@dataclass
class ImageReport:
    name: str
    components: dict[str, Parity]
    end_to_end: Parity
    output_shape: tuple

    def to_dict(self) -> dict:
        return {"image": self.name, "output_shape": list(self.output_shape),
                "components": {k: v.to_dict() for k, v in self.components.items()},
                "end_to_end": self.end_to_end.to_dict()}


def check_image(pipeline: SRPipeline, reference, lr: torch.Tensor, name: str) -> ImageReport:
    env, prepared = reference.stage_tensors(lr)
    modules = reference.components()
    components = {}
    for component, runner in pipeline.runners.items():
        feeds = {n: env[n] for n in runner.spec.input_names}
        expected = TorchRunner(modules[component], runner.spec)(feeds)
        actual = runner(feeds)
        worst = None
        for out_name, value in expected.items():
            p = compare(actual[out_name], value, peak_to_peak=_PEAK_TO_PEAK.get(out_name))
            worst = p if worst is None or p.max_abs > worst.max_abs else worst
        components[component] = worst
    expected_out = postprocess(env["decoded"], prepared, reference.processing)
    actual_out = pipeline(lr)
    return ImageReport(name, components, compare(actual_out, expected_out, peak_to_peak=1.0), tuple(actual_out.shape))


def failures(report: ImageReport, max_abs: float, min_psnr: float) -> list[str]:
    out = [f"{report.name}: {c} max_abs {p.max_abs:.2e} > {max_abs:.0e}"
           for c, p in report.components.items() if not p.max_abs <= max_abs]
    if not report.end_to_end.psnr_db >= min_psnr:
        out.append(f"{report.name}: end-to-end PSNR {report.end_to_end.psnr_db:.2f} dB < {min_psnr} dB")
    return out
