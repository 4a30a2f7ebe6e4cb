"""Tiled VAE against whole-image VAE, by GroupNorm method: error and cost.

The VAE's GroupNorms normalise with statistics of whatever they see; on a tile
those are the tile's, not the image's. Three methods, each with overlapping
tiles blended by the runtime's Gaussian weights:

- per-tile:    each tile's own statistics (``--vae-norm per-tile``, the default);
- two-pass:    a first pass records every GroupNorm's per-tile statistics, they
               are pooled (mean of means, law of total variance), and a second
               pass normalises every tile with them (``--vae-norm two-pass``,
               srexport's ``models/group_norm_stats.py``): memory bounded by the
               tile, twice the VAE work;
- whole-image: the statistics of a whole-image pass (the ideal, which upstream's
               tiled VAE approaches by gathering statistics over all tiles layer
               by layer, holding every tile's activations at once).

Part 1, the VAE alone (PyTorch): PSNR against the whole-image pass, the latent
on its own range, the decoded image on [-1, 1], for each --tiles setting.

Part 2, the runtime (--runtime): a demo artifact built with --vae-norm two-pass
(fp32, default tiles), the ORT pipeline upscaling the photo's LR (size / 4)
with per-tile and with two-pass statistics, alternated --repeats times: seconds
per stage (after one warm-up run each), and the output's PSNR against the
untiled PyTorch reference, with the default tiling and with only the VAE tiled
(the denoiser's tile widened to the image; computed by the tiled PyTorch
reference). The graphs' counted FLOPs
(export/cost.py) give the structural cost ratio.

The input is a photo (scikit-image's astronaut) resized to --size. Writes
benchmarks/results/tiled_vae_error_<weights>_<size>.json and, with --runtime,
a PNG of crops (whole | per-tile | two-pass, and their differences).

    python benchmarks/tiled_vae_error.py [--size 1536] [--tiles 512/128,1024/256] [--weights trained|random]
                                         [--runtime] [--repeats 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"


def tiled(fn, x, tile, overlap, factor):
    from srexport.kernels.tiling import blend_tiles, extract_tiles, gaussian_weights, tile_grid

    height, width = x.shape[-2:]
    th, tw = min(tile, height), min(tile, width)
    origins = tile_grid(height, width, th, tw, overlap)
    tiles = extract_tiles(x, origins, th, tw)
    outs = torch.cat([fn(tiles[i : i + 1]) for i in range(len(origins))])
    scaled = [(int(y * factor), int(x_ * factor)) for y, x_ in origins]
    return blend_tiles(outs, scaled, int(height * factor), int(width * factor),
                       gaussian_weights(int(th * factor), int(tw * factor))), len(origins)


def vae_only(args, results) -> None:
    """Part 1: the VAE's halves tiled by each method, against their whole-image pass."""
    from PIL import Image
    from skimage import data

    from srexport.models.components import VaeDecoder, VaeEncoderMean
    from srexport.models.group_norm_stats import normalising_with, pool_stats, recording
    from srexport.models.sources import demo_pisa_source
    from srexport.parity import compare

    base, _ = demo_pisa_source(trained=args.weights == "trained").load()
    vae = base.vae.eval().requires_grad_(False)
    encoder, decoder = VaeEncoderMean(vae), VaeDecoder(vae)
    photo = Image.fromarray(data.astronaut()).resize((args.size, args.size), Image.BICUBIC)
    x = torch.from_numpy(np.array(photo)).permute(2, 0, 1)[None].float() / 127.5 - 1.0

    def recorded(module, fn, inp):
        with recording(module) as stats:
            out = fn(inp)
        return out, torch.stack(stats, 1)

    def with_stats(module, fn, stats):
        def run(tile):
            with normalising_with(module, stats.expand(tile.shape[0], *stats.shape[1:])):
                return fn(tile)
        return run

    with torch.no_grad():
        t = time.perf_counter()
        z, encoder_stats = recorded(encoder, encoder, x)
        y, decoder_stats = recorded(decoder, decoder, z)
        results["whole_seconds"] = round(time.perf_counter() - t, 1)
        print(f"{args.weights} demo VAE, {args.size}x{args.size}: whole-image pass {results['whole_seconds']} s")
        for spec in args.tiles.split(","):
            tile, overlap = (int(v) for v in spec.split("/"))
            for method in ("per-tile", "two-pass", "whole-image"):
                row = {"tile": tile, "overlap": overlap, "method": method}
                for part, module, inp, factor, target, whole_stats, peak in (
                        ("encode", encoder, x, 1 / 8, z, encoder_stats, None),
                        ("decode", decoder, z, 8, y, decoder_stats, 2.0)):
                    step = tile if part == "encode" else tile // 8
                    lap = overlap if part == "encode" else overlap // 8
                    t = time.perf_counter()
                    if method == "per-tile":
                        out, count = tiled(module, inp, step, lap, factor)
                    elif method == "whole-image":
                        out, count = tiled(with_stats(module, module, whole_stats), inp, step, lap, factor)
                    else:
                        per_tile = []

                        def first_pass(tile_, module=module):
                            out_, stats_ = recorded(module, module, tile_)
                            per_tile.append(stats_)
                            return out_

                        tiled(first_pass, inp, step, lap, factor)
                        pooled = pool_stats(torch.cat(per_tile))
                        out, count = tiled(with_stats(module, module, pooled), inp, step, lap, factor)
                    p = compare(out, target, peak)
                    row[part] = {"psnr_db": round(p.psnr_db, 2), "max_abs": round(p.max_abs, 4), "tiles": count,
                                 "seconds": round(time.perf_counter() - t, 1)}
                results["runs"].append(row)
                print(f"  {tile}/{overlap} px {method:<11}: encode {row['encode']['psnr_db']:6.2f} dB "
                      f"({row['encode']['tiles']} tiles), decode {row['decode']['psnr_db']:6.2f} dB "
                      f"(max abs {row['decode']['max_abs']:.3f})", flush=True)


