"""Calibration data: image sets, the degradation pipeline, data readers.

``photos``: the built-in photographs (scikit-image's, split train / held-out)
or a user folder, and random crops. ``degradation``: the stated LR pipeline
(blur, x4 bicubic downsample, noise, JPEG), seeded. Both serve the trained
demo (``tools/train_demo.py``) and the int8 calibration.
"""

from .degradation import Degradation, DegradationParams, bicubic_upscale, psnr
from .photos import HELD_OUT_PHOTOS, TRAIN_PHOTOS, Photo, builtin_photos, folder_photos, photo_set, random_crops

__all__ = [
    "Degradation", "DegradationParams", "HELD_OUT_PHOTOS", "Photo", "TRAIN_PHOTOS", "bicubic_upscale",
    "builtin_photos", "folder_photos", "photo_set", "psnr", "random_crops",
]
