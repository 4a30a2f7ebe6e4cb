"""Non-network steps on (B, C, H, W) float tensors: resize, colour fix, tiling.

Plain deterministic PyTorch, shared by the runtime and the reference pipeline.
"""

from srexport.kernels.color import (
    COLOR_FIXES,
    adain_color_fix,
    color_fix,
    wavelet_blur,
    wavelet_color_fix,
    wavelet_decomposition,
)
from srexport.kernels.resize import (
    RESIZE_FILTERS,
    describe_filter,
    resize,
    resize_weights,
    to_model_range,
    to_unit_range,
    upsample_bilinear,
)
from srexport.kernels.tiling import (
    blend_tiles,
    extract_tiles,
    gaussian_weights,
    reflect_indices,
    tile_grid,
    tile_origins,
    weight_sum,
)

__all__ = [
    "COLOR_FIXES",
    "RESIZE_FILTERS",
    "adain_color_fix",
    "blend_tiles",
    "color_fix",
    "describe_filter",
    "extract_tiles",
    "gaussian_weights",
    "reflect_indices",
    "resize",
    "resize_weights",
    "tile_grid",
    "tile_origins",
    "to_model_range",
    "to_unit_range",
    "upsample_bilinear",
    "wavelet_blur",
    "wavelet_color_fix",
    "wavelet_decomposition",
    "weight_sum",
]
