"""Pre- and post-processing around the networks, driven by data.

``Processing`` is the manifest's ``processing`` section: every constant a
service needs to reproduce what happens before the encoder and after the
decoder. The PyTorch reference and the runtime both call these functions, so
the networks are the only thing the backends differ in.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .errors import UserError
from .kernels import color_fix, resize, to_model_range, to_unit_range, upsample_bilinear


# Manifest names of the ways the upscaled image is made to fit the VAE (see Processing).
SIZE_POLICIES = ("resize_floor", "reflect_pad")


@dataclass(frozen=True)
class AxisSizes:
    """One axis of ``preprocess``'s geometry, in pixels, for a (pre-resized) LR side."""

    lr: int  # the LR side after the pre-resize of small inputs
    upscaled: int  # lr * scale
    reference: int  # the colour-fix reference, and the decoder output kept: upscaled, or floored
    model: int  # the encoder input, a multiple of size_multiple: reference, or padded past it


@dataclass(frozen=True)
class Processing:
    scale: int
    upscale_filter: str  # "bicubic": PIL-compatible (Keys a=-0.5); "bilinear": torch, align_corners=False
    color_fix: str  # "adain" | "wavelet" | "none"
    # PiSA-SR: an input whose short side is below min_lr_side is first resized up
    # to it (and the result resized back to scale x the original at the end).
    min_lr_side: int = 0
    # How the upscaled image is made to fit the VAE (the manifest records which):
    # "resize_floor" resizes it to its size floored to the multiple, so the output
    # loses up to multiple-1 pixels per side (upstream PiSA-SR, and PiSA-SR
    # artifacts built before --size-policy); "reflect_pad" clamps the encoder
    # input to [-1, 1] (the range of upstream's 8-bit images), reflect-pads it
    # right/bottom and crops the decoder output back (S3Diff; PiSA-SR's default).
    size_policy: str = "resize_floor"
    size_multiple: int = 8

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Processing":
        processing = cls(**d)
        if processing.size_policy not in SIZE_POLICIES:
            raise UserError(f"the artifact's processing.size_policy {processing.size_policy!r} is not one of "
                            f"{', '.join(SIZE_POLICIES)}; rebuild it with this srexport")
        return processing

    def min_input_side(self) -> int:
        """Smallest LR side accepted: the upscaled side must reach one size multiple."""
        return max(1, -(-self.size_multiple // self.scale))

    # --- the geometry: the one place that knows what a size policy does to sizes ----------

    def pre_resized_size(self, height: int, width: int) -> tuple[int, int] | None:
        """Upstream PiSA-SR's pre-resize of small inputs: the short side to min_lr_side
        (int() truncation as upstream, so it can land one pixel short); None if not needed."""
        if not self.min_lr_side or min(height, width) >= self.min_lr_side:
            return None
        s = self.min_lr_side / min(height, width)
        return int(s * height), int(s * width)

    def axis(self, lr_side: int) -> AxisSizes:
        """The sizes along one axis for a (pre-resized) LR side."""
        up = lr_side * self.scale
        m = self.size_multiple
        if self.size_policy == "resize_floor":
            return AxisSizes(lr_side, up, up // m * m, up // m * m)
        if self.size_policy == "reflect_pad":
            return AxisSizes(lr_side, up, up, up + (-up % m))
        raise ValueError(f"unknown size policy {self.size_policy!r}; expected one of {', '.join(SIZE_POLICIES)}")

    def axes(self, height: int, width: int) -> tuple[AxisSizes, AxisSizes]:
        """Both axes for an LR image as given (the pre-resize applied)."""
        h, w = self.pre_resized_size(height, width) or (height, width)
        return self.axis(h), self.axis(w)

    def model_size(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) of the encoder input made from an LR image of this size."""
        ys, xs = self.axes(height, width)
        return ys.model, xs.model

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) of the final image: scale x the LR size, except where resize_floor floors
        an input that was not pre-resized (pre-resized inputs are resized back to scale x)."""
        if self.pre_resized_size(height, width) is not None:
            return self.scale * height, self.scale * width
        ys, xs = self.axes(height, width)
        return ys.reference, xs.reference

    @property
    def clamps_model_input(self) -> bool:
        # resize_floor artifacts always fed the bicubic overshoot through unclamped: they keep doing so
        return self.size_policy == "reflect_pad"


@dataclass
class Prepared:
    """An image made ready for the encoder, and what post-processing needs to undo."""

    model_input: torch.Tensor  # (1,3,H,W) in [-1,1], H and W multiples of size_multiple
    reference: torch.Tensor  # (1,3,h,w) in [0,1]: the upscaled input, colour-fix source
    original_size: tuple[int, int]  # LR (h, w) as given
    pre_resized: bool


def check_input_size(height: int, width: int, p: Processing, name: str = "image") -> None:
    if min(height, width) < p.min_input_side():
        raise UserError(
            f"{name} is {width}x{height}; this model needs at least {p.min_input_side()} pixels per side at x{p.scale}"
        )


def pre_resize(lr: torch.Tensor, p: Processing) -> tuple[torch.Tensor, bool]:
    """The LR image after upstream's pre-resize of small inputs, and whether it happened."""
    size = p.pre_resized_size(*lr.shape[-2:])
    return (lr, False) if size is None else (resize(lr, size, p.upscale_filter), True)


def preprocess(lr: torch.Tensor, p: Processing) -> Prepared:
    """LR image (1,3,h,w) in [0,1] -> encoder input in [-1,1] (UPSTREAM.md step 1 / 2)."""
    h, w = lr.shape[-2:]
    check_input_size(h, w, p)
    x, pre_resized = pre_resize(lr, p)
    ys, xs = p.axis(x.shape[-2]), p.axis(x.shape[-1])
    if p.upscale_filter == "bilinear":
        up = upsample_bilinear(x, p.scale)
    else:
        up = resize(x, (ys.upscaled, xs.upscaled), p.upscale_filter)
    if (ys.reference, xs.reference) != (ys.upscaled, xs.upscaled):
        up = resize(up, (ys.reference, xs.reference), p.upscale_filter)
    model_input = to_model_range(up)
    if p.clamps_model_input:
        model_input = model_input.clamp(-1, 1)
    ph, pw = ys.model - ys.reference, xs.model - xs.reference
    if ph or pw:
        model_input = F.pad(model_input, (0, pw, 0, ph), mode="reflect")
    return Prepared(model_input, up, (h, w), pre_resized)


def postprocess(decoded: torch.Tensor, prepared: Prepared, p: Processing) -> torch.Tensor:
    """Decoder output in [-1,1] -> final image (1,3,scale*h,scale*w) in [0,1]."""
    ref = prepared.reference
    out = to_unit_range(decoded)[..., : ref.shape[-2], : ref.shape[-1]]
    out = color_fix(p.color_fix, out, ref)
    if prepared.pre_resized:
        out = resize(out, p.output_size(*prepared.original_size), p.upscale_filter)
    return out.clamp(0, 1)
