"""A CPU precision that pays: int8 graphs for onnxruntime's CPU kernels (``--target cpu``) against
PyTorch fp32, onnxruntime fp32 and the TensorRT-oriented int8 (``--target gpu``), side by side.

Time, on the full SD 2.1 shapes (random weights: time does not depend on them): the PiSA-SR
components a 512x512 tile runs (VAE encoder on the 512x512 image, UNet and VAE decoder on the
64x64 latent), exported by srexport, quantized by srexport's own ``calibration.int8`` with each
target's scheme (ranges from random inputs, enough for timing), each onnxruntime graph with its
attention fused as the runtime runs it. All variants of a component are timed in one loop,
alternated, after a warm-up (medians). End to end = the sum of the three graphs (the pre- and
post-processing around them is milliseconds).

Error, on the trained demo: ``srexport build --precision int8 --target cpu`` as a user runs it
(calibrated on the built-in photos); the build measures its pipeline against the fp32 PyTorch
reference on 4 images (checks.precision), which is what is reported.

    python benchmarks/cpu_int8.py [--iters 2] [--scratch DIR]

Writes benchmarks/results/cpu_int8_cpu<N>.json. Needs ~14 GB RAM and ~20 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(Path(__file__).parent))
from s3diff_lora_cost import interleaved_seconds  # noqa: E402  (the same alternation)

TILE = 512  # output pixels (a Geometry is in image pixels): the 64x64-latent tile
# Calibrated at a smaller size: ranges from random inputs only need to be plausible for timing, and
# onnxruntime's calibrator holds every Conv output at once (the full decoder at 512 px: killed, >20 GB)
CALIBRATION_PX = 256
CALIBRATION_SAMPLES = 2


def full_size_graphs(scratch: Path) -> tuple[dict, dict]:
    """SD 2.1-shaped PiSA-SR components (random weights): modules and their exported fp32 graphs."""
    from srexport.export.build import TRACE_GEOMETRY
    from srexport.export.onnx_export import export_onnx
    from srexport.export.pisa_recipe import pisa_specs
    from srexport.models.base import build_base
    from srexport.models.pisa import make_demo_checkpoint
    from srexport.models.pisa_reference import PisaReference, PisaSettings

    base = build_base("sd21", seed=0)
    reference = PisaReference(base, make_demo_checkpoint(base.unet, rank=4, seed=0), PisaSettings())
    modules, specs = reference.components(), pisa_specs(PisaSettings())
    for name, spec in specs.items():
        path = scratch / f"{name}.onnx"
        if not path.exists():
            t = time.perf_counter()
            export_onnx(modules[name], spec, path, TRACE_GEOMETRY)
            print(f"exported {name} in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    return {n: modules[n] for n in specs}, specs


def quantized(fp32: Path, spec, target: str, work: Path) -> Path:
    """The component quantized for ``target`` by srexport's own quantizer, fused for onnxruntime."""
    import onnx

    from srexport.calibration.int8 import activation_ranges, quantize_int8, sensitive_nodes
    from srexport.export.onnx_export import save_model
    from srexport.artifact.specs import Geometry

    out = work / f"{fp32.stem}.int8-{target}.onnx"
    if out.exists():
        return out
    t = time.perf_counter()
    feeds = [spec.sample_inputs(Geometry(1, CALIBRATION_PX, CALIBRATION_PX), seed=10 + i)
             for i in range(CALIBRATION_SAMPLES)]
    samples = {n: np.concatenate([f[n].numpy() for f in feeds]) for n in spec.input_names}
    ranges = work / f"{fp32.stem}.ranges.json"
    activation_ranges(fp32, samples, work, cache=ranges)
    excluded = sensitive_nodes(onnx.load(str(fp32), load_external_data=False))
    large = Path(str(fp32) + ".data").exists()
    model = quantize_int8(fp32, out, ranges, exclude=list(excluded), large=large, target=target)
    save_model(model, out)
    print(f"quantized {fp32.stem} for {target} in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    return out


def fused(path: Path) -> Path:
    import onnx

    from srexport.export.attention_fusion import fuse_attention

    out = path.with_name(path.stem + ".ort.onnx")
    if not out.exists():
        model, _ = fuse_attention(onnx.load(str(path), load_external_data=False))
        onnx.save_model(model, str(out))  # external weights stay shared with ``path``
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    peak = float(b.max() - b.min())
    return float(10 * np.log10(peak ** 2 / max(float(np.mean((a - b) ** 2)), 1e-30)))


def time_component(name: str, module, spec, graphs: dict[str, Path], iters: int) -> dict:
    from srexport.artifact.specs import Geometry
    from srexport.runtime.runners import OnnxRuntimeRunner, TorchRunner

    feeds = spec.sample_inputs(Geometry(1, TILE, TILE), seed=0)
    calls = {"torch fp32": TorchRunner(module, spec)}
    calls.update({variant: OnnxRuntimeRunner(fused(path), spec) for variant, path in graphs.items()})
    out = spec.output_names[0]
    with torch.no_grad():
        reference = calls["torch fp32"](feeds)[out].numpy()
        error = {v: round(psnr(r(feeds)[out].numpy(), reference), 2) for v, r in calls.items() if v != "torch fp32"}
        print(f"timing {name}: {', '.join(calls)}", file=sys.stderr, flush=True)
        times = interleaved_seconds({v: (lambda r=r: r(feeds)) for v, r in calls.items()}, iters)
    return {"seconds": times, "median_s": {v: statistics.median(t) for v, t in times.items()},
            "psnr_vs_torch_fp32_random_weights": error}


def demo_error(scratch: Path) -> dict:
    """The trained demo built as a user builds it for the CPU; the build's own measurement (the GPU
    target's is the README's precision table, benchmarks/precision_table.py)."""
    out = {}
    for target in ("cpu",):
        folder = scratch / f"demo-int8-{target}"
        if not (folder / "manifest.json").exists():
            print(f"building the demo int8 --target {target}", file=sys.stderr, flush=True)
            subprocess.run([sys.executable, "-m", "srexport.cli", "build", "--precision", "int8", "--target", target,
                            "--out", str(folder), "--force", "--quiet"], check=True)
        checks = json.loads((folder / "manifest.json").read_text())["checks"]["precision"]
        out[target] = {way: checks[way]["end_to_end"] for way in checks["ways"]} | {"inputs": checks["inputs"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "srexport-cpu-int8")
    ap.add_argument("--skip-demo", action="store_true", help="time only (no demo builds)")
    args = ap.parse_args()
    from srexport.cpu_rates import measure_cpu_rates

    args.scratch.mkdir(parents=True, exist_ok=True)
    rates = measure_cpu_rates()
    modules, specs = full_size_graphs(args.scratch)
    components = {}
    for name, spec in specs.items():
        fp32 = args.scratch / f"{name}.onnx"
        graphs = {"ort fp32": fp32, "ort int8 --target gpu": quantized(fp32, spec, "gpu", args.scratch),
                  "ort int8 --target cpu": quantized(fp32, spec, "cpu", args.scratch)}
        components[name] = time_component(name, modules[name], spec, graphs, args.iters)
        print(json.dumps(components[name]["median_s"]), file=sys.stderr, flush=True)
    variants = list(next(iter(components.values()))["median_s"])
    total = {v: sum(c["median_s"][v] for c in components.values()) for v in variants}
    speedup = {v: round(total["torch fp32"] / total[v], 2) for v in variants}
    per_component = {n: {v: round(c["median_s"]["torch fp32"] / c["median_s"][v], 2) for v in variants}
                     for n, c in components.items()}
    report = {
        "benchmark": "int8 for onnxruntime's CPU kernels vs PyTorch fp32, full SD 2.1-shaped PiSA-SR components at a "
                     "512x512 tile (random weights), and the trained demo's end-to-end error per int8 target",
        "date": time.strftime("%Y-%m-%d"), "iters": args.iters, "tile_px": TILE, "cpu_rates": rates,
        "machine": {"host": platform.node(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__},
        "components": components, "end_to_end_s": total,
        "end_to_end_speedup_vs_torch_fp32": speedup, "component_speedup_vs_torch_fp32": per_component,
        "demo_error_vs_fp32_reference": None if args.skip_demo else demo_error(args.scratch),
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"cpu_int8_cpu{os.cpu_count()}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"end_to_end_s": total, "speedup": speedup, "per_component": per_component,
                      "demo": report["demo_error_vs_fp32_reference"]}, indent=2))
    print(path)


if __name__ == "__main__":
    main()
