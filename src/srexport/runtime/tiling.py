"""Tiled execution: any image size at a memory set by the tile size, not the image size.

The encoder, the denoiser and the decoder each run on tiles of one shape
(what engines are built for), in batches, and the tiles' outputs are blended
back with the upstream Gaussian weights, ``sum(w * tile) / sum(w)``:

- encode: tiles of the encoder input (pixels), blended in latent space;
- denoise: latent tiles, every UNet graph of the denoise plan on the same
  batch, blended as z0. Blending z0 equals blending eps (upstream's choice):
  z0 = a*z + sum(b_i * z0_i) is affine per pixel and the weights sum to one;
- decode: latent tiles, blended in pixel space straight into the output image.

Origins sit on a stride of ``tile - overlap``, the last tile touching the far
edge (``kernels.tiling``). A side shorter than a tile runs at its own length
(exact, and what upstream does for small images), or, with ``pad``, is
reflect-padded up to the tile so that every call has the tile's exact shape
(static engines); the padding is cropped off. An image no larger than every
tile in both sides runs whole: with one tile, tiled and untiled are one
computation.

Per-image inputs (S3Diff's degradation ``scores``, shape (batch, 2)) come from
the whole LR image once; any spec input with a ``batch`` dim and no spatial
dim is repeated over the tile batch.

The full-resolution input never exists as a float image (``regions``: the
encoder's tiles are computed from the LR image directly), and the output is
finished in place, so the whole-image memory is the output itself.

Tile geometry lives in the manifest's ``tiling`` section (``tiling_section``);
``tile_geometries`` gives the (smallest, typical, largest) shapes that
TensorRT profiles are derived from.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable

import torch

from ..errors import UserError
from ..artifact.specs import SPATIAL_DIMS, ComponentSpec
from ..kernels.tiling import extract_tiles, gaussian_1d, gaussian_weights
from ..artifact.tile_plan import (  # noqa: F401  (the runtime's API)
    StageTiling, TileGrid, plan_tiles, tile_geometries, work_ratios)
from ..artifact.tile_settings import (  # settings: torch-free, for the CLI
    DEFAULT_BATCH,
    DEFAULT_OVERLAP,
    DEFAULT_TILE,
    DEFAULT_UNTILED_MAX_MEGAPIXELS,
    DEFAULT_VAE_OVERLAP,
    DEFAULT_VAE_TILE,
    REASONING,
    TilingSettings,
    manifest_tiling,
    tiling_section,
)

# --- shapes for engine profiles ----------------------------------------------------------

# --- grids and blending ------------------------------------------------------------------


class BlendCanvas:
    """Streams tiles into ``sum(w * tile) / sum(w)`` over an image, a batch at a time.

    The Gaussian weight of a tile is an outer product and the origins form a
    grid, so the weight sum is an outer product too: two vectors, not an image.
    A grid of one tile is the tile itself (no arithmetic, so exact).
    """

    def __init__(self, grid: TileGrid, stage: StageTiling, channels: int, device, dtype=torch.float32):
        self.grid, self.stage = grid, stage
        o = stage.out
        self.height, self.width = o(grid.height), o(grid.width)
        self.tile_h, self.tile_w = o(grid.tile_h), o(grid.tile_w)
        canvas_h = max(self.height, o(grid.rows[-1]) + self.tile_h)
        canvas_w = max(self.width, o(grid.cols[-1]) + self.tile_w)
        self.single = grid.count == 1
        self.canvas = torch.zeros(1, channels, canvas_h, canvas_w, device=device, dtype=dtype)
        self.weights = gaussian_weights(self.tile_h, self.tile_w).to(device, dtype)
        self._row_total = self._axis_total(grid.rows, self.tile_h, canvas_h)
        self._col_total = self._axis_total(grid.cols, self.tile_w, canvas_w)

    def _axis_total(self, origins, tile: int, size: int) -> torch.Tensor:
        total = torch.zeros(size, dtype=torch.float64)
        g = gaussian_1d(tile)
        for origin in origins:
            total[self.stage.out(origin) : self.stage.out(origin) + tile] += g
        return total

    def add(self, tiles: torch.Tensor, origins: list[tuple[int, int]]) -> None:
        o = self.stage.out
        for tile, (y, x) in zip(tiles, origins):
            window = self.canvas[0, :, o(y) : o(y) + self.tile_h, o(x) : o(x) + self.tile_w]
            if self.single:
                window.copy_(tile)
            else:
                window += self.weights * tile

    def weight_sum(self) -> torch.Tensor:
        """(H, W) float64 sum of the tiles' weights over the image: the blend's denominator."""
        return torch.outer(self._row_total, self._col_total)[: self.height, : self.width]

    def result(self) -> torch.Tensor:
        """The blended image (1, C, H, W), normalised in place; a view of the canvas."""
        if not self.single:
            cols = self._col_total.to(self.canvas.device, torch.float32)
            rows = self._row_total.to(self.canvas.device, torch.float32)
            width = self.canvas.shape[-1]
            step = max(1, (1 << 20) // width)
            for y0 in range(0, self.canvas.shape[-2], step):
                y1 = min(self.canvas.shape[-2], y0 + step)
                self.canvas[..., y0:y1, :] /= rows[y0:y1, None] * cols[None, :]
        return self.canvas[..., : self.height, : self.width]


# --- running a stage ---------------------------------------------------------------------

def tile_feeds(spec: ComponentSpec, tiled_input: str, tiles: torch.Tensor, env: dict,
               per_copy: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Feeds for one tile batch: the tiles under ``tiled_input``; every other input with a
    ``batch`` dim and no spatial dim (per-image values such as S3Diff's scores) repeated over
    the batch; inputs without a batch dim as they are.

    ``per_copy``: inputs with one value per copy of the batch, (k, ...) each (the adjustable
    UNet's lora_scales and their statistics): the batch becomes k copies of the tiles,
    copy-major (every tile of copy 0, then of copy 1), each copy with its own values."""
    per_copy = per_copy or {}
    copies = len(next(iter(per_copy.values()))) if per_copy else 1
    feeds = {}
    n = tiles.shape[0]
    for tensor in spec.inputs:
        if tensor.name == tiled_input:
            feeds[tensor.name] = tiles if copies == 1 else torch.cat([tiles] * copies)
            continue
        dims = set(d for d in tensor.dims if isinstance(d, str))
        if dims & SPATIAL_DIMS:
            raise ValueError(f"{spec.name}: input {tensor.name} is spatial {tensor.dims}; only {tiled_input} is tiled")
        if tensor.name in per_copy:
            value = per_copy[tensor.name]
            if value.shape[0] != copies:
                raise ValueError(f"{spec.name}: {tensor.name} has {value.shape[0]} copies, expected {copies}")
            feeds[tensor.name] = value.repeat_interleave(n, 0) if n != 1 else value.contiguous()
            continue
        value = env[tensor.name]
        if "batch" in tensor.dims:
            axis = tensor.dims.index("batch")
            if value.shape[axis] != 1:
                raise ValueError(f"{spec.name}: per-image input {tensor.name} has batch {value.shape[axis]}, "
                                 "expected 1")
            shape = list(value.shape)
            shape[axis] = n * copies
            value = value.expand(*shape).contiguous()  # tiny; some runners want dense buffers
        feeds[tensor.name] = value
    return feeds


