"""A build's precision step: fp32 graphs -> fp16 or int8 graphs, and their error measured.

``build`` exports and checks the fp32 graphs first; then ``convert_graphs``
replaces them, in the artifact's temporary folder, by the chosen precision's:

- ``fp16``: ``fp16.convert_to_fp16``; nodes whose fp32 activations, measured on
  the calibration tiles, come near fp16's range stay fp32 as well.
- ``int8``: ``int8.quantize_int8`` calibrated on the captured component inputs
  (``capture``), then int8 + fp16.

and measures the result against the fp32 PyTorch reference, per component
(each graph fed the reference's own inputs for it: no compounding; and the
output with that graph alone converted, which the per-component bound is on)
and end to end (PSNR, SSIM), on the built-in sample and the held-out photos. Two numbers
are kept for each: ``onnxruntime_cpu`` (what ``srexport check --backend ort``
reproduces; onnxruntime's CPU provider has no fp16 Conv/MatMul and computes
whole fp16 regions in fp32, so it under-states fp16 error) and
``fp16_rounding`` (the graph's fp32 twin that rounds every fp16 tensor, as
fp16 kernels with fp32 accumulation on a GPU do); the bounds hold on both.
A NaN or Inf anywhere fails the build.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from ..errors import QualityError, UserError
from ..models.group_norm_stats import TWO_PASS_COMPONENTS, add_whole_image_stats, graph_modules, statistics_nodes
from ..models.pisa_branches import coefficient_nodes
from .capture import CalibrationSettings, builtin_photos_available

from ..artifact.precisions import DEFAULT_PRECISION, GRAPH_PRECISIONS as PRECISIONS  # noqa: F401
from ..artifact.precisions import PRECISIONS as _REGISTRY, bounds_for
from .int8 import INT8_TARGETS
IO_DTYPE = "float32"  # every precision: graphs take and return float32 (Casts inside)
FP16_SCAN_TILES = 8  # fp16 needs activation ranges only: fewer tiles than int8's calibration

def component_output_bounds(bounds: dict) -> dict[str, float]:
    """Component -> least output PSNR with that graph alone converted (none for fp32, and for
    artifacts built before these bounds: they bound rel L2)."""
    return {c: b["min_output_psnr"] for c, b in bounds.get("components", {}).items()}


@dataclass(frozen=True)
class PrecisionOptions:
    precision: str = DEFAULT_PRECISION
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    method: str = "minmax"  # int8 activation ranges: minmax | percentile | entropy
    held_out_lr: int = 64  # LR side of the held-out crops the error is measured on
    exclude: tuple[str, ...] = ()  # extra int8 exclusions (node-name regexes)
    target: str = "gpu"  # int8: the runtime the graphs are made for (calibration.int8.INT8_TARGETS)

    def validate(self) -> "PrecisionOptions":
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.target not in INT8_TARGETS:
            raise UserError(f"--target {self.target!r} is not one of {', '.join(INT8_TARGETS)}")
        if self.target == "cpu" and self.precision != "int8":
            why = ("fp32 graphs are the same for every target" if self.precision == "fp32" else
                   "onnxruntime's CPU provider runs fp16 through casts, slower than fp32")
            raise UserError(f"--target cpu has no {self.precision} variant ({why}); use --precision int8 "
                            "--target cpu, or drop --target")
        self.calibration.validate()
        if self.precision == "int8" and self.calibration.builtin and not builtin_photos_available():
            raise UserError("int8 calibration on the built-in photos needs scikit-image (pip install scikit-image, "
                            "or pip install -e '.[calib]'), or pass --calib FOLDER of your own photos")
        if self.method not in ("minmax", "percentile", "entropy"):
            raise UserError(f"calibration method {self.method!r} is not minmax, percentile or entropy")
        return self


# --- conversion ---------------------------------------------------------------


def _graph_files(folder: Path, name: str) -> list[Path]:
    from ..export.onnx_export import data_file_name

    graph = folder / f"{name}.onnx"
    return [p for p in (graph, folder / data_file_name(graph.name)) if p.exists()]


def _large(path: Path) -> bool:
    from ..export.onnx_export import PROTOBUF_LIMIT, data_file_name

    data = path.with_name(data_file_name(path.name))
    return data.exists() and data.stat().st_size > PROTOBUF_LIMIT // 2


def _range_cache(calibration: dict | None, fp32_path: Path, kind: str) -> Path | None:
    """Activation ranges live beside the cached inputs they came from, per graph (sha256) and kind."""
    from ..artifact.manifest import sha256_of
    from .cache import cache_root

    if not calibration or "cache_key" not in calibration:
        return None
    return cache_root() / calibration["cache_key"] / f"ranges-{sha256_of(fp32_path)[:16]}-{kind}.json"


def _set_graph(folder: Path, manifest: dict, name: str, model: onnx.ModelProto) -> None:
    """Write a component's graph and point the manifest's file entries at what was written."""
    from ..artifact.manifest import ORT_GRAPH
    from ..export.onnx_export import data_file_name, save_model

    for path in _graph_files(folder, name):
        manifest["files"].pop(path.name, None)
    written = save_model(model, folder / f"{name}.onnx")
    files = manifest["components"][name]["files"]
    if ORT_GRAPH in files:  # the old graph's fused twin is no twin of the new one
        twin = files.pop(ORT_GRAPH)
        manifest["files"].pop(twin, None)
        (folder / twin).unlink(missing_ok=True)
    files.pop("onnx_data", None)
    for path in written:
        manifest["files"][path.name] = {"path": path.name}
    if len(written) > 1:
        files["onnx_data"] = data_file_name(f"{name}.onnx")


def convert_graphs(folder: Path, manifest: dict, reference, options: PrecisionOptions, progress) -> dict:
    """Replace the fp32 graphs in ``folder`` by ``options.precision``'s; fill the manifest's
    export and checks sections; return the precision record."""
    from ..artifact.specs import ComponentSpec
    from .capture import calibration_inputs
    from .fp16 import FP32_OPS, activation_peaks, convert_to_fp16, fp32_nodes, overflow_nodes
    from .int8 import INT8_SCHEMES, QDQ_OPSET, activation_ranges, quantize_int8, qdq_summary, sensitive_nodes

    folder = Path(folder)
    precision = options.precision
    specs = {n: ComponentSpec.from_dict(c["spec"]) for n, c in manifest["components"].items()}
    export = manifest["export"]
    export.update(precision=precision, io_dtype=IO_DTYPE)
    manifest["checks"]["bounds"] = bounds_for(precision, specs)
    if precision == "fp32":
        return {}

    fp32_dir = folder / ".fp32"
    fp32_dir.mkdir()
    for name in specs:
        for path in _graph_files(folder, name):
            path.rename(fp32_dir / path.name)

    # Calibration: the fp32 reference's inputs to every component on photo tiles, at the
    # runtime's tile shape when the artifact has one.
    settings = options.calibration
    if settings.lr_tile is None:
        import dataclasses

        from .capture import DEFAULT_LR_TILE

        tile = manifest.get("tiling", {}).get("tile")  # the denoiser's tile, output pixels
        scale = manifest["processing"]["scale"]
        settings = dataclasses.replace(settings, lr_tile=max(8, min(128, tile // scale)) if tile else DEFAULT_LR_TILE)
    use_photos = not settings.builtin or builtin_photos_available()
    if precision == "fp16" and settings.size > FP16_SCAN_TILES:
        import dataclasses

        settings = dataclasses.replace(settings, size=FP16_SCAN_TILES)
    calibration = None
    if use_photos:
        t = time.perf_counter()
        inputs, calibration = calibration_inputs(reference, specs, settings, manifest["model"],
                                                 manifest["processing"]["scale"], progress.note)
        progress.note(f"calibration: {settings.size} tiles of {settings.lr_tile}x{settings.lr_tile} LR from "
                      f"{calibration['source']} ({'cached' if calibration['cache_hit'] else 'captured'}, "
                      f"{time.perf_counter() - t:.1f} s; key {calibration['cache_key'][:12]})")
    else:
        from ..samples import SAMPLE_NAME, sample_image

        env, _ = reference.stage_tensors(sample_image())
        add_whole_image_stats(env, graph_modules(reference), specs)
        inputs = {c: {n: env[n].float().numpy() for n in spec.input_names} for c, spec in specs.items()}
        calibration = {"source": SAMPLE_NAME + " only (scikit-image not installed: no built-in photos)", "size": 1}
        progress.note("calibration: scikit-image is not installed, so fp16's activation scan uses the sample "
                      "image only (pip install scikit-image for the built-in photos)")

    details: dict[str, dict] = {}
    for name, spec in specs.items():
        t = time.perf_counter()
        made = _REGISTRY[precision].for_stage(spec.stage).name  # int8 builds keep some stages fp16
        if made == "fp16" and options.target == "cpu":  # ... in fp32 on CPU, where fp16 is slower
            made = "fp32"
        fp32_path = fp32_dir / f"{name}.onnx"
        large = _large(fp32_path)
        work = folder / f".work-{name}"
        work.mkdir()
        try:
            if made == "fp32":
                model = onnx.load(str(fp32_path), load_external_data=True)
                details[name] = {"precision": f"fp32 ({_REGISTRY[precision].stage_precisions[spec.stage][1]})",
                                 "fp32_ops": {}}
                note = "kept fp32"
            elif made == "fp16":
                peaks = activation_peaks(fp32_path, inputs[name], _range_cache(calibration, fp32_path, "peaks"))
                peak = max(peaks.values(), default=0.0)
                model = onnx.load(str(fp32_path), load_external_data=True)
                keep = overflow_nodes(model, peaks)
                statistics = statistics_nodes(model) if name in TWO_PASS_COMPONENTS else []
                mixing = coefficient_nodes(model)  # an adjustable UNet's (a, b) multiplies stay fp32
                model = convert_to_fp16(model, sorted(set(keep) | set(statistics) | set(mixing)), large=large)
                details[name] = {"kept_fp32_nodes": keep, "fp32_ops": fp32_nodes(model),
                                 "fp32_activation_peak": round(peak, 3)}
                if statistics:
                    details[name]["groupnorm_statistics_fp32_nodes"] = len(statistics)
                if mixing:
                    details[name]["lora_coefficient_fp32_nodes"] = len(mixing)
                if made != precision:
                    details[name]["precision"] = f"{made} ({_REGISTRY[precision].stage_precisions[spec.stage][1]})"
                note = (f"largest fp32 activation {peak:.3g}; kept fp32: {sum(details[name]['fp32_ops'].values())} "
                        f"nodes ({', '.join(sorted(details[name]['fp32_ops']))})"
                        + (f", {len(keep)} for range" if keep else ""))
            else:
                model = onnx.load(str(fp32_path), load_external_data=False)
                excluded = sensitive_nodes(model, options.exclude)
                del model
                cache = _range_cache(calibration, fp32_path, f"int8-{options.method}") or work / "ranges.json"
                activation_ranges(fp32_path, inputs[name], work, method=options.method, cache=cache)
                graph = onnx.load(str(fp32_path), load_external_data=False)
                keep = (statistics_nodes(graph) if name in TWO_PASS_COMPONENTS else []) + coefficient_nodes(graph)
                del graph
                model = quantize_int8(fp32_path, folder / f"{name}.onnx", cache, exclude=list(excluded),
                                      method=options.method, large=large, keep_fp32=keep, target=options.target)
                summary = qdq_summary(model, options.target)
                if summary["problems"]:
                    raise RuntimeError(f"int8 graph {name} breaks the {options.target} target's Q/DQ rules: "
                                       f"{summary['problems'][:3]}")
                reasons: dict[str, int] = {}
                for reason in excluded.values():
                    reasons[reason] = reasons.get(reason, 0) + 1
                details[name] = {"quantized_layers": summary["quantized_layers"],
                                 "excluded": {"count": len(excluded), "by_reason": reasons},
                                 "fp32_ops": fp32_nodes(model)}
                note = (f"int8 layers {sum(summary['quantized_layers'].values())} "
                        f"({', '.join(f'{k} {v}' for k, v in summary['quantized_layers'].items() if v)}), "
                        f"{len(excluded)} kept in float")
            _set_graph(folder, manifest, name, model)
            del model
        finally:
            shutil.rmtree(work, ignore_errors=True)
        size = sum(p.stat().st_size for p in _graph_files(folder, name)) / 2**20
        progress.note(f"{name}.onnx ({made}) {size:.1f} MiB, {time.perf_counter() - t:.1f} s: {note}")

    import importlib.metadata as md

    export["fp32_ops"] = {op: why for op, why in FP32_OPS.items()
                          if any(op in d["fp32_ops"] for d in details.values())}
    export["fp16_converter"] = f"onnxconverter-common {md.version('onnxconverter-common')} (keep_io_types)"
    if precision == "int8":
        if options.target == "gpu":
            export["opset"] = QDQ_OPSET
        export["int8"] = {
            "quantizer": f"onnxruntime {md.version('onnxruntime')} quantize_static, QDQ",
            "target": options.target, "scheme": INT8_SCHEMES[options.target],
            "activation_ranges": options.method, "calibration": calibration}
    shutil.rmtree(fp32_dir)
    record = {"precision": precision, "components": details, "calibration": calibration}
    return record


# --- measurement --------------------------------------------------------------


def emulated_dir(folder: Path, manifest: dict, out: Path) -> Path:
    """Write the fp16-rounding twins of an artifact's graphs into ``out``."""
    from ..export.onnx_export import save_model
    from .fp16 import emulate_fp16

    out.mkdir(parents=True, exist_ok=True)
    for name, component in manifest["components"].items():
        path = folder / manifest["files"][component["files"]["onnx"]]["path"]
        save_model(emulate_fp16(onnx.load(str(path), load_external_data=True)), out / f"{name}.onnx")
    return out


