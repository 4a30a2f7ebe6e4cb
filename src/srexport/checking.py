"""``srexport check``: an artifact's graphs and pipeline against the PyTorch reference.

Per component, each graph gets exactly the inputs the reference's own module
gets at that stage (so errors do not compound), and the outputs are compared.
End to end, the backend's pipeline and the reference each upscale the image.
Tiled artifacts, for an image larger than one tile: the backend's tiled run
against the tiled PyTorch reference (models/tiled_reference.py, same bound),
and separately the tiled reference against the whole-image one (what tiling
itself changes; reported, not bounded). End to end is then whole-image, or,
above the artifact's untiled limit, the tiled comparison again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .models.group_norm_stats import add_whole_image_stats, comparable, graph_modules
from .parity import Parity, compare, ssim
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
    # The images compared end to end (for --compare-image); not part of to_dict().
    images: dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)
    ssim: float | None = None  # end to end, against the reference's output
    # Tiled runs (images larger than one tile): backend vs tiled reference, tiled vs whole reference.
    tiled: Parity | None = None
    tiled_vs_whole: Parity | None = None
    tiles: dict[str, int] | None = None  # tiles per stage

    def to_dict(self) -> dict:
        d = {"image": self.name, "output_shape": list(self.output_shape),
             "components": {k: v.to_dict() for k, v in self.components.items()},
             "end_to_end": dict(self.end_to_end.to_dict(), ssim=self.ssim)}
        if self.tiled is not None:
            d["tiled"] = dict(self.tiled.to_dict(), tiles=self.tiles)
            d["tiled_vs_whole"] = self.tiled_vs_whole.to_dict()
        return d


def check_image(pipeline: SRPipeline, reference, lr: torch.Tensor, name: str) -> ImageReport:
    env, prepared = reference.stage_tensors(lr)
    modules = graph_modules(reference)
    add_whole_image_stats(env, modules, {c: r.spec for c, r in pipeline.runners.items()})
    components = {}
    plan = pipeline.denoise_plan  # UNet graphs whose outputs it combines are not in env: run their modules
    combined = {t["component"] for t in plan["terms"]} if (
        plan.get("latent_weight") or len(plan["terms"]) != 1 or plan["terms"][0]["weight"] != 1) else set()
    for component, runner in pipeline.runners.items():
        feeds = {n: env[n] for n in runner.spec.input_names}
        if component in combined or any(n not in env for n in runner.spec.output_names):
            expected = TorchRunner(modules[component], runner.spec)(feeds)
        else:  # the reference computed exactly this module's output on these inputs
            expected = {n: env[n] for n in runner.spec.output_names}
        actual = runner(feeds)
        worst = None
        for out_name, value in expected.items():
            p = compare(*comparable(out_name, actual[out_name], value), peak_to_peak=_PEAK_TO_PEAK.get(out_name))
            worst = p if worst is None or p.max_abs > worst.max_abs else worst
        components[component] = worst
    expected_out = postprocess(env["decoded"], prepared, reference.processing)
    tiled = pipeline.tiling is not None and pipeline.will_tile(*lr.shape[-2:], tiled=True)
    if not tiled:
        actual_out = pipeline(lr)
        return ImageReport(name, components, compare(actual_out, expected_out, peak_to_peak=1.0),
                           tuple(actual_out.shape), {"lr": lr, "reference": expected_out, "actual": actual_out},
                           ssim(actual_out, expected_out))
    from .errors import UserError
    from .models.tiled_reference import TiledReference

    tiled_expected = TiledReference(reference, pipeline.tiling)(lr)
    tiled_actual = pipeline.run_stages(lr, tiled=True).tensors["output"].to(lr.device)
    try:  # end to end whole-image too, within the artifact's untiled limit
        actual_out, expected = pipeline.run_stages(lr, tiled=False).tensors["output"].to(lr.device), expected_out
    except UserError:  # above it: end to end is the tiled comparison
        actual_out, expected = tiled_actual, tiled_expected
    report = ImageReport(name, components, compare(actual_out, expected, peak_to_peak=1.0),
                         tuple(actual_out.shape), {"lr": lr, "reference": expected, "actual": actual_out},
                         ssim(actual_out, expected))
    report.tiled = compare(tiled_actual, tiled_expected, peak_to_peak=1.0)
    report.tiled_vs_whole = compare(tiled_expected, expected_out, peak_to_peak=1.0)
    report.tiles = pipeline.tile_counts(*lr.shape[-2:])
    return report


def failures(report: ImageReport, max_abs: float | None, min_psnr: float, max_rel_l2: float | None = None) -> list[str]:
    """Missed bounds; ``None`` skips a bound (fp16/int8 artifacts bound rel L2, fp32 max abs)."""
    out = [f"{report.name}: {c} max_abs {p.max_abs:.2e} > {max_abs:.0e}"
           for c, p in report.components.items() if max_abs is not None and not p.max_abs <= max_abs]
    out += [f"{report.name}: {c} rel_l2 {p.rel_l2:.2e} > {max_rel_l2:g}"
            for c, p in report.components.items() if max_rel_l2 is not None and not p.rel_l2 <= max_rel_l2]
    if not report.end_to_end.psnr_db >= min_psnr:
        out.append(f"{report.name}: end-to-end PSNR {report.end_to_end.psnr_db:.2f} dB < {min_psnr} dB")
    if report.tiled is not None and not report.tiled.psnr_db >= min_psnr:
        out.append(f"{report.name}: tiled PSNR {report.tiled.psnr_db:.2f} dB < {min_psnr} dB (vs the tiled reference)")
    return out
