"""Colour fixes: give the model's output the colours of the upscaled input.

Both follow StableSR's formulas, which PiSA-SR (``adain`` by default) and
S3Diff (``wavelet`` by default) reuse. Inputs are (B, C, H, W) float tensors,
the output of the model first, the reference (upscaled input) second.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from srexport.errors import UserError

__all__ = [
    "COLOR_FIXES",
    "adain_color_fix",
    "color_fix",
    "wavelet_blur",
    "wavelet_color_fix",
    "wavelet_decomposition",
]

COLOR_FIXES: tuple[str, ...] = ("adain", "wavelet", "none")

WAVELET_LEVELS = 5


def _channel_mean_std(images: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    flat = images.flatten(2)
    # Unbiased variance plus eps under the root: the upstream formula, kept for parity.
    std = (flat.var(dim=2) + eps).sqrt()
    return flat.mean(dim=2)[..., None, None], std[..., None, None]


def adain_color_fix(target: torch.Tensor, source: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Give each channel of ``target`` the mean and std of the same channel of ``source``."""
    if target.shape[:2] != source.shape[:2]:
        raise ValueError(f"adain needs the same batch and channels, got {tuple(target.shape)} and {tuple(source.shape)}")
    target_mean, target_std = _channel_mean_std(target, eps)
    source_mean, source_std = _channel_mean_std(source, eps)
    return (target - target_mean) / target_std * source_std + source_mean


def wavelet_blur(images: torch.Tensor, dilation: int) -> torch.Tensor:
    """3x3 binomial blur ([1,2,1] x [1,2,1] / 16), dilated, replicate-padded, per channel."""
    channels = images.shape[1]
    taps = torch.tensor([1.0, 2.0, 1.0], dtype=images.dtype, device=images.device)
    kernel = (torch.outer(taps, taps) / 16.0).expand(channels, 1, 3, 3)
    padded = F.pad(images, (dilation,) * 4, mode="replicate")
    return F.conv2d(padded, kernel, groups=channels, dilation=dilation)


def wavelet_decomposition(images: torch.Tensor, levels: int = WAVELET_LEVELS) -> tuple[torch.Tensor, torch.Tensor]:
    """Split into (high, low) frequencies with ``high + low == images``."""
    high = torch.zeros_like(images)
    low = images
    for level in range(levels):
        blurred = wavelet_blur(low, 2**level)
        high = high + (low - blurred)
        low = blurred
    return high, low


def wavelet_color_fix(target: torch.Tensor, source: torch.Tensor, levels: int = WAVELET_LEVELS) -> torch.Tensor:
    """High frequencies of ``target`` plus low frequencies of ``source``."""
    if target.shape != source.shape:
        raise ValueError(f"wavelet colour fix needs equal shapes, got {tuple(target.shape)} and {tuple(source.shape)}")
    target_high, _ = wavelet_decomposition(target, levels)
    _, source_low = wavelet_decomposition(source, levels)
    return target_high + source_low


def color_fix(name: str, target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Apply the colour fix called ``name`` (one of ``COLOR_FIXES``)."""
    if name == "adain":
        return adain_color_fix(target, source)
    if name == "wavelet":
        return wavelet_color_fix(target, source)
    if name == "none":
        return target
    raise UserError(f"unknown colour fix {name!r}; choose one of: {', '.join(COLOR_FIXES)}")
