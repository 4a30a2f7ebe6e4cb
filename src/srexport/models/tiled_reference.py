"""The tiled algorithm in plain PyTorch: the parity oracle for tiled runs.

Written apart from the runtime's streaming code, on whole tensors: the
reference's own ``preprocess``, ``kernels.extract_tiles`` / ``blend_tiles``
over all tiles at once, the reference's own encode / denoise / decode one tile
at a time, and its ``postprocess``. Only the tile layout (``StageTiling.grid``:
origins, tile shape) is shared with the runtime; it is tested on its own.

So ``srexport check`` compares a backend's tiled run with this (they should
agree to float rounding) and, separately, this with the untiled reference
(what tiling itself changes). With two-pass VAE GroupNorm (the artifact's
``tiling.vae.norm``), every tile's statistics are recorded, pooled over the
image as whole tensors (``pool_stats``; the runtime streams them) and the
tiles run again with the pool; with the coarse norm the statistics come
from the input averaged over k x k pixels (``StageTiling.coarse_size``),
tiled the same way where it is larger than a tile.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..artifact.specs import VAE_FACTOR
from ..kernels.tiling import blend_tiles, extract_tiles, gaussian_weights
from .group_norm_stats import normalising_with, per_sample, pool_stats, recording
from ..processing import postprocess
from ..artifact.tile_plan import StageTiling
from ..artifact.tile_settings import TWO_PASS_NORMS, TilingSettings


def tiled_apply(fn, x: torch.Tensor, stage: StageTiling) -> torch.Tensor:
    """``fn`` over tiles of ``x`` (1, C, H, W), one tile at a time, blended; tiles past
    the image are reflect-padded and the result cropped."""
    height, width = x.shape[-2:]
    grid = stage.grid(height, width)
    origins = grid.origins
    tiles = extract_tiles(x, origins, grid.tile_h, grid.tile_w, pad_mode="reflect")
    outs = torch.cat([fn(tiles[i : i + 1]) for i in range(len(origins))])
    out_h, out_w = stage.out(height), stage.out(width)
    if len(origins) == 1:  # one tile: the blend is the tile itself
        return outs[..., :out_h, :out_w]
    weights = gaussian_weights(stage.out(grid.tile_h), stage.out(grid.tile_w))
    return blend_tiles(outs, [(stage.out(y), stage.out(x_)) for y, x_ in origins], out_h, out_w, weights)


class TiledReference:
    """A reference pipeline (PisaReference, S3DiffReference) run the tiled way."""

    def __init__(self, reference, settings: TilingSettings):
        self.reference = reference
        self.settings = settings.validate()
        self.processing = reference.processing

    @torch.no_grad()
    def stage_tensors(self, lr: torch.Tensor, resolved=None):
        """``resolved``: a call's guidance (``artifact.guidance.resolve``), None for the build's."""
        ref = self.reference
        prepared = ref.preprocess(lr)
        height, width = prepared.model_input.shape[-2:]
        if self.settings.fits_one_tile(height, width):
            return ref.stage_tensors(lr, resolved)  # one tile for every stage: the whole-image computation
        env = {"lr_image": lr, "image": prepared.model_input}
        extra = ()
        if hasattr(ref, "scores"):  # S3Diff: from the whole LR image, the same for every tile
            env["scores"] = ref.scores(lr, resolved)
            extra = (env["scores"],)

        def per_tile(fn):
            return lambda tile: fn(tile, *(e.expand(tile.shape[0], *e.shape[1:]) for e in extra))

        stages = self.settings.stages()
        modules = ref.components()
        env["latent"] = self._vae(per_tile(ref.encode), modules["vae_encoder"], env["image"], stages["encode"])
        plan = resolved.plan if resolved is not None else ref.denoise_plan()
        # each UNet module once: a module two terms share (adjustable exact) records both calls in turn
        unets = [modules[c] for c in dict.fromkeys(t["component"] for t in plan["terms"])]
        denoise = per_tile(lambda tile, *inputs: ref.denoise(tile, *inputs, resolved))
        env["denoised"] = self._denoise(denoise, unets, env["latent"], stages["denoise"])
        env["decoded"] = self._vae(ref.decode, modules["vae_decoder"], env["denoised"], stages["decode"])
        if tuple(env["decoded"].shape[-2:]) != (height, width) or height % VAE_FACTOR or width % VAE_FACTOR:
            # preprocess sizes the encoder input to a multiple of the VAE factor; the blend keeps it
            raise RuntimeError(f"tiled decode gave {tuple(env['decoded'].shape[-2:])} for an encoder input of "
                               f"{(height, width)}; both must be equal multiples of {VAE_FACTOR}")
        return env, prepared

    def _denoise(self, fn, unets: list[torch.nn.Module], x: torch.Tensor, stage: StageTiling) -> torch.Tensor:
        """``fn`` (the reference's denoise, whose GroupNorms are those of ``unets``, the denoise plan's
        UNet graphs) tiled; with coarse UNet statistics, first each UNet's statistics of the latent
        averaged over k x k pixels (tiled like the runtime's), pooled, then every tile normalised
        with them."""
        grid = stage.grid(*x.shape[-2:])
        if self.settings.unet_norm != "coarse" or grid.count == 1:
            return tiled_apply(fn, x, stage)
        size = stage.coarse_size(*x.shape[-2:])
        source = F.avg_pool2d(x[..., : size[1] * size[0], : size[2] * size[0]], size[0]) if size else x
        recorded = [[] for _ in unets]

        def record(tile):
            with contextlib.ExitStack() as stack:
                lists = [stack.enter_context(recording(m)) for m in unets]
                out = fn(tile)
            for into, stats in zip(recorded, lists):
                into.append(per_sample(stats, tile.shape[0]))
            return out

        tiled_apply(record, source, stage)
        pooled = [pool_stats(torch.cat(r)) for r in recorded]

        def normalised(tile):
            with contextlib.ExitStack() as stack:
                for m, p in zip(unets, pooled):
                    stack.enter_context(normalising_with(m, p.expand(tile.shape[0], *p.shape[1:])))
                return fn(tile)

        return tiled_apply(normalised, x, stage)

    def _vae(self, fn, module: torch.nn.Module, x: torch.Tensor, stage: StageTiling) -> torch.Tensor:
        """``fn`` (a VAE half, whose GroupNorms are ``module``'s) tiled; with two-pass GroupNorm,
        first every tile's statistics, pooled over all of them, then every tile normalised with
        the pool (models/group_norm_stats.py)."""
        if self.settings.vae_norm not in TWO_PASS_NORMS or stage.grid(*x.shape[-2:]).count == 1:
            return tiled_apply(fn, x, stage)
        recorded = []

        def record(tile):
            with recording(module) as stats:
                out = fn(tile)
            recorded.append(per_sample(stats, tile.shape[0]))
            return out

        size = stage.coarse_size(*x.shape[-2:]) if self.settings.vae_norm == "coarse" else None
        if size is not None:  # the statistics of the input averaged over k x k pixels, itself tiled
            k, h, w = size
            tiled_apply(record, F.avg_pool2d(x[..., : h * k, : w * k], k), stage)
        else:
            tiled_apply(record, x, stage)
        pooled = pool_stats(torch.cat(recorded))

        def normalised(tile):
            with normalising_with(module, pooled.expand(tile.shape[0], *pooled.shape[1:])):
                return fn(tile)

        return tiled_apply(normalised, x, stage)

    @torch.no_grad()
    def __call__(self, lr: torch.Tensor, resolved=None) -> torch.Tensor:
        env, prepared = self.stage_tensors(lr, resolved)
        return postprocess(env["decoded"], prepared, self.processing)
