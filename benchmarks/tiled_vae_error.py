"""How far tiled VAE encode/decode is from whole-image encode/decode, by GroupNorm method.

The VAE's GroupNorms normalise with statistics of whatever they see; on a tile
those are the tile's, not the image's. Three methods, each with overlapping
tiles blended by the runtime's Gaussian weights:

- per-tile:   each tile's own statistics (what srexport's graphs compute);
- two-pass:   a first pass over all tiles collects every GroupNorm's per-tile
              statistics, they are pooled (mean of means, law of total
              variance), and a second pass normalises every tile with them:
              memory stays bounded by the tile, at twice the VAE work;
- whole-image: the statistics of a whole-image pass (the ideal that upstream's
              tiled VAE approaches by gathering statistics over all tiles layer
              by layer, holding every tile's activations at once).

Errors are PSNR against the whole-image pass: the latent on its own range,
the decoded image on [-1, 1]. The input is a photo (scikit-image's astronaut),
resized to --size. Writes benchmarks/results/tiled_vae_error_<weights>.json.

    python benchmarks/tiled_vae_error.py [--size 1024] [--tiles 512/128,1024/256] [--weights trained|random]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"


class StatsGroupNorm(torch.nn.GroupNorm):
    """A GroupNorm that can record its input statistics or normalise with given ones."""

    def forward(self, x):
        ctx = self.ctx
        n, g = x.shape[0], self.num_groups
        v = x.reshape(n, g, -1)
        if ctx.mode == "plain":
            return super().forward(x)
        if ctx.mode == "record":
            ctx.recorded.setdefault(self.index, []).append(
                (v.double().mean(-1), v.double().var(-1, unbiased=False), v.shape[-1]))
            if ctx.given is None:
                return super().forward(x)
        mean, var = ctx.given[self.index]
        out = (v - mean.float()[None, :, None]) / torch.sqrt(var.float()[None, :, None] + self.eps)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return out.reshape_as(x) * self.weight.reshape(shape) + self.bias.reshape(shape)


class Context:
    mode = "plain"
    given = None
    recorded: dict

    def __init__(self):
        self.recorded = {}

    @contextlib.contextmanager
    def use(self, mode, given=None):
        self.mode, self.given, self.recorded = mode, given, {}
        try:
            yield self
        finally:
            self.mode, self.given = "plain", None

    @staticmethod
    def pooled(recorded):
        """Per-tile (mean, var, count) -> one (mean, var) per GroupNorm."""
        out = {}
        for index, stats in recorded.items():
            total = sum(c for _, _, c in stats)
            mean = sum(m.sum(0) * c for m, _, c in stats) / total
            square = sum(((v + m * m) * c).sum(0) for m, v, c in stats) / total
            out[index] = (mean, square - mean * mean)
        return out


def instrument(vae) -> Context:
    ctx = Context()
    index = 0
    for module in vae.modules():
        if type(module) is torch.nn.GroupNorm:
            module.__class__ = StatsGroupNorm  # same parameters, forward with a mode
            module.ctx, module.index = ctx, index
            index += 1
    return ctx


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (default: 1024)")
    parser.add_argument("--tiles", default="512/128,1024/256", help="TILE/OVERLAP pixel pairs")
    parser.add_argument("--weights", choices=["trained", "random"], default="trained",
                        help="the demo VAE's weights (the trained demo if installed; default: trained)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from PIL import Image
    from skimage import data

    from srexport.models.components import VaeDecoder, VaeEncoderMean
    from srexport.models.sources import demo_pisa_source
    from srexport.parity import compare

    base, _ = demo_pisa_source(trained=args.weights == "trained").load()
    vae = base.vae.eval().requires_grad_(False)
    ctx = instrument(vae)
    encoder, decoder = VaeEncoderMean(vae), VaeDecoder(vae)
    photo = Image.fromarray(data.astronaut()).resize((args.size, args.size), Image.BICUBIC)
    x = torch.from_numpy(np.array(photo)).permute(2, 0, 1)[None].float() / 127.5 - 1.0

    results = {"weights": args.weights, "size": args.size, "image": "scikit-image astronaut, bicubic-resized",
               "host": platform.node(), "runs": []}
    with torch.no_grad():
        t = time.perf_counter()
        with ctx.use("record"):
            z = encoder(x)
            encoder_stats = ctx.pooled(ctx.recorded)
        with ctx.use("record"):
            y = decoder(z)
            decoder_stats = ctx.pooled(ctx.recorded)
        results["whole_seconds"] = round(time.perf_counter() - t, 1)
        print(f"{args.weights} demo VAE, {args.size}x{args.size}: whole-image pass {results['whole_seconds']} s")
        for spec in args.tiles.split(","):
            tile, overlap = (int(v) for v in spec.split("/"))
            for method in ("per-tile", "two-pass", "whole-image"):
                row = {"tile": tile, "overlap": overlap, "method": method}
                for part, fn, inp, factor, target, whole_stats, peak in (
                        ("encode", encoder, x, 1 / 8, z, encoder_stats, None),
                        ("decode", decoder, z, 8, y, decoder_stats, 2.0)):
                    step = tile if part == "encode" else tile // 8
                    lap = overlap if part == "encode" else overlap // 8
                    t = time.perf_counter()
                    if method == "per-tile":
                        out, count = tiled(fn, inp, step, lap, factor)
                    elif method == "whole-image":
                        with ctx.use("apply", whole_stats):
                            out, count = tiled(fn, inp, step, lap, factor)
                    else:
                        with ctx.use("record"):
                            tiled(fn, inp, step, lap, factor)
                            pooled = ctx.pooled(ctx.recorded)
                        with ctx.use("apply", pooled):
                            out, count = tiled(fn, inp, step, lap, factor)
                    p = compare(out, target, peak)
                    row[part] = {"psnr_db": round(p.psnr_db, 2), "max_abs": round(p.max_abs, 4), "tiles": count,
                                 "seconds": round(time.perf_counter() - t, 1)}
                results["runs"].append(row)
                print(f"  {tile}/{overlap} px {method:<11}: encode {row['encode']['psnr_db']:6.2f} dB "
                      f"({row['encode']['tiles']} tiles), decode {row['decode']['psnr_db']:6.2f} dB "
                      f"(max abs {row['decode']['max_abs']:.3f})", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"tiled_vae_error_{args.weights}_{args.size}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(path)


if __name__ == "__main__":
    main()