Progress = Callable[[str, int, int], None]  # (stage, tiles done, tiles in the stage)


def run_stage(stage: StageTiling, grid: TileGrid, read: Callable[[list[tuple[int, int]]], torch.Tensor],
              compute: Callable[[torch.Tensor], torch.Tensor], canvas: BlendCanvas,
              progress: Progress | None = None, timer=None, read_stage: str | None = None,
              label: str | None = None) -> torch.Tensor:
    """Tiles in batches of ``stage.batch``: read, compute, add to ``canvas`` (a BlendCanvas, or
    anything with ``add(outputs, origins)`` and ``result()``, such as the two-pass VAE's
    statistics pool). Returns ``canvas.result()``. Time goes to ``stage.name``; progress is
    reported under ``label`` (default: the stage's name)."""
    origins = grid.origins
    for start in range(0, len(origins), stage.batch):
        batch = origins[start : start + stage.batch]
        if timer is not None and read_stage:
            timer.start(read_stage)
        tiles = read(batch)
        if timer is not None and read_stage:
            timer.stop(read_stage)
        if timer is not None:
            timer.start(stage.name)
        canvas.add(compute(tiles), batch)
        if timer is not None:
            timer.stop(stage.name)
        if progress is not None:
            progress(label or stage.name, min(start + stage.batch, len(origins)), len(origins))
    return canvas.result()


