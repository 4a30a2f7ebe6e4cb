"""``srexport check``: an artifact's graphs and pipeline against the PyTorch reference.

Per component, each graph gets exactly the inputs the reference's own module
gets at that stage (so errors do not compound), and the outputs are compared.
With ``each_alone`` (fp16/int8 artifacts: what their bounds are on), also the
error each graph alone puts into the image: the whole-image pipeline with only
that graph the backend's and every other stage the reference's modules,
against the reference's output.
End to end, the backend's pipeline and the reference each upscale the image.
Tiled artifacts, for an image larger than one tile: the backend's tiled run
against the tiled PyTorch reference (models/tiled_reference.py, same bound),
and separately the tiled reference against the whole-image one (what tiling
itself changes; reported, not bounded). End to end is then whole-image, or,
above the artifact's untiled limit, the tiled comparison again.

The reference's side of an image (``expected_for``) is computed once and
compared with every way of running it (``check_image(..., expected=)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .models.group_norm_stats import (TWO_PASS_COMPONENTS, TWO_PASS_OF, add_whole_image_stats, comparable,
                                      graph_modules, norm_stats_name, tile_stats_name)
from .parity import Parity, compare, ssim, worst
from .processing import postprocess
from .runtime.pipeline import SRPipeline
from .runtime.runners import CPU, TorchRunner

# Default bounds for fp32 graphs.
COMPONENT_MAX_ABS = 1e-3
END_TO_END_MIN_PSNR = 50.0
# PSNR ranges: images are compared on their own scale, latents on the reference's range.
_PEAK_TO_PEAK = {"decoded": 2.0, "image": 2.0, "scores": 1.0}


def compare_outputs(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> Parity:
    """One component's outputs against the reference's: the comparison build, check and precision
    measurement all make. The worst of each number over the outputs; images and scores over
    their value range, latents over the reference's own, statistics standardised."""
    return worst(compare(*comparable(name, actual[name], value), peak_to_peak=_PEAK_TO_PEAK.get(name))
                 for name, value in expected.items())


def _silent(message: str) -> None:
    pass


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
    # Per component, the output with only that graph the backend's (``each_alone``), vs the reference's.
    alone: dict[str, Parity] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {"image": self.name, "output_shape": list(self.output_shape),
             "components": {k: v.to_dict() for k, v in self.components.items()},
             "end_to_end": dict(self.end_to_end.to_dict(), ssim=self.ssim)}
        for c, p in self.alone.items():
            d["components"][c]["output_psnr_db"] = p.to_dict()["psnr_db"]
        if self.tiled is not None:
            d["tiled"] = dict(self.tiled.to_dict(), tiles=self.tiles)
            d["tiled_vs_whole"] = self.tiled_vs_whole.to_dict()
        return d


@dataclass
class Expected:
    """The fp32 reference's side of one image, for every way of running it."""

    feeds: dict[str, dict[str, torch.Tensor]]  # per component: what the reference feeds its module
    outputs: dict[str, dict[str, torch.Tensor]]  # per component: what the module returns on them
    output: torch.Tensor  # the whole-image output
    tiled: torch.Tensor | None = None  # the tiled reference's output, once a check needed it


def _tiles(pipeline: SRPipeline, lr: torch.Tensor) -> bool:
    return pipeline.tiled and pipeline.will_tile(*lr.shape[-2:], tiled=True)


