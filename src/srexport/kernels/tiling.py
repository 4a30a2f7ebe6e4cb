"""Tile geometry and Gaussian blending: the plain reference.

Tiles have one fixed shape (static engines). Origins sit on a stride of
``tile - overlap`` with the last one moved back to touch the far edge, as
upstream does. An image smaller than a tile is padded by ``extract_tiles``
(replicate, or reflect: mirrored about the edge pixel, repeated for pads
longer than the image) up to the tile shape, and ``blend_tiles`` crops the
padding off.
Weights are the upstream Gaussian; its normalising constant cancels in
``sum(w * tile) / sum(w)``, so it is left out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from srexport.artifact.tile_settings import GAUSSIAN_VARIANCE
from srexport.errors import UserError

__all__ = [
    "blend_tiles",
    "extract_tiles",
    "gaussian_1d",
    "gaussian_weights",
    "reflect_indices",
    "tile_grid",
    "tile_origins",
    "weight_sum",
]



def gaussian_1d(size: int, var: float = GAUSSIAN_VARIANCE) -> torch.Tensor:
    """(size,) float64 Gaussian tile weight along one axis (``gaussian_weights`` is its outer product)."""
    x = torch.arange(size, dtype=torch.float64)
    midpoint = (size - 1) / 2
    return torch.exp(-((x - midpoint) ** 2) / (2 * var * size * size))


def gaussian_weights(tile_h: int, tile_w: int, var: float = GAUSSIAN_VARIANCE) -> torch.Tensor:
    """(tile_h, tile_w) float32 blending weights, peaked at the tile centre."""
    if tile_h < 1 or tile_w < 1 or var <= 0:
        raise UserError(f"Gaussian tile weights need positive sizes and variance, got {tile_h}x{tile_w}, var={var}")
    return torch.outer(gaussian_1d(tile_h, var), gaussian_1d(tile_w, var)).float()


def tile_origins(size: int, tile: int, overlap: int) -> list[int]:
    """Tile start offsets along one axis of length ``size``; the last tile ends at the edge."""
    if not 0 <= overlap < tile:
        raise UserError(f"tile overlap must be in [0, tile), got tile={tile}, overlap={overlap}")
    if size < 1:
        raise UserError(f"cannot tile an axis of size {size}")
    if size <= tile:
        return [0]
    last = size - tile
    return sorted({*range(0, last, tile - overlap), last})


def tile_grid(height: int, width: int, tile_h: int, tile_w: int, overlap: int) -> list[tuple[int, int]]:
    """(y, x) tile origins, row-major."""
    return [(y, x) for y in tile_origins(height, tile_h, overlap) for x in tile_origins(width, tile_w, overlap)]


def _canvas_size(origins: list[tuple[int, int]], height: int, width: int, tile_h: int, tile_w: int) -> tuple[int, int]:
    # Large enough for every tile, including those running past a small image.
    return (
        max(height, max(y for y, _ in origins) + tile_h),
        max(width, max(x for _, x in origins) + tile_w),
    )


def reflect_indices(indices: torch.Tensor, size: int) -> torch.Tensor:
    """Map integer positions (any, even far past either end) into ``[0, size)`` by reflection
    about the edge pixels (``F.pad``'s "reflect", which repeats for pads longer than the axis)."""
    if size == 1:
        return torch.zeros_like(indices)
    period = 2 * (size - 1)
    folded = torch.remainder(indices, period)
    return torch.where(folded < size, folded, period - folded)


def extract_tiles(
    image: torch.Tensor, origins: list[tuple[int, int]], tile_h: int, tile_w: int, pad_mode: str = "replicate"
) -> torch.Tensor:
    """Cut a (1, C, H, W) image into (N, C, tile_h, tile_w) tiles at ``origins``.

    Tiles running past the image are filled by ``pad_mode``: "replicate" or "reflect"."""
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"extract_tiles takes one image (1, C, H, W), not shape {tuple(image.shape)}; "
                         "cut each image of a batch separately")
    if not origins or any(y < 0 or x < 0 for y, x in origins):
        raise ValueError(f"extract_tiles needs at least one origin, all non-negative; got {list(origins)[:4]}")
    if pad_mode not in ("replicate", "reflect"):
        raise ValueError(f"unknown pad mode {pad_mode!r}; use replicate or reflect")
    height, width = image.shape[-2:]
    canvas_h, canvas_w = _canvas_size(origins, height, width, tile_h, tile_w)
    if (canvas_h, canvas_w) != (height, width):
        if pad_mode == "replicate":
            image = F.pad(image, (0, canvas_w - width, 0, canvas_h - height), mode="replicate")
        else:
            rows = reflect_indices(torch.arange(canvas_h, device=image.device), height)
            cols = reflect_indices(torch.arange(canvas_w, device=image.device), width)
            image = image.index_select(-2, rows).index_select(-1, cols)
    return torch.cat([image[..., y : y + tile_h, x : x + tile_w] for y, x in origins])


def _accumulate(
    tiles: torch.Tensor | None,
    origins: list[tuple[int, int]],
    height: int,
    width: int,
    weights: torch.Tensor,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    tile_h, tile_w = weights.shape
    canvas_h, canvas_w = _canvas_size(origins, height, width, tile_h, tile_w)
    weight_total = torch.zeros(canvas_h, canvas_w, dtype=weights.dtype, device=weights.device)
    weighted = None
    if tiles is not None:
        weighted = tiles.new_zeros(1, tiles.shape[1], canvas_h, canvas_w)
    for index, (y, x) in enumerate(origins):
        weight_total[y : y + tile_h, x : x + tile_w] += weights
        if weighted is not None:
            weighted[..., y : y + tile_h, x : x + tile_w] += weights * tiles[index]
    crop = (slice(0, height), slice(0, width))
    return (None if weighted is None else weighted[..., crop[0], crop[1]]), weight_total[crop]


def weight_sum(origins: list[tuple[int, int]], height: int, width: int, weights: torch.Tensor) -> torch.Tensor:
    """(H, W) sum of tile weights over the image: the blend's denominator."""
    return _accumulate(None, origins, height, width, weights)[1]


def blend_tiles(
    tiles: torch.Tensor,
    origins: list[tuple[int, int]],
    height: int,
    width: int,
    weights: torch.Tensor,
) -> torch.Tensor:
    """Join (N, C, th, tw) tiles into a (1, C, H, W) image: sum(w * tile) / sum(w)."""
    if tiles.ndim != 4 or tiles.shape[0] != len(origins):
        raise ValueError(f"blend_tiles needs (N, C, th, tw) tiles, one per origin; got shape {tuple(tiles.shape)} "
                         f"for {len(origins)} origins")
    if tuple(tiles.shape[-2:]) != tuple(weights.shape):
        raise ValueError(f"blend weights of shape {tuple(weights.shape)} do not match tiles of "
                         f"{tuple(tiles.shape[-2:])}; make them with the tile's shape")
    weights = weights.to(tiles.device, tiles.dtype)
    weighted, weight_total = _accumulate(tiles, origins, height, width, weights)
    return weighted / weight_total
