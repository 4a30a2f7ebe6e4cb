"""Old and new default tiling side by side: counted work, CPU time, peak memory and error.

The old default: the fixed plan (full tiles on a stride of tile - overlap, the last one pushed
against the far edge), denoiser tiles 512/128 px at batch 4, VAE tiles 1024/256 px, per-tile VAE
GroupNorm statistics, per-tile UNet statistics. The new default (srexport's ``TilingSettings()``):
the even plan, denoiser tiles of at most 768/64 px at batch 2, VAE tiles of at most 1024/48 px,
coarse VAE and UNet statistics.

One fp32 artifact of the trained demo (built with the new defaults, so it holds the two-pass
and UNet graphs the coarse norms use) runs both: onnxruntime has dynamic shapes, so a pipeline's tiling is
only a choice of grids. For each output size (the astronaut photo's LR at size / 4):

- counted work: computed area over the image's per stage (the statistics pass included) and the
  total at SD 2.1's work per pixel (``artifact.tile_plan.work_ratios``);
- CPU seconds per stage, median of --repeats runs, old and new alternated, after one warm-up run
  each (onnxruntime plans and allocates on a shape's first run);
- peak RSS of one run of each, each in its own fresh process (onnxruntime's arena never shrinks,
  so a process that ran one setting would carry its peak into the other);
- PSNR of the output against the untiled PyTorch reference where an untiled run fits (1536 px and
  below), and of the VAE decode alone (the untiled reference's denoised latent decoded tiled, by
  the tiled PyTorch reference of each setting, against its untiled decode).

Writes benchmarks/results/tiling_tradeoff.json, tiling_tradeoff.png (bars) and
tiling_seam_crop_1536.png (untiled | old | new | 8x differences at a tile boundary).

    python benchmarks/tiling_tradeoff.py [--sizes 1024,1536,2048,4096] [--repeats 3] [--scratch DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"
UNTILED_REFERENCE_MAX = 1536  # px: the untiled PyTorch reference fits this machine's memory up to here


def settings_for(name: str):
    from srexport.artifact.tile_settings import TilingSettings

    if name == "old":
        return TilingSettings(tile=512, overlap=128, batch=4, vae_tile=1024, vae_overlap=256, vae_norm="per-tile",
                              plan="fixed", unet_norm="per-tile").validate()
    return TilingSettings().validate()


def build_artifact(scratch: Path) -> Path:
    out = scratch / "demo-fp32-default-tiling"
    if not (out / "manifest.json").exists():
        print(f"building the trained demo (fp32, default tiling) into {out}", flush=True)
        subprocess.run([sys.executable, "-m", "srexport.cli", "build", "--scale", "4", "--precision", "fp32",
                        "--out", str(out), "--force", "--quiet"], check=True)
    return out


def photo_lr(side: int) -> torch.Tensor:
    from PIL import Image
    from skimage import data

    photo = Image.fromarray(data.astronaut()).resize((side, side), Image.BICUBIC)
    return torch.from_numpy(np.array(photo)).permute(2, 0, 1)[None].float() / 255.0


def pipelines(artifact: Path) -> dict:
    from srexport.artifact.manifest import load_artifact
    from srexport.artifact.tile_settings import tiling_section
    from srexport.runtime.pipeline import SRPipeline
    from srexport.runtime.runners import ort_runners

    art = load_artifact(artifact)
    runners = ort_runners(art, threads=None)  # shared: one set of sessions for both settings
    out = {}
    for name in ("old", "new"):
        manifest = dict(art.manifest, tiling=tiling_section(settings_for(name)))
        out[name] = SRPipeline(manifest, runners)
    return out


def memory_probe(artifact: Path, size: int, name: str) -> None:
    """One run in this (fresh) process; prints its peak RSS as JSON."""
    from srexport.runtime.timing import HostMemoryProbe

    pipeline = pipelines(artifact)[name]
    lr = photo_lr(size // 4)
    with HostMemoryProbe() as probe:
        pipeline.run_stages(lr)
    print(json.dumps({"peak_rss_mib": round(probe.peak / 2**20, 1),
                      "added_mib": round((probe.peak - probe.baseline) / 2**20, 1), "method": probe.method}))


def decode_alone(reference, lr: torch.Tensor) -> dict:
    """The VAE decode of the untiled reference's denoised latent, tiled by each setting, against
    its untiled decode (PSNR over [-1, 1])."""
    from srexport.models.tiled_reference import TiledReference
    from srexport.parity import compare

    env, _ = reference.stage_tensors(lr)
    out = {}
    for name in ("old", "new"):
        tiled = TiledReference(reference, settings_for(name))
        stage = tiled.settings.stages()["decode"]
        decoded = tiled._vae(reference.decode, reference.components()["vae_decoder"], env["denoised"], stage)
        out[name] = db(compare(decoded, env["decoded"], 2.0))
    return out


def db(p) -> float | None:
    return None if p.psnr_db == float("inf") else round(p.psnr_db, 2)  # None: identical (one tile)


def measure(args) -> dict:
    from srexport.parity import compare
    from srexport.runtime.loading import reference_for
    from srexport.artifact.manifest import load_artifact

    artifact = Path(args.artifact) if args.artifact else build_artifact(Path(args.scratch))
    runs = pipelines(artifact)
    reference = reference_for(load_artifact(artifact))
    results = {"artifact": str(artifact), "repeats": args.repeats, "sizes": {},
               "settings": {n: dataclasses.asdict(settings_for(n)) for n in ("old", "new")},
               "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}}
    crops = {}
    for size in args.sizes:
        lr = photo_lr(size // 4)
        entry = {"output": size, "plan": {n: p.tile_plan(*lr.shape[-2:]) for n, p in runs.items()}}
        print(f"{size}x{size}: " + "; ".join(f"{n} work {entry['plan'][n]['work_vs_untiled']:.2f}x"
                                             for n in runs), flush=True)
        outputs = {}
        for name, pipeline in runs.items():  # warm-up
            outputs[name] = pipeline.run_stages(lr).tensors["output"]
        seconds = {n: [] for n in runs}
        repeats = args.repeats if size <= 2048 else 1
        for _ in range(repeats):
            for name, pipeline in runs.items():
                run = pipeline.run_stages(lr)
                seconds[name].append(dict(run.seconds, total=run.total_seconds))
                print(f"  {name}: " + "  ".join(f"{k} {v:.1f}" for k, v in seconds[name][-1].items()) + " s",
                      flush=True)
        entry["repeats"] = repeats
        entry["median_seconds"] = {n: {k: round(statistics.median(r[k] for r in s), 2) for k in s[0]}
                                   for n, s in seconds.items()}
        entry["time_new_over_old"] = round(entry["median_seconds"]["new"]["total"]
                                           / entry["median_seconds"]["old"]["total"], 3)
        if size <= UNTILED_REFERENCE_MAX:
            with torch.no_grad():
                whole = reference(lr)
                entry["decode_alone_psnr_db"] = decode_alone(reference, lr)
            entry["psnr_vs_untiled_db"] = {n: db(compare(o, whole, 1.0)) for n, o in outputs.items()}
            if size == 1536:
                crops = {"untiled": whole, **outputs}
        else:
            entry["psnr_vs_untiled_db"] = None
            entry["psnr_note"] = (f"no untiled reference above {UNTILED_REFERENCE_MAX} px here (its whole-image "
                                  "attention does not fit); not measured")
        if size >= 2048:
            entry["peak_rss"] = {}
            for name in runs:
                out = subprocess.run([sys.executable, __file__, "--memory-probe", str(size), name, "--artifact",
                                      str(artifact)], check=True, capture_output=True, text=True).stdout
                entry["peak_rss"][name] = json.loads(out.strip().splitlines()[-1])
        print(json.dumps({k: v for k, v in entry.items() if k not in ("plan",)}), flush=True)
        results["sizes"][str(size)] = entry
    if crops:
        save_crops(crops, runs["new"], RESULTS / "tiling_seam_crop_1536.png")
    return results


def save_crops(outputs: dict, pipeline, path: Path) -> None:
    """A 256 px crop where the new plan's first VAE tiles overlap: each output and 8x |output - untiled|."""
    from srexport.plots import crop_differences

    whole = outputs["untiled"]
    grid = pipeline.tile_plan(*(s // 4 for s in whole.shape[-2:]))
    seam = (grid["stages"]["decode"]["tile"][0] * 8 if grid else 512) - 24
    y0 = x0 = max(0, min(whole.shape[-1] - 256, seam - 128))
    crop_differences(whole, {f"{n} default": t for n, t in outputs.items() if n != "untiled"}, y0, x0, 256,
                     f"1536 px output, crop at ({y0}, {x0}) px where VAE tiles overlap", path, reference_label="untiled")
    print(path)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(results["sizes"])
    x = np.arange(len(sizes))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for i, name in enumerate(("old", "new")):
        work = [results["sizes"][s]["plan"][name]["work_vs_untiled"] for s in sizes]
        secs = [results["sizes"][s]["median_seconds"][name]["total"] for s in sizes]
        psnr = [(results["sizes"][s]["psnr_vs_untiled_db"] or {}).get(name) or 0 for s in sizes]
        for ax, values in zip(axes, (work, secs, psnr)):
            ax.bar(x + (i - 0.5) * 0.38, values, 0.38, label=f"{name} default")
    for ax, title in zip(axes, ("work vs untiled (SD 2.1 FLOP shares)", "CPU seconds per image (median)",
                                "PSNR vs untiled reference (dB; 0: not measured)")):
        ax.set_xticks(x, [f"{s} px" for s in sizes])
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    axes[0].axhline(1.25, color="k", lw=0.8, ls="--")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1024,1536,2048,4096", help="output sides in px (default: 1024,1536,2048,4096)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting up to 2048 px (4096: 1)")
    parser.add_argument("--scratch", default="/tmp/srexport-tiling-tradeoff", help="where the demo artifact is built")
    parser.add_argument("--artifact", default=None, help="an fp32 demo artifact built with the default tiling")
    parser.add_argument("--memory-probe", nargs=2, metavar=("SIZE", "SETTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        memory_probe(Path(args.artifact), int(args.memory_probe[0]), args.memory_probe[1])
        return
    args.sizes = [int(s) for s in args.sizes.split(",")]
    t = time.perf_counter()
    results = measure(args)
    results["seconds"] = round(time.perf_counter() - t)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tiling_tradeoff.json").write_text(json.dumps(results, indent=1))
    plot(results, RESULTS / "tiling_tradeoff.png")
    print(RESULTS / "tiling_tradeoff.json")


if __name__ == "__main__":
    main()
