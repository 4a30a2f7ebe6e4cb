"""The comparator: numbers that say how far two tensors are apart.

Kept apart from runners and pipeline (Polygraphy's comparator idea): the
same functions score components, end-to-end images, precisions and backends.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Parity:
    max_abs: float
    psnr_db: float  # over the given peak-to-peak range; inf when identical
    rel_l2: float

    def to_dict(self) -> dict:
        d = asdict(self)
        d["psnr_db"] = None if math.isinf(self.psnr_db) else round(self.psnr_db, 3)
        return d

    def describe(self) -> str:
        psnr = "inf" if math.isinf(self.psnr_db) else f"{self.psnr_db:.2f}"
        return f"max_abs {self.max_abs:.3e}  PSNR {psnr} dB  rel_l2 {self.rel_l2:.3e}"


def compare(actual: torch.Tensor, expected: torch.Tensor, peak_to_peak: float | None = None) -> Parity:
    """PSNR uses ``peak_to_peak`` (1 for [0,1] images, 2 for [-1,1]); by default the
    expected tensor's own range, which suits latents."""
    if actual.shape != expected.shape:
        raise ValueError(f"shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()  # GPU backends vs a CPU reference
    if not torch.isfinite(a).all():
        return Parity(math.inf, -math.inf, math.inf)
    diff = a - e
    mse = float((diff**2).mean())
    rng = peak_to_peak if peak_to_peak is not None else float(e.max() - e.min()) or 1.0
    psnr = math.inf if mse == 0 else 10 * math.log10(rng**2 / mse)
    rel = float(diff.norm() / e.norm()) if float(e.norm()) else float(diff.norm())
    return Parity(float(diff.abs().max()), psnr, rel)


def worst(parities) -> Parity:
    """The worst of each number over several comparisons (a component's outputs, its check
    shapes): largest max abs, lowest PSNR, largest relative L2, each on its own."""
    parities = list(parities)
    if not parities:
        raise ValueError("nothing was compared")
    return Parity(max(p.max_abs for p in parities), min(p.psnr_db for p in parities),
                  max(p.rel_l2 for p in parities))


def ssim(actual: torch.Tensor, expected: torch.Tensor, data_range: float = 1.0) -> float:
    """Mean SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03),
    per channel then averaged, over valid windows only (as scikit-image's
    ``structural_similarity(..., gaussian_weights=True, use_sample_covariance=False)``)."""
    import torch.nn.functional as F

    a = actual.detach().cpu().double().reshape(-1, 1, *actual.shape[-2:])
    e = expected.detach().cpu().double().reshape(-1, 1, *expected.shape[-2:])
    if not torch.isfinite(a).all():
        return -math.inf
    size = min(11, a.shape[-1], a.shape[-2])
    size -= 1 - size % 2  # odd
    x = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(x**2) / (2 * 1.5**2))
    g = g / g.sum()
    w = (g[:, None] * g[None, :])[None, None]
    mu_a, mu_e = F.conv2d(a, w), F.conv2d(e, w)
    var_a = F.conv2d(a * a, w) - mu_a**2
    var_e = F.conv2d(e * e, w) - mu_e**2
    cov = F.conv2d(a * e, w) - mu_a * mu_e
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_e + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_e**2 + c1) * (var_a + var_e + c2))
    return float(s.mean())
