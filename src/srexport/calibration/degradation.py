"""The stated degradation pipeline: how a low-resolution input is made from a photo.

Per image, in this order (every random choice from one seeded NumPy generator):

1. **Blur**: Gaussian, ``sigma`` drawn uniformly from ``blur_sigma`` (in HR
   pixels); separable kernel of radius ``ceil(3 * sigma)``, normalised to sum 1,
   reflect padding.
2. **Downsample** by ``scale`` (x4) with ``srexport.kernels.resize``'s bicubic:
   Pillow's Keys cubic (a = -0.5) with antialiasing, as ``Image.resize`` does.
   The HR image is first cropped (top-left kept) to a multiple of ``scale``.
3. **Noise**: i.i.d. Gaussian per pixel and channel, ``sigma`` drawn uniformly
   from ``noise_sigma`` (in [0, 1] units), then clipped to [0, 1].
4. **JPEG**: rounded to 8 bits, encoded by Pillow at a quality drawn uniformly
   (integers, inclusive) from ``jpeg_quality`` (Pillow's default 4:2:0 chroma
   subsampling), and decoded.

The result is an 8-bit image held as float32 in [0, 1]. ``Degradation.describe()``
gives all of this as JSON-ready data, to be written next to any number measured
on degraded images.

The default ranges are those of Real-ESRGAN's first degradation stage (blur
sigma 0.2-3, Gaussian noise sigma 1-30/255, JPEG quality 30-95), the family of
degradations PiSA-SR is trained on; one stage, not Real-ESRGAN's two.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..kernels import resize


@dataclass(frozen=True)
class DegradationParams:
    """The draws for one image."""

    blur_sigma: float
    noise_sigma: float
    jpeg_quality: int
    noise_seed: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Degradation:
    scale: int = 4
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    noise_sigma: tuple[float, float] = (1.0 / 255.0, 30.0 / 255.0)
    jpeg_quality: tuple[int, int] = (30, 95)

    def describe(self) -> dict:
        return {
            "steps": [
                {"op": "gaussian_blur", "sigma_hr_px": list(self.blur_sigma), "radius": "ceil(3*sigma)",
                 "padding": "reflect"},
                {"op": "downsample", "factor": self.scale, "filter": "bicubic (Pillow Keys a=-0.5, antialiased)",
                 "implementation": "srexport.kernels.resize"},
                {"op": "gaussian_noise", "sigma": list(self.noise_sigma), "units": "[0,1] image", "clip": [0, 1]},
                {"op": "jpeg", "quality": list(self.jpeg_quality), "encoder": "Pillow, 4:2:0", "bits": 8},
            ],
            "sampling": "each parameter uniform in its range, per image, from numpy.random.default_rng(seed)",
        }

    def sample(self, rng: np.random.Generator) -> DegradationParams:
        return DegradationParams(
            blur_sigma=float(rng.uniform(*self.blur_sigma)),
            noise_sigma=float(rng.uniform(*self.noise_sigma)),
            jpeg_quality=int(rng.integers(self.jpeg_quality[0], self.jpeg_quality[1] + 1)),
            noise_seed=int(rng.integers(0, 2**31 - 1)),
        )

    def apply(self, hr: torch.Tensor, params: DegradationParams) -> torch.Tensor:
        """One HR image (1, 3, H, W) in [0, 1] -> its LR (1, 3, H//scale, W//scale)."""
        h, w = hr.shape[-2:]
        hr = hr[..., : h - h % self.scale, : w - w % self.scale].float()
        x = gaussian_blur(hr, params.blur_sigma)
        x = resize(x, (hr.shape[-2] // self.scale, hr.shape[-1] // self.scale), "bicubic")
        if params.noise_sigma > 0:
            g = torch.Generator().manual_seed(params.noise_seed)
            x = x + torch.randn(x.shape, generator=g) * params.noise_sigma
        return jpeg(x.clamp(0, 1), params.jpeg_quality)

    def __call__(self, hr: torch.Tensor, seed: int) -> tuple[torch.Tensor, list[DegradationParams]]:
        """A batch (B, 3, H, W) -> LR batch and each image's draws; same seed, same result."""
        rng = np.random.default_rng(seed)
        params = [self.sample(rng) for _ in range(hr.shape[0])]
        lr = torch.cat([self.apply(hr[i:i + 1], p) for i, p in enumerate(params)])
        return lr, params


def gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return (k / k.sum()).float()


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) with reflect padding."""
    if sigma <= 0:
        return images.clone()
    k = gaussian_kernel(sigma).to(images)
    r = (k.numel() - 1) // 2
    c = images.shape[1]
    x = F.pad(images, (r, r, r, r), mode="reflect") if min(images.shape[-2:]) > r else \
        F.pad(images, (r, r, r, r), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def jpeg(images: torch.Tensor, quality: int) -> torch.Tensor:
    """Round-trip (1, 3, H, W) in [0, 1] through Pillow's JPEG at ``quality``."""
    from PIL import Image

    array = (images[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array, "RGB").save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        out = np.asarray(decoded.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(out).permute(2, 0, 1)[None].contiguous()


def bicubic_upscale(lr: torch.Tensor, scale: int = 4) -> torch.Tensor:
    """The baseline every SR number is compared with: Pillow-style bicubic by ``scale``."""
    return resize(lr, (lr.shape[-2] * scale, lr.shape[-1] * scale), "bicubic").clamp(0, 1)


def psnr(actual: torch.Tensor, expected: torch.Tensor, border: int = 0) -> float:
    """PSNR in dB of [0, 1] images over RGB, ignoring ``border`` pixels on each side."""
    if border:
        actual = actual[..., border:-border, border:-border]
        expected = expected[..., border:-border, border:-border]
    mse = float(((actual.double() - expected.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)