def latent_reader(latent: torch.Tensor, grid: TileGrid) -> Callable[[list[tuple[int, int]]], torch.Tensor]:
    def read(origins):
        return extract_tiles(latent, origins, grid.tile_h, grid.tile_w, pad_mode="reflect")

    return read


def coarse(x: torch.Tensor, factor: int, height: int, width: int) -> torch.Tensor:
    """``x`` averaged over ``factor`` x ``factor`` pixels, the first ``height`` x ``width`` of it
    (the coarse VAE norm's statistics input)."""
    import torch.nn.functional as F

    return F.avg_pool2d(x[..., : height * factor, : width * factor], factor)


def stats_label(stage: str) -> str:
    """The progress label of a two-pass VAE stage's first pass."""
    return f"{stage} stats"


@contextlib.contextmanager
def tile_progress_bar(pipeline, lr: torch.Tensor):
    """Show a tqdm bar (stderr) over every tile of every stage while ``pipeline`` upscales ``lr``."""
    from tqdm import tqdm

    counts = pipeline.tile_counts(*lr.shape[-2:])
    done = dict.fromkeys(counts, 0)
    with tqdm(total=sum(counts.values()), unit="tile", file=sys.stderr, leave=False) as bar:
        def progress(stage: str, finished: int, total: int) -> None:
            bar.set_description(stage)
            bar.update(finished - done[stage])
            done[stage] = finished

        previous, pipeline.progress = pipeline.progress, progress
        try:
            yield bar
        finally:
            pipeline.progress = previous


def check_untiled_inputs(manifest: dict, lr_sizes, limit_megapixels: float | None = None) -> None:
    """``check_untiled`` for LR images of these (height, width), with the manifest's processing and
    limit (``limit_megapixels`` overrides it; no limit when neither exists)."""
    from ..processing import Processing
    from .regions import upscaled_size

    if limit_megapixels is not None and not limit_megapixels > 0:
        raise UserError(f"--untiled-max-mp {limit_megapixels} must be a positive number of megapixels")
    settings = manifest_tiling(manifest)
    limit = limit_megapixels if limit_megapixels is not None else (
        settings.untiled_max_megapixels if settings else None)
    if limit is None:
        return
    processing = Processing.from_dict(manifest["processing"])
    for height, width in lr_sizes:
        check_untiled(*upscaled_size(height, width, processing), limit)


def check_untiled(height: int, width: int, limit_megapixels: float) -> None:
    """Refuse a whole-image run above the configured size, in one line."""
    megapixels = height * width / 1e6
    if megapixels > limit_megapixels:
        raise UserError(
            f"a whole-image run of this input works on {width}x{height} = {megapixels:.1f} MP, above the untiled "
            f"limit of {limit_megapixels:g} MP; drop --no-tile (tiled runs take any size) or raise --untiled-max-mp")


__all__ = [
    "DEFAULT_BATCH", "DEFAULT_OVERLAP", "DEFAULT_TILE", "DEFAULT_UNTILED_MAX_MEGAPIXELS", "DEFAULT_VAE_OVERLAP",
    "DEFAULT_VAE_TILE", "REASONING", "BlendCanvas", "Progress", "StageTiling", "TileGrid", "TilingSettings",
    "check_untiled", "check_untiled_inputs", "coarse", "latent_reader", "manifest_tiling", "plan_tiles", "run_stage",
    "tile_feeds", "tile_geometries", "tile_progress_bar", "tiling_section", "work_ratios",
]
