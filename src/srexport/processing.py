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


@dataclass(frozen=True)
class Processing:
    scale: int
    upscale_filter: str  # "bicubic": PIL-compatible (Keys a=-0.5); "bilinear": torch, align_corners=False
    color_fix: str  # "adain" | "wavelet" | "none"
    # PiSA-SR: an input whose short side is below min_lr_side is first resized up
    # to it (and the result resized back to scale x the original at the end).
    min_lr_side: int = 0
    # How the upscaled image is made to fit the VAE: "resize_floor" resizes to the
    # size floored to a multiple (PiSA-SR); "reflect_pad" pads right/bottom by
    # reflection and crops back (S3Diff).
    size_policy: str = "resize_floor"
    size_multiple: int = 8

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Processing":
        return cls(**d)

    def min_input_side(self) -> int:
        """Smallest LR side accepted: the upscaled side must reach one size multiple."""
        return max(1, -(-self.size_multiple // self.scale))


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


def preprocess(lr: torch.Tensor, p: Processing) -> Prepared:
    """LR image (1,3,h,w) in [0,1] -> encoder input in [-1,1] (UPSTREAM.md step 1 / 2)."""
    h, w = lr.shape[-2:]
    check_input_size(h, w, p)
    pre_resized = bool(p.min_lr_side) and min(h, w) < p.min_lr_side
    x = lr
    if pre_resized:
        s = p.min_lr_side / min(h, w)
        x = resize(x, (int(s * h), int(s * w)), p.upscale_filter)
    if p.upscale_filter == "bilinear":
        up = upsample_bilinear(x, p.scale)
    else:
        up = resize(x, (x.shape[-2] * p.scale, x.shape[-1] * p.scale), p.upscale_filter)
    m = p.size_multiple
    if p.size_policy == "resize_floor":
        floored = (up.shape[-2] // m * m, up.shape[-1] // m * m)
        if floored != tuple(up.shape[-2:]):
            up = resize(up, floored, p.upscale_filter)
        return Prepared(to_model_range(up), up, (h, w), pre_resized)
    if p.size_policy == "reflect_pad":
        model_input = to_model_range(up).clamp(-1, 1)
        ph, pw = -up.shape[-2] % m, -up.shape[-1] % m
        if ph or pw:
            model_input = F.pad(model_input, (0, pw, 0, ph), mode="reflect")
        return Prepared(model_input, up, (h, w), pre_resized)
    raise ValueError(f"unknown size policy {p.size_policy}")


def postprocess(decoded: torch.Tensor, prepared: Prepared, p: Processing) -> torch.Tensor:
    """Decoder output in [-1,1] -> final image (1,3,scale*h,scale*w) in [0,1]."""
    ref = prepared.reference
    out = to_unit_range(decoded)[..., : ref.shape[-2], : ref.shape[-1]]
    out = color_fix(p.color_fix, out, ref)
    if prepared.pre_resized:
        h, w = prepared.original_size
        out = resize(out, (p.scale * h, p.scale * w), p.upscale_filter)
    return out.clamp(0, 1)
