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
    a, e = actual.double(), expected.double()
    if not torch.isfinite(a).all():
        return Parity(math.inf, -math.inf, math.inf)
    diff = a - e
    mse = float((diff**2).mean())
    rng = peak_to_peak if peak_to_peak is not None else float(e.max() - e.min()) or 1.0
    psnr = math.inf if mse == 0 else 10 * math.log10(rng**2 / mse)
    rel = float(diff.norm() / e.norm()) if float(e.norm()) else float(diff.norm())
    return Parity(float(diff.abs().max()), psnr, rel)