def build_artifact(scratch: Path, weights: str) -> Path:
    out = scratch / f"demo-two-pass-{weights}"
    if not (out / "manifest.json").exists():
        print(f"building the two-pass demo artifact into {out}", flush=True)
        subprocess.run([sys.executable, "-m", "srexport.cli", "build", "--scale", "4", "--precision", "fp32",
                        "--vae-norm", "two-pass", "--out", str(out), "--force", "--quiet"], check=True)
    return out


def runtime(args, results) -> dict:
    """Part 2: the ORT pipeline, per-tile vs two-pass, alternated; stage seconds and PSNR."""
    from PIL import Image
    from skimage import data

    from srexport.export.cost import count_graph
    from srexport.artifact.specs import Geometry
    from srexport.models.tiled_reference import TiledReference
    from srexport.parity import compare
    from srexport.runtime.loading import load_pipeline, reference_for

    artifact = args.artifact or build_artifact(Path(args.scratch), args.weights)
    pipeline = load_pipeline(artifact, backend="ort")
    lr_side = args.size // 4
    photo = Image.fromarray(data.astronaut()).resize((lr_side, lr_side), Image.BICUBIC)
    lr = torch.from_numpy(np.array(photo)).permute(2, 0, 1)[None].float() / 255.0
    print(f"runtime: LR {lr_side}x{lr_side} -> {pipeline.tile_counts(lr_side, lr_side)}", flush=True)
    t = time.perf_counter()
    reference = reference_for(pipeline_artifact(artifact))
    with torch.no_grad():
        whole = reference(lr)
    print(f"  untiled PyTorch reference {time.perf_counter() - t:.1f} s", flush=True)
    seconds = {"per-tile": [], "two-pass": []}
    outputs = {}
    for method in seconds:  # warm-up: onnxruntime's first runs at a shape allocate and plan
        pipeline.use_vae_norm(method)
        pipeline.run_stages(lr)
    for _ in range(args.repeats):
        for method in seconds:
            pipeline.use_vae_norm(method)
            run = pipeline.run_stages(lr)
            seconds[method].append(dict(run.seconds, total=run.total_seconds))
            outputs[method] = run.tensors["output"]
            print(f"  {method:<9} " + "  ".join(f"{k} {v:.1f}" for k, v in seconds[method][-1].items()) + " s",
                  flush=True)
    out = {"artifact": str(artifact), "lr": lr_side, "tiles": pipeline.tile_counts(lr_side, lr_side),
           "repeats": args.repeats, "methods": {}}
    for method, runs in seconds.items():
        median = {k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]}
        p = compare(outputs[method], whole, 1.0)
        out["methods"][method] = {"median_seconds": median, "psnr_vs_untiled_reference_db": round(p.psnr_db, 2),
                                  "max_abs_vs_untiled_reference": round(p.max_abs, 4)}
    # The VAE's share alone: the denoiser's tile widened to the whole image, so only the VAE is
    # tiled. Computed by the tiled PyTorch reference (the same algorithm; the tests hold the ORT
    # runs to it): onnxruntime's unfused attention over a whole 192x192 latent needs more memory
    # than this machine has.
    side = -(-args.size // 64) * 64
    vae_tiled = {}
    for method in seconds:
        settings = dataclasses.replace(pipeline.tiling, tile=side, overlap=0, vae_norm=method)
        with torch.no_grad():
            vae_tiled[method] = TiledReference(reference, settings)(lr)
        p = compare(vae_tiled[method], whole, 1.0)
        out["methods"][method]["psnr_vs_untiled_reference_only_vae_tiled_db"] = round(p.psnr_db, 2)
    per, two = (out["methods"][m]["median_seconds"] for m in ("per-tile", "two-pass"))
    out["ratios_two_pass_over_per_tile"] = {k: round(two[k] / per[k], 2) for k in ("encode", "decode", "total")}
    # the structural cost: counted FLOPs of one VAE tile through each graph
    art = pipeline_artifact(artifact)
    tile = Geometry(1, 1024, 1024)
    flops = {}
    for name, spec in art.components.items():
        if name.startswith("vae_"):
            flops[name] = count_graph(art.component_file(name), spec.input_shapes(tile)).flops
    out["gflops_per_1024px_tile"] = {k: round(v / 1e9, 1) for k, v in flops.items()}
    out["flop_ratio_two_pass_over_per_tile"] = {
        half: round((flops[f"{half}_stats"] + flops[f"{half}_pooled"]) / flops[half], 3)
        for half in ("vae_encoder", "vae_decoder")}
    print(json.dumps({k: out[k] for k in ("ratios_two_pass_over_per_tile", "flop_ratio_two_pass_over_per_tile")}))
    for method, m in out["methods"].items():
        print(f"  {method:<9} PSNR vs untiled reference {m['psnr_vs_untiled_reference_db']:.2f} dB (default tiling), "
              f"{m['psnr_vs_untiled_reference_only_vae_tiled_db']:.2f} dB (only the VAE tiled)")
    save_crops(whole, vae_tiled, RESULTS / f"tiled_vae_methods_{args.weights}_{args.size}.png")
    return out


def pipeline_artifact(folder):
    from srexport.artifact.manifest import load_artifact

    return load_artifact(folder, verify=False)


def save_crops(whole, outputs, path: Path) -> None:
    """A seam region (where four VAE tiles meet) of each output, and 8x their difference to whole."""
    from srexport.plots import crop_differences

    size = whole.shape[-1]
    seam = 1024 - 128  # the middle of the first overlap at the default 1024/256 VAE tiles
    y0 = x0 = max(0, min(size - 256, seam - 128))
    crop_differences(whole, {f"{method} (tiled)": out for method, out in outputs.items()}, y0, x0, 256,
                     f"only the VAE tiled (1024/256 px), crop at ({y0}, {x0}) px where its tiles overlap", path)
    print(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1536, help="image side in output pixels (default: 1536)")
    parser.add_argument("--tiles", default="512/128,1024/256", help="TILE/OVERLAP pixel pairs for part 1")
    parser.add_argument("--weights", choices=["trained", "random"], default="trained",
                        help="the demo VAE's weights (default: trained, the shipped demo)")
    parser.add_argument("--runtime", action="store_true", help="also part 2: the ORT pipeline, per-tile vs two-pass")
    parser.add_argument("--skip-vae-only", action="store_true", help="part 2 only")
    parser.add_argument("--artifact", type=Path, default=None, help="a two-pass artifact for part 2 (default: build)")
    parser.add_argument("--scratch", default="/tmp/srexport-bench", help="where part 2 builds its artifact")
    parser.add_argument("--repeats", type=int, default=2, help="alternated runs per method in part 2")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.weights == "random" and args.runtime:
        parser.error("--runtime builds the shipped (trained) demo; drop --weights random")
    path = RESULTS / f"tiled_vae_error_{args.weights}_{args.size}.json"
    results = json.loads(path.read_text()) if path.exists() and args.skip_vae_only else {
        "weights": args.weights, "size": args.size, "image": "scikit-image astronaut, bicubic-resized", "runs": []}
    results.update(host=platform.node(), cores=os.cpu_count(), load_average_at_start=os.getloadavg())
    if not args.skip_vae_only:
        vae_only(args, results)
    if args.runtime:
        results["runtime"] = runtime(args, results)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(path)


if __name__ == "__main__":
    main()