def measurement_inputs(scale: int, held_out_lr: int) -> list[tuple[str, torch.Tensor]]:
    from ..samples import SAMPLE_NAME, sample_image
    from .capture import held_out_inputs

    images = [(SAMPLE_NAME, sample_image())]
    if builtin_photos_available():
        images += held_out_inputs(scale, held_out_lr)
    return images


def _db(p) -> float | None:
    return None if math.isinf(p.psnr_db) else round(p.psnr_db, 3)  # None: identical (JSON has no inf)


def _min_db(*values: float | None) -> float | None:
    return min((v for v in values if v is not None), default=None)


def measure(pipelines: dict, reference, images: list[tuple[str, torch.Tensor]]) -> dict:
    """Per way of running (``onnxruntime_cpu``, ``fp16_rounding``): per component worst rel L2 /
    max abs of its own output and worst output PSNR with it alone converted, end to end worst
    PSNR / SSIM, and every image's numbers. Non-finite output raises.

    As ``srexport check`` (checking.check_image): each graph gets the reference's own inputs for
    it; the reference runs once per image for all ways."""
    from ..checking import check_image, expected_for

    per_image: dict[str, list] = {way: [] for way in pipelines}
    for name, lr in images:
        expected = expected_for(next(iter(pipelines.values())), reference, lr)
        for way, pipeline in pipelines.items():
            r = check_image(pipeline, reference, lr, name, expected, each_alone=True)
            bad = [c for c, p in r.components.items() if not math.isfinite(p.max_abs)]
            if bad or not math.isfinite(r.end_to_end.max_abs):
                raise QualityError(f"{way}: NaN or Inf in {', '.join(bad) or 'the output'} on {name}; the "
                                   "converted graphs overflow (keep more in fp32, or build --precision fp32)")
            per_image[way].append({
                "image": name, "output_shape": list(r.output_shape),
                "components": {c: {"rel_l2": p.rel_l2, "max_abs": p.max_abs, "output_psnr_db": _db(r.alone[c])}
                               for c, p in r.components.items()},
                "end_to_end": {"psnr_db": round(r.end_to_end.psnr_db, 3), "ssim": round(r.ssim, 5),
                               "max_abs": r.end_to_end.max_abs}})
    result = {}
    for way, entries in per_image.items():
        components = {}
        for entry in entries:
            for c, p in entry["components"].items():
                worst = components.setdefault(c, {"rel_l2": 0.0, "max_abs": 0.0, "output_psnr_db": None})
                worst["rel_l2"], worst["max_abs"] = max(worst["rel_l2"], p["rel_l2"]), max(worst["max_abs"], p["max_abs"])
                worst["output_psnr_db"] = _min_db(worst["output_psnr_db"], p["output_psnr_db"])
        psnrs = [e["end_to_end"]["psnr_db"] for e in entries]
        ssims = [e["end_to_end"]["ssim"] for e in entries]
        result[way] = {"components": components,
                       "end_to_end": {"min_psnr_db": min(psnrs), "mean_psnr_db": round(float(np.mean(psnrs)), 3),
                                      "min_ssim": min(ssims), "mean_ssim": round(float(np.mean(ssims)), 5)},
                       "images": entries}
    return result


