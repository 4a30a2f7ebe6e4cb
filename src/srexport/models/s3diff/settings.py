"""S3Diff's build settings: what the manifest's ``model.settings`` holds for an S3Diff artifact.

The reference (models/s3diff/reference.py), the recipe (export/s3diff_recipe.py) and the runtime's
``reference_for`` all read these; they live with the model, below the layers that use them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import UserError


@dataclass(frozen=True)
class S3DiffSettings:
    degradation: tuple[float, float] | None = None  # None: estimated per image ("dynamic")
    cfg_scale: float = 1.07
    color_fix: str = "wavelet"
    scale: int = 4

    def validate(self) -> "S3DiffSettings":
        if self.scale != 4:
            raise UserError(f"S3Diff is trained for x4 only; got --scale {self.scale}")
        if self.degradation is not None:
            if len(self.degradation) != 2 or not all(0.0 <= v <= 1.0 for v in self.degradation):
                raise UserError(f"--degradation takes BLUR,NOISE in [0,1]; got {self.degradation}")
        return self

    @property
    def dynamic(self) -> bool:
        return self.degradation is None


def parse_degradation(text: str) -> tuple[float, float] | None:
    """``dynamic`` or ``BLUR,NOISE`` (two numbers in [0,1])."""
    if text == "dynamic":
        return None
    parts = text.split(",")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 2 or not all(0.0 <= v <= 1.0 for v in values):
        raise UserError(f"--degradation {text!r}: use 'dynamic' or two numbers in [0,1] as BLUR,NOISE (e.g. 0.3,0.1)")
    return values
