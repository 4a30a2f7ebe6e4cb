"""Peak memory and time of tiled upscaling at two input sizes (the demo model, CPU).

Each size runs in its own subprocess (peak RSS is per process), doing what
``srexport run`` does: load the artifact, read the PNG, upscale (tiled, the
artifact's default), write the PNG. The child reports peak RSS (ru_maxrss),
the seconds of each step and of each pipeline stage, and the tiles per stage.

Acceptance (ISSUE 4): peak RSS within 1.5x between a 512x512 and a 2048x2048
input (2048 and 8192 px outputs), time about linear in output pixels. Wall time
suffers from other load on a shared machine; the process's CPU seconds do not
much, so both are reported.

    python benchmarks/tiled_memory.py [--artifact DIR] [--sizes 512,2048] [--no-tile-at 512]

Without --artifact, the demo is built once with the CLI into --scratch
(process size 512, default tiling, fp32 graphs). Writes
benchmarks/results/tiled_memory_<host>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    import psutil

    return {"host": platform.node(), "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version(),
            "load_average_at_start": os.getloadavg()}


def make_input(size: int, path: Path) -> Path:
    """A photo (scikit-image's astronaut) resized to size x size, as an 8-bit PNG."""
    from PIL import Image
    from skimage import data

    if not path.exists():
        Image.fromarray(data.astronaut()).resize((size, size), Image.BICUBIC).save(path)
    return path


def child(artifact: Path, image: Path, out: Path, no_tile: bool) -> dict:
    """One upscale, as `srexport run` does it, measured."""
    import torch

    from srexport.runtime.images import load_image, save_image
    from srexport.runtime.loading import load_pipeline

    torch.set_num_threads(os.cpu_count() or 1)
    clock = time.perf_counter

    def cpu() -> float:  # this process's CPU seconds: a measure that other load on the machine leaves alone
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    t0 = clock()
    pipeline = load_pipeline(artifact, backend="ort")
    t1 = clock()
    lr = load_image(image)
    tiled = pipeline.will_tile(*lr.shape[-2:], tiled=not no_tile)
    counts = pipeline.tile_counts(*lr.shape[-2:]) if tiled else {}
    t2, c2 = clock(), cpu()
    run = pipeline.run_stages(lr, tiled=not no_tile)
    t3, c3 = clock(), cpu()
    output = run.tensors.pop("output")
    run.tensors.clear()
    save_image(output, out)
    t4 = clock()
    return {
        "input": list(lr.shape[-2:]), "output": list(output.shape[-2:]),
        "output_megapixels": round(output.shape[-2] * output.shape[-1] / 1e6, 3),
        "tiled": tiled, "tiles": counts, "tiling": pipeline.manifest.get("tiling", {}).get("tile"),
        "seconds": {"load_artifact": round(t1 - t0, 2), "read_input": round(t2 - t1, 2),
                    "upscale": round(t3 - t2, 2), "write_png": round(t4 - t3, 2), "total": round(t4 - t0, 2)},
        "cpu_seconds": {"upscale": round(c3 - c2, 2), "total": round(cpu(), 2)},
        "load_average": os.getloadavg(),
        "stage_seconds": {k: round(v, 2) for k, v in run.seconds.items()},
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def build_demo(scratch: Path) -> Path:
    artifact = scratch / "pisa-demo-x4"
    if not (artifact / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "srexport.cli", "build", "--precision", "fp32", "--out", str(artifact),
                        "--force", "--quiet"], check=True)
    return artifact


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, help="a built artifact (default: build the demo into --scratch)")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/srexport-tiled-memory"))
    parser.add_argument("--sizes", default="512,2048", help="input sides, comma-separated (default: 512,2048)")
    parser.add_argument("--no-tile-at", default="", help="also run these sizes whole-image, for comparison")
    parser.add_argument("--child", nargs=4, metavar=("ARTIFACT", "IMAGE", "OUT", "NO_TILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        artifact, image, out, no_tile = args.child
        print(json.dumps(child(Path(artifact), Path(image), Path(out), no_tile == "1")))
        return

    args.scratch.mkdir(parents=True, exist_ok=True)
    artifact = args.artifact or build_demo(args.scratch)
    runs = []
    plan = [(int(s), False) for s in args.sizes.split(",")]
    plan += [(int(s), True) for s in args.no_tile_at.split(",") if s]
    for size, no_tile in plan:
        image = make_input(size, args.scratch / f"astronaut_{size}.png")
        out = args.scratch / f"out_{size}{'_whole' if no_tile else ''}.png"
        proc = subprocess.run([sys.executable, __file__, "--child", str(artifact), str(image), str(out),
                               "1" if no_tile else "0"], capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"size {size} failed")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        runs.append(result)
        print(f"{size}x{size} -> {result['output'][1]}x{result['output'][0]} ({'whole' if no_tile else 'tiled'}): "
              f"peak RSS {result['peak_rss_mib']:.0f} MiB, upscale {result['seconds']['upscale']:.1f} s "
              f"({result['seconds']['upscale'] / result['output_megapixels']:.2f} s/MP; CPU "
              f"{result['cpu_seconds']['upscale'] / result['output_megapixels']:.2f} s/MP), total "
              f"{result['seconds']['total']:.1f} s, tiles {result['tiles']}", flush=True)
    tiled = [r for r in runs if r["tiled"]]
    summary = {}
    if len(tiled) >= 2:
        by_size = sorted(tiled, key=lambda r: r["output_megapixels"])
        small, large = by_size[0], by_size[-1]
        summary = {
            "peak_rss_ratio": round(large["peak_rss_mib"] / small["peak_rss_mib"], 3),
            "output_pixel_ratio": round(large["output_megapixels"] / small["output_megapixels"], 2),
            "upscale_time_ratio": round(large["seconds"]["upscale"] / small["seconds"]["upscale"], 2),
            "upscale_cpu_time_ratio": round(large["cpu_seconds"]["upscale"] / small["cpu_seconds"]["upscale"], 2),
            "seconds_per_megapixel": [round(r["seconds"]["upscale"] / r["output_megapixels"], 3) for r in tiled],
            "cpu_seconds_per_megapixel": [round(r["cpu_seconds"]["upscale"] / r["output_megapixels"], 3)
                                          for r in tiled],
        }
        summary["peak_rss_within_1_5x"] = summary["peak_rss_ratio"] <= 1.5
        print(f"peak RSS ratio {summary['peak_rss_ratio']} (bound 1.5); time ratio {summary['upscale_time_ratio']} "
              f"(CPU time {summary['upscale_cpu_time_ratio']}) for {summary['output_pixel_ratio']}x the output pixels")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"tiled_memory_{platform.node()}.json"
    path.write_text(json.dumps({"machine": machine(), "artifact": str(artifact), "runs": runs, "summary": summary,
                                "load_average_at_end": os.getloadavg()}, indent=2) + "\n")
    print(path)


if __name__ == "__main__":
    main()