def expected_for(pipeline: SRPipeline, reference, lr: torch.Tensor) -> Expected:
    """What the reference computes on ``lr`` for ``pipeline``'s components."""
    env, prepared = reference.stage_tensors(lr, pipeline.resolved)
    modules = graph_modules(reference)
    specs = {c: r.spec for c, r in pipeline.runners.items()}
    add_whole_image_stats(env, modules, specs)
    # env["denoised"] is a UNet graph's output only where the plan is that one graph, as it is
    # (weight 1, no latent term); every other denoise graph's output is computed from its module
    plan = pipeline.denoise_plan
    terms = plan["terms"]
    as_is = {terms[0]["component"]} if not plan.get("latent_weight") and len(terms) == 1 and (
        terms[0]["weight"] == 1) else set()
    combined = {c for c, spec in specs.items()
                if spec.stage == "denoise" and TWO_PASS_COMPONENTS.get(c, (c,))[0] not in as_is}
    feeds, outputs = {}, {}
    for c, spec in specs.items():
        feeds[c] = {n: env[n] for n in spec.input_names}
        if c in combined or any(n not in env for n in spec.output_names):
            outputs[c] = TorchRunner(modules[c], spec)(feeds[c])
        else:  # the reference computed exactly this module's output on these inputs
            outputs[c] = {n: env[n] for n in spec.output_names}
    return Expected(feeds, outputs, postprocess(env["decoded"], prepared, reference.processing))


