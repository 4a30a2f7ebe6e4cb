"""What choosing PiSA-SR's scales per call costs: the adjustable UNet graph against merged weights.

Full SD 2.1-shaped UNet with random weights and a random rank-4 PiSA-SR
checkpoint in the upstream layout (latency does not depend on the weights).
Four ways of computing z0 for one latent, timed side by side in one run,
alternated, with PyTorch eager and onnxruntime (CPU), fp32:

- merged: the plain UNet with W0 + dW_pix + (ls/lp) dW_sem merged in (one call);
- adjustable-merged: the adjustable graph, both LoRA sets as branches, one
  call at (a, b) = (1, ls/lp);
- exact: upstream's two passes, two calls of plain UNets (W_pix, W_sem: the
  merged UNet's shapes, so it is timed as two calls of it);
- adjustable-exact: the adjustable graph, ONE call of batch 2 at (1, 0), (1, 1).

    python benchmarks/pisa_guidance_cost.py [--size 256] [--iters 3]

Writes benchmarks/results/pisa_guidance_cost_<arch>_<size>px_cpu<N>.json. Needs ~18 GB RAM.
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
sys.path.insert(0, str(Path(__file__).parent))
from s3diff_lora_cost import interleaved_seconds  # noqa: E402  (the same alternation)


def make_unets(arch: str):
    """{"merged": (module, spec), "adjustable": (module, spec)} from one base and checkpoint."""
    import copy
    import dataclasses

    from srexport.export.pisa_recipe import pisa_specs
    from srexport.models.base import build_base
    from srexport.models.pisa import make_demo_checkpoint
    from srexport.models.pisa_reference import PisaReference, PisaSettings

    base = build_base(arch, seed=0)
    ckpt = make_demo_checkpoint(base.unet, rank=4, seed=0)
    out = {}
    for guidance in ("merged", "adjustable"):
        settings = PisaSettings(lambda_pix=0.8, lambda_sem=0.5, guidance=guidance)
        unet = base.unet if guidance == "adjustable" else copy.deepcopy(base.unet)
        ref = PisaReference(dataclasses.replace(base, unet=unet), ckpt, settings)
        out[guidance] = (ref.unets["unet"], pisa_specs(settings)["unet"])
        del ref
    # a candidate form: dW_pix merged into the base (a is 1 in both modes), only dW_sem a branch
    from srexport.models.lora import add_deltas
    from srexport.models.pisa import branch_deltas
    from srexport.models.pisa_branches import AdjustableDenoiser, install_branches

    unet = copy.deepcopy(out["merged"][0].unet)
    build = build_base(arch, seed=0)  # W0 again (the merged copy holds W0 + dW_pix + t dW_sem)
    unet.load_state_dict(build.unet.state_dict())
    add_deltas(unet, branch_deltas(ckpt, build.unet, "pix"))
    del build
    coefficients = install_branches(unet, ckpt, branches=("sem",))
    denoiser = AdjustableDenoiser(unet, coefficients, out["merged"][0].prompt_embeds, 1)
    out["sem-branch"] = (denoiser.eval().requires_grad_(False), out["adjustable"][1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sd21", choices=["sd21", "demo"])
    ap.add_argument("--size", type=int, default=256, help="output-resolution pixels (latent = size/8)")
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args()
    from srexport.artifact.guidance import pisa_plan
    from srexport.export.build import TRACE_GEOMETRY
    from srexport.export.onnx_export import export_onnx
    from srexport.runtime.runners import OnnxRuntimeRunner, TorchRunner

    t = time.perf_counter()
    unets = make_unets(args.arch)
    print(f"built in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    side = args.size // 8
    latent = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0))
    merged_ab = pisa_plan("adjustable", "merged", 0.8, 0.5)["terms"][0]["lora_scales"]
    feeds = {
        "merged": {"latent": latent},
        "adjustable-merged": {"latent": latent, "lora_scales": torch.tensor([merged_ab])},
        "adjustable-exact": {"latent": torch.cat([latent, latent]),
                             "lora_scales": torch.tensor([[1.0, 0.0], [1.0, 1.0]])},
    }

    def calls(runners):
        merged, adjustable, sem = runners["merged"], runners["adjustable"], runners["sem-branch"]
        return {"merged": lambda: merged(feeds["merged"]),
                "adjustable-merged": lambda: adjustable(feeds["adjustable-merged"]),
                "sem-branch-merged": lambda: sem(feeds["adjustable-merged"]),
                "exact": lambda: (merged(feeds["merged"]), merged(feeds["merged"])),  # W_pix, then W_sem
                "adjustable-exact": lambda: adjustable(feeds["adjustable-exact"]),
                "sem-branch-exact": lambda: sem(feeds["adjustable-exact"])}

    with tempfile.TemporaryDirectory(prefix="pisa-guidance-cost-") as tmp:
        runners = {k: TorchRunner(module, spec) for k, (module, spec) in unets.items()}
        print("timing PyTorch", file=sys.stderr, flush=True)
        torch_times = interleaved_seconds(calls(runners), args.iters)
        merged_out = runners["merged"](feeds["merged"])["denoised"]
        adjustable_out = runners["adjustable"](feeds["adjustable-merged"])["denoised"]
        agreement = float(((1 - 0.8) * latent + 0.8 * adjustable_out - merged_out).abs().max())
        sem_agreement = float((runners["sem-branch"](feeds["adjustable-merged"])["denoised"] - adjustable_out
                               ).abs().max())
        del runners
        paths = {}
        for kind, (module, spec) in unets.items():
            t = time.perf_counter()
            paths[kind] = Path(tmp) / f"unet_{kind}.onnx"
            export_onnx(module, spec, paths[kind], TRACE_GEOMETRY)
            print(f"{kind}: exported in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
        specs = {k: spec for k, (_, spec) in unets.items()}
        sizes = {k: round(sum(p.stat().st_size for p in Path(tmp).glob(f"unet_{k}.onnx*")) / 2**20, 1)
                 for k in unets}
        del unets
        gc.collect()
        runners = {k: OnnxRuntimeRunner(paths[k], specs[k]) for k in paths}
        print("timing onnxruntime", file=sys.stderr, flush=True)
        ort_times = interleaved_seconds(calls(runners), args.iters)
    med = {k: {"torch_s": statistics.median(torch_times[k]), "onnxruntime_s": statistics.median(ort_times[k])}
           for k in torch_times}
    ratios = {
        "adjustable_merged_over_merged": {b: med["adjustable-merged"][b] / med["merged"][b] for b in med["merged"]},
        "adjustable_exact_over_exact": {b: med["adjustable-exact"][b] / med["exact"][b] for b in med["merged"]},
        "sem_branch_merged_over_merged": {b: med["sem-branch-merged"][b] / med["merged"][b] for b in med["merged"]},
        "sem_branch_exact_over_exact": {b: med["sem-branch-exact"][b] / med["exact"][b] for b in med["merged"]},
    }
    out = {
        "benchmark": "PiSA-SR UNet z0 (fp32, CPU): adjustable graph (LoRA as per-sample branches) vs merged weights",
        "arch": args.arch, "latent": [side, side], "iters": args.iters,
        "scales": {"lambda_pix": 0.8, "lambda_sem": 0.5, "merged_lora_scales": merged_ab},
        "exact_timed_as": "two calls of the merged UNet (W_pix and W_sem have its shapes)",
        "machine": {"host": platform.node(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "seconds": {"torch": torch_times, "onnxruntime": ort_times}, "median_s": med, "ratios": ratios,
        "graph_mib": sizes, "torch_max_abs_adjustable_merged_vs_merged": agreement,
        "torch_max_abs_sem_branch_vs_adjustable": sem_agreement,
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"pisa_guidance_cost_{args.arch}_{args.size}px_cpu{os.cpu_count()}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({"median_s": med, "ratios": ratios}, indent=2))
    print(path)


if __name__ == "__main__":
    main()