def bound_failures(result: dict, bounds: dict) -> list[str]:
    problems = []
    rel = bounds.get("component_rel_l2")  # artifacts built before per-component output bounds
    alone = component_output_bounds(bounds)
    for way, r in result.items():
        for c, p in r["components"].items():
            if rel is not None and not p["rel_l2"] <= rel:
                problems.append(f"{way}: {c} rel_l2 {p['rel_l2']:.2e} > {rel:g}")
            psnr = math.inf if p.get("output_psnr_db") is None else p["output_psnr_db"]
            if c in alone and not psnr >= alone[c]:
                problems.append(f"{way}: {c} alone: output PSNR {psnr:.2f} dB < {alone[c]:g} dB")
        if not r["end_to_end"]["min_psnr_db"] >= bounds["end_to_end_min_psnr"]:
            problems.append(f"{way}: end-to-end PSNR {r['end_to_end']['min_psnr_db']:.2f} dB "
                            f"< {bounds['end_to_end_min_psnr']} dB")
    return problems


def measure_artifact_folder(folder: Path, manifest: dict, reference, options: PrecisionOptions, progress,
                            enforce: bool = True) -> dict:
    """The converted graphs in ``folder`` against the fp32 reference; raises on NaN/Inf, and on a
    missed bound when ``enforce`` (a build; the record lists them either way)."""
    from ..artifact.manifest import Artifact
    from ..runtime.pipeline import SRPipeline
    from ..runtime.runners import ort_runners

    images = measurement_inputs(manifest["processing"]["scale"], options.held_out_lr)
    twin = emulated_dir(folder, manifest, folder / ".fp16-rounding")
    try:
        # whole images: the error of a precision, not of tiling (measured apart)
        pipelines = {"onnxruntime_cpu": SRPipeline(manifest, ort_runners(Artifact(folder, manifest)), tiled=False),
                     "fp16_rounding": SRPipeline(manifest, ort_runners(Artifact(twin, manifest), attention="plain"),
                                                   tiled=False)}
        result = measure(pipelines, reference, images)
    finally:
        shutil.rmtree(twin, ignore_errors=True)
    for way, r in result.items():
        comps = "  ".join(f"{c} {p['rel_l2']:.2e}" for c, p in r["components"].items())
        alone = "  ".join(f"{c} {p['output_psnr_db']}" for c, p in r["components"].items())
        e = r["end_to_end"]
        progress.note(f"{way:<16} rel_l2 {comps}")
        progress.note(f"{'':<16} output PSNR min with each graph alone (dB): {alone}  |  end to end PSNR min "
                      f"{e['min_psnr_db']:.2f} / mean {e['mean_psnr_db']:.2f} dB, SSIM min {e['min_ssim']:.4f}")
    progress.note(f"on {len(images)} images: " + "; ".join(n for n, _ in images))
    bounds = manifest["checks"]["bounds"]
    problems = bound_failures(result, bounds)
    if problems and enforce:
        fix = ("build --precision fp16 or fp32 instead, or calibrate on more photos with --calib DIR "
               "--calib-size N" if options.precision == "int8" else "build --precision fp32 instead")
        raise QualityError(f"{options.precision} graphs miss their bounds against the fp32 reference: "
                           + "; ".join(problems[:4]) + f"; nothing was written ({fix})")
    return {"against": "fp32 PyTorch reference", "inputs": [n for n, _ in images],
            "ways": {"onnxruntime_cpu": "onnxruntime CPU on the artifact's graphs (fp16 regions run in fp32)",
                     "fp16_rounding": "the graphs' fp32 twins rounding every fp16 tensor (GPU-like fp16)"},
            **result, "bound_failures": problems}
