"""What keeping S3Diff's LoRA dynamic costs: dynamic vs fixed-degradation UNet graphs.

Full SD 2.1 / SD-Turbo-shaped UNet with random weights and a rank-32 random
S3Diff checkpoint (latency does not depend on the weights). Both graphs are
the real exported ones (CFG batched as 2B, DDPM step inside), timed side by
side in one run with onnxruntime (CPU) and PyTorch eager, at one latent size.

    python benchmarks/s3diff_lora_cost.py [--size 512] [--iters 3]

Writes benchmarks/results/s3diff_lora_cost_cpu<N>.json. Needs ~14 GB RAM.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def make_reference(arch: str, degradation):
    from srexport.models.base import build_base
    from srexport.models.s3diff.checkpoint import S3DiffCheckpoint
    from srexport.models.s3diff.demo import build_demo_checkpoint, build_demo_de_net
    from srexport.models.s3diff.reference import S3DiffReference

    base = build_base(arch, seed=0)
    ckpt = S3DiffCheckpoint.from_dict(build_demo_checkpoint(seed=0, arch=arch))
    return S3DiffReference(base, ckpt, build_demo_de_net(), degradation=degradation)


def interleaved_seconds(calls: dict, iters: int) -> dict[str, list[float]]:
    """Time each call ``iters`` times, alternating between them, after one warm-up each.

    Alternation spreads any drift in machine load evenly over the variants, so
    their ratio stays meaningful on a busy machine.
    """
    for fn in calls.values():
        fn()  # warm-up: allocations, onnxruntime's first-run optimisations
    times = {name: [] for name in calls}
    for _ in range(iters):
        for name, fn in calls.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


def export_variant(mode: str, degradation, args, scratch: Path):
    from srexport.export.build import TRACE_GEOMETRY
    from srexport.export.onnx_export import export_onnx
    from srexport.export.s3diff_recipe import S3DiffSettings, s3diff_specs

    t = time.perf_counter()
    reference = make_reference(args.arch, degradation)
    spec = s3diff_specs(S3DiffSettings(degradation=degradation))["unet"]
    module = reference.components()["unet"]
    path = scratch / f"unet_{mode}.onnx"
    export_onnx(module, spec, path, TRACE_GEOMETRY)
    print(f"{mode}: built and exported in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    return spec, module, path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sd21", choices=["sd21", "demo"])
    ap.add_argument("--size", type=int, default=512, help="output-resolution pixels (latent = size/8)")
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    from srexport.artifact.specs import Geometry
    from srexport.runtime.runners import OnnxRuntimeRunner, TorchRunner

    variants = {"dynamic": None, "fixed": (0.3, 0.6)}
    with tempfile.TemporaryDirectory(prefix="s3diff-lora-cost-") as tmp:
        exported = {m: export_variant(m, d, args, Path(tmp)) for m, d in variants.items()}
        feeds = {}
        for mode, (spec, _, _) in exported.items():
            sample = spec.sample_inputs(Geometry(1, args.size, args.size), seed=0)
            if "scores" in sample:
                sample["scores"] = torch.tensor([[0.3, 0.6]])
            feeds[mode] = sample
        runners = {m: TorchRunner(module, spec) for m, (spec, module, _) in exported.items()}
        torch_times = interleaved_seconds({m: (lambda m=m: runners[m](feeds[m])) for m in variants}, args.iters)
        outputs = {m: runners[m](feeds[m])["denoised"] for m in variants}
        del runners
        for mode in variants:
            exported[mode] = (exported[mode][0], None, exported[mode][2])
        gc.collect()
        runners = {m: OnnxRuntimeRunner(path, spec) for m, (spec, _, path) in exported.items()}
        ort_times = interleaved_seconds({m: (lambda m=m: runners[m](feeds[m])) for m in variants}, args.iters)
        agreement = float((outputs["dynamic"] - outputs["fixed"]).abs().max())
        results = {m: {"torch_s": torch_times[m], "onnxruntime_s": ort_times[m],
                       "graph_mib": round(sum(p.stat().st_size for p in Path(tmp).glob(f"unet_{m}.onnx*")) / 2**20, 1),
                       "inputs": exported[m][0].input_names} for m in variants}
    med = {m: {k: statistics.median(v) for k, v in r.items() if k.endswith("_s")} for m, r in results.items()}
    ratios = {k: med["dynamic"][k] / med["fixed"][k] for k in med["fixed"]}
    out = {
        "benchmark": "S3Diff UNet graph (CFG as 2B, DDPM step inside): dynamic LoRA vs LoRA merged for fixed scores",
        "arch": args.arch, "latent": [args.size // 8] * 2, "batch": 1, "iters": args.iters,
        "machine": {"host": platform.node(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "results": results, "median_s": med, "dynamic_over_fixed": ratios,
        "torch_max_abs_dynamic_vs_fixed": agreement,
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"s3diff_lora_cost_{args.arch}_cpu{os.cpu_count()}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({"median_s": med, "dynamic_over_fixed": ratios}, indent=2))
    print(path)


if __name__ == "__main__":
    main()
