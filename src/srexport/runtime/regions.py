"""Pre- and post-processing by regions, so no full-resolution float copy of the input exists.

The tiled pipeline needs the encoder input one tile at a time, and the colour
fix needs the output only per channel (adain) or within a short reach
(wavelet). So, for an image of any size:

- ``UpscaledSource`` computes any region of the encoder input, and of the
  colour-fix reference, straight from the (small) LR image. Every step of
  ``processing.preprocess`` after the pre-resize is linear and separable (the
  PIL-compatible resize, torch's bilinear upsampling, the resize that floors to
  a size multiple, reflect padding), so one banded matrix per axis maps LR
  pixels to encoder-input pixels and a region is ``W_rows @ lr_window @ W_cols^T``.
  The sizes of every step come from ``Processing.axis``, the one implementation
  of the size policies, which ``preprocess`` uses too.
  The composed taps are computed in float64 and rounded once to float32, so a
  region equals ``preprocess``'s pixels to float32 rounding (tested), not bit for bit.
- ``finish_in_place`` turns the blended decoder canvas into the final image
  in place, in bands of rows: to [0, 1], the colour fix, the clamp. adain's
  channel statistics are accumulated in float64 over bands (target and
  reference); the wavelet fix runs on bands with a 32-row halo, which covers
  the reach of its five dilated 3x3 blurs (1 + 2 + 4 + 8 + 16 = 31 rows), so
  every band's core equals the whole-image result.

Only the pre-resize of small inputs (an LR-sized operation) and the resize
back at the end (only for those small inputs) work on whole images.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import UserError
from ..kernels import COLOR_FIXES, resize
from ..kernels.color import WAVELET_LEVELS, wavelet_color_fix
from ..kernels.resize import convolution_taps  # `resize`'s own taps, banded
from ..kernels.tiling import reflect_indices
from ..processing import Processing, check_input_size, pre_resize

# Rows of halo a wavelet band needs: the five blurs reach 2^0 + ... + 2^4 = 31 rows.
WAVELET_HALO = 2**WAVELET_LEVELS
# Pixels per band of the in-place passes (bounded temporaries at any width).
BAND_PIXELS = 1 << 20
# Columns per piece of a region: keeps each axis's composed matrix about COLUMN_CHUNK x COLUMN_CHUNK / scale.
COLUMN_CHUNK = 1024


# --- one axis of pre-processing as banded linear maps ------------------------------------


class _Resample:
    """One resampling step along an axis: output pixel i = sum_k w[k] * input[first + k]."""

    def __init__(self, in_size: int, out_size: int, filter: str):
        self.in_size, self.out_size, self.filter = in_size, out_size, filter

    def taps(self, i: int) -> tuple[int, np.ndarray]:
        if self.filter == "torch_bilinear":
            return _torch_bilinear_taps(self.in_size, self.out_size, i)
        if self.filter == "nearest":
            from ..kernels import resize_weights

            row = resize_weights(self.in_size, self.out_size, "nearest")[i].numpy()
            j = int(row.argmax())
            return j, np.ones(1)
        return _pil_taps(self.in_size, self.out_size, self.filter, i)


def _pil_taps(in_size: int, out_size: int, filter: str, i: int) -> tuple[int, np.ndarray]:
    first, row = convolution_taps(in_size, out_size, filter, i)
    # resize() applies float32 weights: round the same way.
    return first, np.asarray(row, dtype=np.float32).astype(np.float64)


def _torch_bilinear_taps(in_size: int, out_size: int, i: int) -> tuple[int, np.ndarray]:
    # torch's bilinear, align_corners=False: source = (i + 0.5) * in/out - 0.5, clamped at 0.
    source = max((i + 0.5) * (in_size / out_size) - 0.5, 0.0)
    i0 = int(source)
    lam = source - i0
    if i0 >= in_size - 1:
        return in_size - 1, np.ones(1)
    return i0, np.array([1.0 - lam, lam])


class AxisMap:
    """LR pixels -> pre-processed pixels along one axis, as a chain of resampling steps
    (first applied first) followed by index maps (reflect padding)."""

    def __init__(self, lr_size: int, steps: list[_Resample], size: int, reference_size: int):
        self.lr_size = lr_size
        self.steps = steps
        self.size = size  # encoder-input pixels (padded to the size multiple for reflect_pad)
        self.reference_size = reference_size  # the upscaled image's pixels (colour-fix reference)
        self._cache: dict[bytes, tuple[int, torch.Tensor]] = {}

    def block(self, indices: np.ndarray) -> tuple[int, torch.Tensor]:
        """(first, W): reference pixels ``indices`` = W (n, span) @ lr[first : first + span]."""
        indices = np.asarray(indices, dtype=np.int64)
        key = indices.tobytes()
        if key in self._cache:  # least recently used goes first
            self._cache[key] = self._cache.pop(key)
        else:
            if len(self._cache) >= 64:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = self._block(indices)
        return self._cache[key]

    def _block(self, indices: np.ndarray) -> tuple[int, torch.Tensor]:
        if indices.min() < 0 or indices.max() >= self.reference_size:
            # callers map every index into the reference first (UpscaledSource._to_reference)
            raise ValueError(f"reference indices {int(indices.min())}..{int(indices.max())} are outside "
                             f"0..{self.reference_size - 1}")
        positions = [int(i) for i in indices]
        matrix = None
        for step in reversed(self.steps):
            # the taps of each needed output of this step, over the step's input window [lo, hi)
            rows = [step.taps(i) for i in positions]
            lo = min(f for f, _ in rows)
            hi = max(f + len(w) for f, w in rows)
            taps = np.zeros((len(rows), hi - lo))
            for k, (f, w) in enumerate(rows):
                taps[k, f - lo : f - lo + len(w)] = w
            matrix = taps if matrix is None else matrix @ taps
            positions = list(range(lo, hi))
        return positions[0], torch.from_numpy(matrix.astype(np.float32))


class UpscaledSource:
    """The encoder input and the colour-fix reference of one LR image, computed by regions.

    ``model_region`` returns rows x cols of ``preprocess(lr).model_input`` for any
    index vectors (positions past the end reflect about the edge, as tile padding
    does); ``reference_rows`` returns full-width bands of ``preprocess(lr).reference``.
    """

    def __init__(self, lr: torch.Tensor, p: Processing):
        h, w = lr.shape[-2:]
        check_input_size(h, w, p)
        self.processing = p
        self.original_size = (h, w)
        self.lr, self.pre_resized = pre_resize(lr, p)  # an LR-sized operation, whole
        self.axes = tuple(self._axis(n, p) for n in self.lr.shape[-2:])
        self._all_columns = np.arange(self.reference_size[1])

    @staticmethod
    def _axis(n: int, p: Processing) -> AxisMap:
        sizes = p.axis(n)
        steps = [_Resample(n, sizes.upscaled, "torch_bilinear" if p.upscale_filter == "bilinear" else p.upscale_filter)]
        if sizes.reference != sizes.upscaled:  # resize_floor's second resize
            steps.append(_Resample(sizes.upscaled, sizes.reference, p.upscale_filter))
        return AxisMap(n, steps, sizes.model, sizes.reference)

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the encoder input."""
        return self.axes[0].size, self.axes[1].size

    @property
    def reference_size(self) -> tuple[int, int]:
        return self.axes[0].reference_size, self.axes[1].reference_size

    def _region(self, rows: np.ndarray, cols: np.ndarray) -> torch.Tensor:
        if len(cols) > COLUMN_CHUNK:  # banded matrices stay small however wide the image
            return torch.cat([self._region(rows, cols[i : i + COLUMN_CHUNK])
                              for i in range(0, len(cols), COLUMN_CHUNK)], dim=-1)
        fy, wy = self.axes[0].block(rows)
        fx, wx = self.axes[1].block(cols)
        window = self.lr[..., fy : fy + wy.shape[1], fx : fx + wx.shape[1]]
        wy, wx = wy.to(window.device, window.dtype), wx.to(window.device, window.dtype)
        # Width first, then height, as kernels.resize does.
        out = torch.einsum("bchw,ow->bcho", window, wx)
        return torch.einsum("bchw,oh->bcow", out, wy)

    def model_region(self, rows, cols) -> torch.Tensor:
        """(1, 3, len(rows), len(cols)) of the encoder input in [-1, 1]."""
        rows, cols = (self._to_reference(np.asarray(v), a) for v, a in zip((rows, cols), self.axes))
        region = self._region(rows, cols) * 2.0 - 1.0
        return region.clamp(-1, 1) if self.processing.clamps_model_input else region

    @staticmethod
    def _to_reference(indices: np.ndarray, axis: AxisMap) -> np.ndarray:
        # Padding to the size multiple (reflect_pad), then padding past the encoder input
        # (tiles larger than the image): both mirror about the edge pixel.
        indices = reflect_indices(torch.from_numpy(indices.astype(np.int64)), axis.size).numpy()
        if axis.size != axis.reference_size:
            indices = reflect_indices(torch.from_numpy(indices), axis.reference_size).numpy()
        return indices

    def model_tile(self, y: int, x: int, tile_h: int, tile_w: int) -> torch.Tensor:
        return self.model_region(np.arange(y, y + tile_h), np.arange(x, x + tile_w))

    def coarse_model_input(self, factor: int, height: int, width: int) -> torch.Tensor:
        """(1, 3, height, width): the encoder input averaged over ``factor`` x ``factor`` pixels (the
        coarse VAE norm's statistics input), read in bands of whole blocks so memory stays bounded
        by a band, not the image; equal to ``F.avg_pool2d`` of the whole input."""
        import torch.nn.functional as F

        step = max(1, band_rows(width * factor) // factor) * factor
        cols = np.arange(width * factor)
        bands = [F.avg_pool2d(self.model_region(np.arange(y, min(y + step, height * factor)), cols), factor)
                 for y in range(0, height * factor, step)]
        return torch.cat(bands, dim=-2)

    def reference_rows(self, y0: int, y1: int) -> torch.Tensor:
        """(1, 3, y1 - y0, W_ref) of the reference (the upscaled input, [0, 1], unclamped)."""
        return self._region(np.arange(y0, y1), self._all_columns)


# --- post-processing in place ------------------------------------------------------------


def band_rows(width: int) -> int:
    return max(WAVELET_HALO, BAND_PIXELS // max(1, width))


def _bands(height: int, width: int):
    step = band_rows(width)
    for y0 in range(0, height, step):
        yield y0, min(height, y0 + step)


def channel_mean_std(rows, height: int, width: int, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and sqrt(unbiased variance + eps) of an image given by bands
    (``rows(y0, y1)``), accumulated in float64 in two passes: the adain statistics."""
    count = height * width
    total = 0
    for y0, y1 in _bands(height, width):
        total = total + rows(y0, y1).double().sum(dim=(0, 2, 3))
    mean = total / count
    squares = 0
    for y0, y1 in _bands(height, width):
        squares = squares + ((rows(y0, y1).double() - mean[:, None, None]) ** 2).sum(dim=(0, 2, 3))
    std = (squares / max(1, count - 1) + eps).sqrt()
    return mean.float()[None, :, None, None], std.float()[None, :, None, None]


def finish_in_place(decoded: torch.Tensor, source: UpscaledSource) -> torch.Tensor:
    """Blended decoder output (1, 3, H, W) in [-1, 1] -> the final image in [0, 1]:
    ``processing.postprocess``, band by band, writing into ``decoded``'s memory.

    Returns a view of ``decoded`` cropped to the reference size (or, for inputs
    that were pre-resized, the resized image)."""
    p = source.processing
    ref_h, ref_w = source.reference_size
    out = decoded[..., :ref_h, :ref_w]
    for y0, y1 in _bands(ref_h, ref_w):
        band = out[..., y0:y1, :]
        band.clamp_(-1.0, 1.0).mul_(0.5).add_(0.5)  # kernels.to_unit_range, in place
    if p.color_fix == "adain":
        target_mean, target_std = channel_mean_std(lambda a, b: out[..., a:b, :], ref_h, ref_w)
        source_mean, source_std = channel_mean_std(source.reference_rows, ref_h, ref_w)
        for y0, y1 in _bands(ref_h, ref_w):
            # kernels.adain_color_fix's arithmetic, in place
            out[..., y0:y1, :].sub_(target_mean).div_(target_std).mul_(source_std).add_(source_mean)
    elif p.color_fix == "wavelet":
        _wavelet_in_place(out, source)
    elif p.color_fix != "none":
        raise UserError(f"unknown colour fix {p.color_fix!r}; choose one of: {', '.join(COLOR_FIXES)}")
    if source.pre_resized:
        out = resize(out, p.output_size(*source.original_size), p.upscale_filter)
    for y0, y1 in _bands(out.shape[-2], out.shape[-1]):
        out[..., y0:y1, :].clamp_(0.0, 1.0)
    return out


def _wavelet_in_place(out: torch.Tensor, source: UpscaledSource) -> None:
    # Bands are at least one halo tall (band_rows), so the rows above a band that
    # its halo needs are the last `halo` original rows of the previous band.
    height, width = out.shape[-2:]
    halo = WAVELET_HALO
    above = out[..., :0, :].clone()
    for y0, y1 in _bands(height, width):
        top, bottom = max(0, y0 - halo), min(height, y1 + halo)
        if above.shape[-2] != y0 - top:  # band_rows keeps every band at least one halo tall
            raise RuntimeError(f"wavelet band at row {y0} has {above.shape[-2]} rows of halo above, "
                               f"needs {y0 - top}")
        target = torch.cat([above, out[..., y0:bottom, :]], dim=-2)  # original values
        fixed = wavelet_color_fix(target, source.reference_rows(top, bottom))
        above = out[..., max(0, y1 - halo) : y1, :].clone()
        out[..., y0:y1, :] = fixed[..., y0 - top : y1 - top, :]


def to_uint8_hwc(image: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in [0, 1] -> (H, W, 3) uint8, as ``images.tensor_to_pil`` rounds, converting
    in bands so that no full-size float temporary is made."""
    height, width = image.shape[-2:]
    array = np.empty((height, width, 3), dtype=np.uint8)
    for y0, y1 in _bands(height, width):
        band = image[0, :, y0:y1, :].clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0
        array[y0:y1] = band.round().astype(np.uint8)
    return array


def upscaled_size(lr_height: int, lr_width: int, p: Processing) -> tuple[int, int]:
    """(H, W) of the encoder input ``preprocess`` makes from an LR image of this size."""
    return p.model_size(lr_height, lr_width)


__all__ = ["AxisMap", "UpscaledSource", "channel_mean_std", "finish_in_place", "to_uint8_hwc", "upscaled_size"]
