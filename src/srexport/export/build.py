"""``srexport build``: reference -> graphs -> checks -> manifest, atomically.

Every build verifies what it wrote: each graph against the PyTorch module it
came from at two shapes, the whole ONNX pipeline against the reference on
the built-in sample photo, and (PiSA-SR) merged against exact guidance. The
numbers go into the manifest; a graph off by more than its bound fails the
build and nothing is left behind.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from ..errors import UserError
from ..parity import compare, worst as worst_of
from ..samples import SAMPLE_NAME, sample_image
from ..artifact.manifest import FORMAT_VERSION, Artifact, atomic_folder, load_artifact, write_manifest
from .attention_fusion import write_fused_graphs
from .onnx_export import OPSET, data_file_name, export_onnx
from ..artifact.tile_settings import TWO_PASS_NORMS, TilingSettings, tiling_section
from ..artifact.specs import ComponentSpec, Geometry

# Shapes the graphs are traced and checked at. The trace shape has a latent
# size that is not a multiple of 8, so the UNet's skip-connection upsampling
# is traced with explicit output sizes and the graph runs at any size.
TRACE_GEOMETRY = Geometry(batch=2, height=96, width=160)
CHECK_GEOMETRIES = (Geometry(batch=1, height=64, width=64), Geometry(batch=2, height=96, width=160))
# fp32 graph vs its module, relative L2: scale-free, so it holds for the demo and
# for full-size SD 2.1 graphs alike (the tests hold the demo to 1e-4 max abs).
COMPONENT_MAX_REL_L2 = 1e-4
END_TO_END_MIN_PSNR = 50.0


class Progress:
    """Numbered steps on stderr; each step's own duration is printed when it ends (at the next
    step or at ``done``), so no number reads as a duration that is not one."""

    def __init__(self, total: int, quiet: bool = False):
        self.total, self.step, self.quiet = total, 0, quiet
        self.start = self.step_start = time.perf_counter()

    def __call__(self, message: str, started: float | None = None) -> None:
        """A new step; ``started`` (perf_counter) when it began before this line is printed."""
        self._close_step()
        if started is not None:
            self.step_start = started
        self.step += 1
        if not self.quiet:
            print(f"[{self.step}/{self.total}] {message}", file=sys.stderr, flush=True)

    def _close_step(self) -> None:
        now = time.perf_counter()
        if self.step and not self.quiet:
            print(f"      step {self.step} took {now - self.step_start:.1f} s", file=sys.stderr, flush=True)
        self.step_start = now

    def done(self) -> None:
        self._close_step()
        if not self.quiet:
            print(f"      done in {time.perf_counter() - self.start:.1f} s", file=sys.stderr, flush=True)

    def note(self, message: str) -> None:
        if not self.quiet:
            print(f"      {message}", file=sys.stderr, flush=True)


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"srexport": __version__, "python": sys.version.split()[0]}
    for name in ("torch", "diffusers", "transformers", "peft", "onnx", "onnxruntime", "onnxslim"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def check_components(modules: dict, specs: dict[str, ComponentSpec], folder: Path, progress: Progress) -> dict:
    """Each ONNX graph against its PyTorch module, at every check geometry."""
    from ..checking import compare_outputs
    from ..runtime.runners import OnnxRuntimeRunner, TorchRunner

    results = {}
    for name, spec in specs.items():
        onnx_runner = OnnxRuntimeRunner(folder / f"{name}.onnx", spec)
        torch_runner = TorchRunner(modules[name], spec)
        feeds = [spec.sample_inputs(geometry, seed=100 + i) for i, geometry in enumerate(CHECK_GEOMETRIES)]
        worst = worst_of(compare_outputs(onnx_runner(f), torch_runner(f)) for f in feeds)
        results[name] = dict(worst.to_dict(), shapes=[dataclasses.asdict(g) for g in CHECK_GEOMETRIES])
        progress.note(f"{name}: onnxruntime vs PyTorch {worst.describe()}")
        if not worst.rel_l2 <= COMPONENT_MAX_REL_L2:
            raise RuntimeError(f"graph {name} differs from its PyTorch module by relative L2 {worst.rel_l2:.2e} "
                               f"(bound {COMPONENT_MAX_REL_L2}); the export is wrong")
    return results


@dataclass
class Recipe:
    """What one model contributes to a build; the steps after it are model-agnostic."""

    reference: torch.nn.Module  # has components(), stage_tensors(lr), processing
    specs: dict[str, ComponentSpec]
    manifest: dict  # model-specific sections: description, model, processing, latent, denoise
    sample_output: torch.Tensor  # the reference's output on the sample image
    checks: dict = field(default_factory=dict)  # model-specific measurements (e.g. merged vs exact)


def write_artifact(recipe: Recipe, out: Path, force: bool, progress: Progress, precision=None,
                   tiling=None, ort_attention: str = "fused") -> Path:
    """Export, check and describe a prepared model into ``out``, atomically.

    ``precision`` (calibration.precision.PrecisionOptions, default fp16): the fp32
    graphs are exported and checked first, then replaced by the chosen precision's,
    whose error against the fp32 reference is measured and recorded. ``ort_attention`` "fused":
    each graph with attention also gets its onnxruntime twin (export.attention_fusion)."""
    from ..calibration.precision import PrecisionOptions, convert_graphs, measure_artifact_folder

    precision = (precision or PrecisionOptions()).validate()
    from ..runtime.pipeline import SRPipeline
    from ..runtime.runners import ort_runners

    from ..models.group_norm_stats import graph_modules, two_pass_specs

    modules = graph_modules(recipe.reference)
    specs = dict(recipe.specs)
    tiling = (tiling or TilingSettings()).validate()  # the manifest's tiling section and its graphs agree
    if tiling.vae_norm in TWO_PASS_NORMS:  # the VAE's two-pass graphs besides the plain ones
        specs.update(two_pass_specs(specs, modules))
    if tiling.unet_norm == "coarse":  # the denoise plan's UNet graphs' statistics and pooled graphs
        terms = [t["component"] for t in recipe.manifest["denoise"]["terms"]]
        specs.update(two_pass_specs(specs, modules, plains=terms))
    with atomic_folder(out, force, note=progress.note) as tmp:
        progress(f"exporting {len(specs)} graphs to ONNX (opset {OPSET})")
        files, components = {}, {}
        for name, spec in specs.items():
            t = time.perf_counter()
            written = export_onnx(modules[name], spec, tmp / f"{name}.onnx", TRACE_GEOMETRY)
            for path in written:
                files[path.name] = {"path": path.name}
            components[name] = {"spec": spec.to_dict(), "files": {"onnx": f"{name}.onnx"}}
            if len(written) > 1:
                components[name]["files"]["onnx_data"] = data_file_name(f"{name}.onnx")
            progress.note(f"{name}.onnx  {sum(p.stat().st_size for p in written) / 2**20:.1f} MiB  "
                          f"{time.perf_counter() - t:.1f} s")

        progress("checking each graph against its PyTorch module (onnxruntime, two shapes)")
        manifest = {"format_version": FORMAT_VERSION, **recipe.manifest, "components": components, "files": files,
                    "export": {"opset": OPSET, "exporter": "torch.onnx (TorchScript-based)", "cleanup": "onnxslim",
                               "description": "graphs over 2 GB keep the exporter's constant folding only, not "
                                              "onnxslim's clean-up (each graph's metadata srexport.cleanup says "
                                              "which)",
                               "precision": "fp32", "io_dtype": "float32"},
                    "versions": versions()}
        manifest["tiling"] = tiling_section(tiling)  # artifact/tile_settings.py: geometry + description
        manifest["checks"] = {"components": check_components(modules, specs, tmp, progress), **recipe.checks}

        progress("checking the whole ONNX pipeline against the PyTorch reference")
        pipeline = SRPipeline(manifest, ort_runners(Artifact(tmp, manifest)), tiled=False)  # as the reference
        end_to_end = compare(pipeline(sample_image()), recipe.sample_output, peak_to_peak=1.0)
        progress.note(f"end to end: {end_to_end.describe()}")
        if end_to_end.psnr_db < END_TO_END_MIN_PSNR:
            raise RuntimeError(f"ONNX pipeline reaches only {end_to_end.psnr_db:.1f} dB against the reference "
                               f"(bound {END_TO_END_MIN_PSNR} dB)")
        manifest["checks"]["end_to_end"] = dict(end_to_end.to_dict(), input=SAMPLE_NAME,
                                                output_size=list(recipe.sample_output.shape[-2:]))
        if precision.precision != "fp32":
            progress(f"converting the graphs to {precision.precision} (the checks above are the fp32 graphs')")
        record = convert_graphs(tmp, manifest, recipe.reference, precision, progress)
        if precision.precision != "fp32":
            progress(f"measuring the {precision.precision} graphs against the fp32 PyTorch reference")
            manifest["checks"]["precision"] = {**record, **measure_artifact_folder(
                tmp, manifest, recipe.reference, precision, progress)}
        if ort_attention == "fused":
            progress("fusing attention for onnxruntime (com.microsoft.MultiHeadAttention), each graph checked "
                     "against its plain twin")
            manifest["checks"]["attention_fusion"] = write_fused_graphs(tmp, manifest, CHECK_GEOMETRIES, progress)
        record_parser_check(tmp, manifest, progress)
        progress("writing manifest.json (sha256 of every file)")
        write_manifest(tmp, manifest)
    load_artifact(out)  # re-read: hashes and format must round-trip
    progress.done()
    return out


def record_parser_check(folder: Path, manifest: dict, progress: Progress) -> None:
    """TensorRT 10/11's ONNX parser, checked statically on every graph the artifact holds (any
    precision) into checks.tensorrt_parser. Recorded, not fatal: onnxruntime runs such a graph;
    building engines from it (--engines, 'srexport engines') refuses it."""
    from .engines import parser_check

    manifest["checks"]["tensorrt_parser"] = results = parser_check(folder, manifest)
    for name, by_major in results.items():
        for major, problems in by_major.items():
            if problems:
                progress.note(f"{name}: {len(problems)} problem(s) for TensorRT {major}'s ONNX parser: {problems[0]}")


BUILD_STEPS = 6  # load, model-specific measurement, export, component checks, end to end, manifest


def build(prepare, source, settings, out: Path, force: bool = False, quiet: bool = False, precision=None,
          tiling=None, ort_attention: str = "fused") -> Path:
    """``prepare(source, loaded, settings, progress) -> Recipe``, then the common steps.

    The source is loaded (and every input validated) before anything is
    printed, so bad input ends with its one-line error alone.
    """
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to replace it or choose another --out")
    converting = precision is None or precision.precision != "fp32"  # default: fp16
    progress = Progress(BUILD_STEPS + 2 * converting + (ort_attention == "fused"), quiet)
    loaded = source.load()
    progress(f"loaded {'the built-in demo' if source.demo else source.base}", started=progress.start)
    return write_artifact(prepare(source, loaded, settings, progress), out, force, progress, precision, tiling,
                          ort_attention)