class _Replay:
    """A runner that gives back outputs computed before on the given inputs, and runs
    ``compute`` on other inputs: in a pipeline with one graph swapped, the stages before it
    see exactly the reference's inputs, so only the stages after it need to run."""

    backend, device = "torch", CPU

    def __init__(self, spec, feeds: dict, outputs: dict | None, compute):
        self.spec, self.feeds, self.outputs, self.compute = spec, feeds, outputs, compute

    def __call__(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.outputs is not None and all(torch.equal(feeds[n], self.feeds[n]) for n in self.spec.input_names):
            return self.outputs
        return {k: v.to(CPU) for k, v in self.compute(feeds).items()}  # GPU runners: the reference is on CPU


def _two_pass_stand_in(component: str, runners: dict, references: dict):
    """A two-pass graph in a whole-image run: the plain component it stands for, computed as
    one tile (its own statistics are the pool) with this graph's pass from ``runners`` and
    the other pass the reference's."""
    plain, kind = TWO_PASS_COMPONENTS[component]
    stats, pooled, _ = TWO_PASS_OF[plain]
    first, second = ((runners[component], references[pooled]) if kind == "stats"
                     else (references[stats], runners[component]))

    def compute(feeds):
        return second({**feeds, norm_stats_name(plain): first(feeds)[tile_stats_name(plain)].to(CPU)})
    return plain, compute


def graphs_alone(pipeline: SRPipeline, reference, lr: torch.Tensor, expected: Expected,
                 actual: dict[str, dict]) -> dict[str, Parity]:
    """Per component, the whole-image output with only that graph the pipeline's (``actual``:
    its outputs on the reference's inputs), against the reference's: the error each graph puts
    into the image, whatever quantity the graph itself returns."""
    modules = graph_modules(reference)
    references = {c: TorchRunner(modules[c], r.spec) for c, r in pipeline.runners.items()}
    replays = {c: _Replay(r.spec, expected.feeds[c], expected.outputs[c], references[c])
               for c, r in pipeline.runners.items()}
    out = {}
    for c, runner in pipeline.runners.items():
        if c in TWO_PASS_COMPONENTS:
            plain, compute = _two_pass_stand_in(c, pipeline.runners, references)
            swapped = _Replay(pipeline.runners[plain].spec, {}, None, compute)
        else:
            plain = c
            swapped = _Replay(runner.spec, expected.feeds[c], {k: v.to(CPU) for k, v in actual[c].items()}, runner)
        one = SRPipeline(pipeline.manifest, {**replays, plain: swapped}, tiled=False)
        one.resolved = pipeline.resolved
        one.untiled_max_megapixels = None  # the reference ran this image whole; so did each graph above
        out[c] = compare(one.run_stages(lr, tiled=False).tensors["output"], expected.output, peak_to_peak=1.0)
    return out


def check_image(pipeline: SRPipeline, reference, lr: torch.Tensor, name: str, expected: Expected | None = None,
                note=_silent, each_alone: bool = False) -> ImageReport:
    """``pipeline`` against the reference on ``lr``; ``expected`` (``expected_for``) when the
    reference's side is already computed; ``note`` gets a line as each long step starts."""
    if expected is None:
        note(f"{name}: fp32 PyTorch reference, whole image")
        expected = expected_for(pipeline, reference, lr)
    note(f"{name}: each graph on the reference's inputs")
    actual = {c: runner(expected.feeds[c]) for c, runner in pipeline.runners.items()}
    components = {c: compare_outputs(actual[c], outputs) for c, outputs in expected.outputs.items()}
    alone = {}
    if each_alone:
        note(f"{name}: each graph alone in the reference pipeline")
        alone = graphs_alone(pipeline, reference, lr, expected, actual)
    del actual
    if not _tiles(pipeline, lr):
        note(f"{name}: whole-image run")
        actual_out = pipeline.run_stages(lr, tiled=False).tensors["output"].to(lr.device)
        return ImageReport(name, components, compare(actual_out, expected.output, peak_to_peak=1.0),
                           tuple(actual_out.shape), {"lr": lr, "reference": expected.output, "actual": actual_out},
                           ssim(actual_out, expected.output), alone=alone)
    from .errors import UserError

    if expected.tiled is None:
        from .models.tiled_reference import TiledReference

        note(f"{name}: fp32 PyTorch reference, tiled")
        expected.tiled = TiledReference(reference, pipeline.tiling)(lr, pipeline.resolved)
    tiles = pipeline.tile_counts(*lr.shape[-2:])
    note(f"{name}: tiled run ({', '.join(f'{k} {v}' for k, v in tiles.items())} tiles)")
    tiled_actual = pipeline.run_stages(lr, tiled=True).tensors["output"].to(lr.device)
    try:  # end to end whole-image too, within the artifact's untiled limit
        pipeline.will_tile(*lr.shape[-2:], tiled=False)
        note(f"{name}: whole-image run")
        actual_out, against = pipeline.run_stages(lr, tiled=False).tensors["output"].to(lr.device), expected.output
    except UserError:  # above it: end to end is the tiled comparison
        actual_out, against = tiled_actual, expected.tiled
    report = ImageReport(name, components, compare(actual_out, against, peak_to_peak=1.0),
                         tuple(actual_out.shape), {"lr": lr, "reference": against, "actual": actual_out},
                         ssim(actual_out, against), alone=alone)
    report.tiled = compare(tiled_actual, expected.tiled, peak_to_peak=1.0)
    report.tiled_vs_whole = compare(expected.tiled, expected.output, peak_to_peak=1.0)
    report.tiles = tiles
    return report


def failures(report: ImageReport, max_abs: float | None, min_psnr: float, max_rel_l2: float | None = None,
             min_output_psnr: dict[str, float] | None = None) -> list[str]:
    """Missed bounds; ``None`` skips a bound (fp32 artifacts bound max abs per graph, fp16/int8
    the output PSNR of each graph alone, ``min_output_psnr`` by component)."""
    out = [f"{report.name}: {c} max_abs {p.max_abs:.2e} > {max_abs:.0e}"
           for c, p in report.components.items() if max_abs is not None and not p.max_abs <= max_abs]
    out += [f"{report.name}: {c} rel_l2 {p.rel_l2:.2e} > {max_rel_l2:g}"
            for c, p in report.components.items() if max_rel_l2 is not None and not p.rel_l2 <= max_rel_l2]
    for c, bound in (min_output_psnr or {}).items():
        psnr = report.alone[c].psnr_db if c in report.alone else -math.inf
        if not psnr >= bound:
            out.append(f"{report.name}: {c} alone: output PSNR {psnr:.2f} dB < {bound:g} dB")
    if not report.end_to_end.psnr_db >= min_psnr:
        out.append(f"{report.name}: end-to-end PSNR {report.end_to_end.psnr_db:.2f} dB < {min_psnr} dB")
    if report.tiled is not None and not report.tiled.psnr_db >= min_psnr:
        out.append(f"{report.name}: tiled PSNR {report.tiled.psnr_db:.2f} dB < {min_psnr} dB (vs the tiled reference)")
    return out
