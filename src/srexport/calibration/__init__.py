"""Calibration data: image sets, the degradation pipeline, data readers.

``photos``: the built-in photographs (scikit-image's, split train / held-out)
or a user folder, and random crops. ``degradation``: the stated LR pipeline
(blur, x4 bicubic downsample, noise, JPEG), seeded. Both serve the trained
demo (``tools/train_demo.py``) and the int8 calibration.

Precision (what ``build --precision`` runs): ``capture`` (calibration tiles through the
fp32 reference, each component's inputs captured), ``cache`` (those captures and the
activation ranges, keyed by model and settings), ``fp16`` (fp16 graphs and their
fp16-rounding twins), ``int8`` (symmetric Q/DQ graphs), ``precision`` (the build step:
convert, then measure against the fp32 reference).
"""

from .degradation import Degradation, DegradationParams, bicubic_upscale, psnr
from .photos import HELD_OUT_PHOTOS, TRAIN_PHOTOS, Photo, builtin_photos, folder_photos, photo_set, random_crops

__all__ = [
    "Degradation", "DegradationParams", "HELD_OUT_PHOTOS", "Photo", "TRAIN_PHOTOS", "bicubic_upscale",
    "builtin_photos", "folder_photos", "photo_set", "psnr", "random_crops",
]
