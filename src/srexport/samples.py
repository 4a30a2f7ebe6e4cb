"""The built-in sample input: a 64x64 crop of scikit-image's astronaut photo
(NASA, public domain), used by build and check when no image is given."""

from __future__ import annotations

from importlib import resources

import torch

SAMPLE_NAME = "built-in sample (astronaut crop, 64x64)"


def sample_image() -> torch.Tensor:
    from .runtime.images import load_image

    with resources.as_file(resources.files("srexport") / "assets" / "sample_lr.png") as path:
        return load_image(path)
