"""Resizing and value-range mapping on NCHW float tensors.

``resize`` reproduces Pillow's resampler (``Image.resize``) so the reference
pipeline matches upstream, which resizes PIL images. It is written from the
published facts of Pillow's ``Resample.c``, not its code:

* separable: one weight matrix per axis, rows = output pixels, columns = input
  pixels; height and width are resampled independently;
* scale = in / out; an output pixel ``i`` is centred at ``(i + 0.5) * scale``
  in input coordinates (pixel centres at half-integers);
* when downsampling the filter is stretched by the scale (``support * scale``
  and arguments divided by the scale): that is Pillow's antialiasing;
* the input window ``[int(center - support + 0.5), int(center + support + 0.5))``
  is clipped to the image and its weights are normalised to sum to 1, which
  also defines the border behaviour (no padding);
* ``nearest`` is not a convolution in Pillow: it picks input index
  ``int(0.5 * scale + i * scale)`` (accumulated left to right in float64).

A C++ service can rebuild the matrices from ``describe_filter`` and this text.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from srexport.errors import UserError

__all__ = [
    "RESIZE_FILTERS",
    "describe_filter",
    "resize",
    "resize_weights",
    "to_model_range",
    "to_unit_range",
    "upsample_bilinear",
]


def _box(x: float) -> float:
    return 1.0 if -0.5 < x <= 0.5 else 0.0


def _triangle(x: float) -> float:
    x = abs(x)
    return 1.0 - x if x < 1.0 else 0.0


# Pillow writes these two constants as C float literals; keep their float32 values.
_HAMMING_ALPHA = float(np.float32(0.54))
_HAMMING_BETA = float(np.float32(0.46))


def _hamming(x: float) -> float:
    x = abs(x)
    if x == 0.0:
        return 1.0
    if x >= 1.0:
        return 0.0
    x *= math.pi
    return math.sin(x) / x * (_HAMMING_ALPHA + _HAMMING_BETA * math.cos(x))


_CUBIC_A = -0.5  # Keys' cubic with a = -0.5 (Catmull-Rom), as in Pillow


def _keys_cubic(x: float) -> float:
    a = _CUBIC_A
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x *= math.pi
    return math.sin(x) / x


_LANCZOS_A = 3


def _lanczos(x: float) -> float:
    if -_LANCZOS_A <= x < _LANCZOS_A:
        return _sinc(x) * _sinc(x / _LANCZOS_A)
    return 0.0


# name -> (kernel function, support in input pixels at scale 1, manifest description)
CONVOLUTION_FILTERS: dict[str, tuple[Callable[[float], float], float, dict]] = {
    "box": (_box, 0.5, {"kernel": "box"}),
    "bilinear": (_triangle, 1.0, {"kernel": "triangle"}),
    "hamming": (_hamming, 1.0, {"kernel": "hamming", "alpha": _HAMMING_ALPHA, "beta": _HAMMING_BETA}),
    "bicubic": (_keys_cubic, 2.0, {"kernel": "keys_cubic", "a": _CUBIC_A}),
    "lanczos": (_lanczos, float(_LANCZOS_A), {"kernel": "lanczos", "a": _LANCZOS_A}),
}

RESIZE_FILTERS: tuple[str, ...] = ("nearest", *CONVOLUTION_FILTERS)


def _check_filter(filter: str) -> None:
    if filter not in RESIZE_FILTERS:
        raise UserError(f"unknown resize filter {filter!r}; choose one of: {', '.join(RESIZE_FILTERS)}")


def describe_filter(filter: str) -> dict:
    """JSON-ready description of a resize filter, for the manifest."""
    _check_filter(filter)
    if filter == "nearest":
        return {"kernel": "nearest", "index": "int(0.5*scale + i*scale)", "antialias": False, "convention": "pil"}
    _, support, description = CONVOLUTION_FILTERS[filter]
    return {**description, "support": support, "antialias": True, "convention": "pil"}


def _nearest_weights(in_size: int, out_size: int) -> np.ndarray:
    scale = in_size / out_size
    weights = np.zeros((out_size, in_size), dtype=np.float64)
    # Running sum, in Pillow's order, so indices agree where a product lands
    # exactly on an integer boundary.
    position = 0.5 * scale
    for i in range(out_size):
        weights[i, min(int(position), in_size - 1)] = 1.0
        position += scale
    return weights


def convolution_taps(in_size: int, out_size: int, filter: str, i: int) -> tuple[int, list[float]]:
    """Output pixel ``i``'s first input pixel and float64 weights, by Pillow's formula (one row
    of the resize matrix: a region of an image needs only its own rows)."""
    kernel, base_support, _ = CONVOLUTION_FILTERS[filter]
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)  # stretch only when downsampling (antialias)
    support = base_support * filter_scale
    inverse_filter_scale = 1.0 / filter_scale  # multiply, as Pillow does, for bit-equal weights
    center = (i + 0.5) * scale
    # int() truncates toward zero like Pillow's C cast; the clip makes the sign moot.
    first = max(int(center - support + 0.5), 0)
    stop = min(int(center + support + 0.5), in_size)
    row = [kernel((j - center + 0.5) * inverse_filter_scale) for j in range(first, stop)]
    total = sum(row)
    if total != 0.0:
        row = [w / total for w in row]
    return first, row


def _convolution_weights(in_size: int, out_size: int, filter: str) -> np.ndarray:
    weights = np.zeros((out_size, in_size), dtype=np.float64)
    for i in range(out_size):
        first, row = convolution_taps(in_size, out_size, filter, i)
        weights[i, first:first + len(row)] = row
    return weights


@functools.lru_cache(maxsize=256)
def _cached_weights(in_size: int, out_size: int, filter: str) -> torch.Tensor:
    if filter == "nearest":
        weights = _nearest_weights(in_size, out_size)
    else:
        weights = _convolution_weights(in_size, out_size, filter)
    return torch.from_numpy(weights.astype(np.float32))


def resize_weights(in_size: int, out_size: int, filter: str = "bicubic") -> torch.Tensor:
    """Weight matrix (out_size, in_size) of one axis; ``resize`` applies one per axis."""
    _check_filter(filter)
    if in_size < 1 or out_size < 1:
        raise UserError(f"cannot resize {in_size} pixels to {out_size}: sizes must be positive")
    return _cached_weights(int(in_size), int(out_size), filter)


def resize(images: torch.Tensor, size: tuple[int, int], filter: str = "bicubic") -> torch.Tensor:
    """Resize (B, C, H, W) float images to ``size = (height, width)`` as Pillow does.

    Note the order: (height, width) like ``F.interpolate``, not PIL's (width, height).
    """
    if images.ndim != 4:
        raise ValueError(f"resize takes (B, C, H, W) images, not shape {tuple(images.shape)}; add the missing "
                         "dimensions (e.g. image[None])")
    if not images.is_floating_point():
        raise TypeError(f"resize takes float images, not {images.dtype}; convert first (e.g. image.float() / 255)")
    _check_filter(filter)
    out_h, out_w = (int(s) for s in size)
    in_h, in_w = images.shape[-2:]
    out = images
    # Pillow skips an axis whose size is unchanged; the weights would be the
    # identity anyway, so skipping only saves work.
    if out_w != in_w:
        weights_w = resize_weights(in_w, out_w, filter).to(images.device, images.dtype)
        out = torch.einsum("bchw,ow->bcho", out, weights_w)
    if out_h != in_h:
        weights_h = resize_weights(in_h, out_h, filter).to(images.device, images.dtype)
        out = torch.einsum("bchw,oh->bcow", out, weights_h)
    if out is images:
        out = images.clone()  # callers may write into the result
    return out


def upsample_bilinear(images: torch.Tensor, factor: int) -> torch.Tensor:
    """Upsample by an integer factor with torch's bilinear, align_corners=False (S3Diff)."""
    if int(factor) != factor or factor < 1:
        raise UserError(f"upsampling factor must be a positive integer, got {factor}")
    factor = int(factor)
    height, width = images.shape[-2:]
    return F.interpolate(images, size=(height * factor, width * factor), mode="bilinear", align_corners=False)


def to_model_range(images01: torch.Tensor) -> torch.Tensor:
    """[0, 1] images to the VAE's [-1, 1]."""
    return images01 * 2.0 - 1.0


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """VAE output to [0, 1]; clamped first, as both upstream pipelines do."""
    return images.clamp(-1.0, 1.0) * 0.5 + 0.5
