"""Photographs for training the demo and for calibration: built-in, or a user folder.

The built-in set is the real photographs that ship inside scikit-image
(``skimage.data``; no download). It is split once, by name, into a training
part and a held-out part, and nothing else may move a photo between them: the
demo model is trained on ``TRAIN_PHOTOS`` only and its quality is reported on
``HELD_OUT_PHOTOS`` only. (The two motorcycle views are one scene, so both sit
on the same side.) Greyscale photos are replicated to three channels, as
``runtime.images`` does for greyscale files.

scikit-image is a development extra: it is needed to train the demo and to
calibrate on the built-in set, never to build or run the shipped demo.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError

# name -> (skimage.data function, index into its tuple result or None, description)
_BUILTIN: dict[str, tuple[str, int | None, str]] = {
    "astronaut": ("astronaut", None, "Eileen Collins, NASA portrait, 512x512 RGB"),
    "rocket": ("rocket", None, "SpaceX Falcon 9 on the pad, 427x640 RGB"),
    "motorcycle_left": ("stereo_motorcycle", 0, "Middlebury motorcycle, left view, 500x741 RGB"),
    "motorcycle_right": ("stereo_motorcycle", 1, "Middlebury motorcycle, right view, 500x741 RGB"),
    "immunohistochemistry": ("immunohistochemistry", None, "stained tissue micrograph, 512x512 RGB"),
    "retina": ("retina", None, "human retina, fundus photograph, 1411x1411 RGB"),
    "brick": ("brick", None, "brick wall texture, 512x512 grey"),
    "grass": ("grass", None, "grass texture, 512x512 grey"),
    "gravel": ("gravel", None, "gravel texture, 512x512 grey"),
    "coins": ("coins", None, "Greek coins, 303x384 grey"),
    "moon": ("moon", None, "lunar surface, 512x512 grey"),
    "chelsea": ("chelsea", None, "Chelsea the cat, 300x451 RGB"),
    "coffee": ("coffee", None, "a cup of coffee, 400x600 RGB"),
    "camera": ("camera", None, "the cameraman, 512x512 grey"),
}

TRAIN_PHOTOS: tuple[str, ...] = (
    "astronaut", "rocket", "motorcycle_left", "motorcycle_right", "immunohistochemistry", "retina",
    "brick", "grass", "gravel", "coins", "moon",
)
HELD_OUT_PHOTOS: tuple[str, ...] = ("chelsea", "coffee", "camera")
SPLITS = {"train": TRAIN_PHOTOS, "held_out": HELD_OUT_PHOTOS, "all": TRAIN_PHOTOS + HELD_OUT_PHOTOS}

# The split is what keeps the demo's reported quality honest: checked on every import, -O or not.
if set(TRAIN_PHOTOS) & set(HELD_OUT_PHOTOS) or set(SPLITS["all"]) != set(_BUILTIN):
    raise RuntimeError("calibration/photos.py: TRAIN_PHOTOS and HELD_OUT_PHOTOS must split the built-in photos "
                       "without overlap and cover every one")


@dataclass(frozen=True)
class Photo:
    name: str
    image: torch.Tensor  # (1, 3, H, W) float32 in [0, 1]

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.image.shape[-2:])


def _skimage_data():
    try:
        import skimage.data
    except ImportError:
        raise UserError(
            "the built-in photos come from scikit-image, which is not installed; "
            "pip install scikit-image (or pip install -e '.[dev]'), or pass a folder of your own images"
        ) from None
    return skimage.data


@functools.lru_cache(maxsize=None)
def _load_builtin(name: str) -> torch.Tensor:
    function, index, _ = _BUILTIN[name]
    array = getattr(_skimage_data(), function)()
    if index is not None:
        array = array[index]
    array = np.asarray(array)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    array = array[..., :3].astype(np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()


def builtin_photo(name: str) -> Photo:
    if name not in _BUILTIN:
        raise UserError(f"no built-in photo {name!r}; choose one of {', '.join(_BUILTIN)}")
    return Photo(name, _load_builtin(name).clone())


def builtin_photos(split: str = "train") -> list[Photo]:
    """The built-in photos of one split: ``train``, ``held_out`` or ``all``."""
    if split not in SPLITS:
        raise UserError(f"unknown photo split {split!r}; choose one of {', '.join(SPLITS)}")
    return [builtin_photo(name) for name in SPLITS[split]]


def describe_builtin(split: str = "all") -> dict[str, str]:
    return {name: _BUILTIN[name][2] for name in SPLITS[split]}


def folder_photos(folder: str | Path) -> list[Photo]:
    """Every image in a folder (not recursive), read by the runtime's image rules."""
    from ..runtime.images import list_images, load_image

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; pass a folder of PNG/JPEG/TIFF/BMP/WebP images")
    paths = list_images(folder)
    if not paths:
        raise UserError(f"{folder} holds no images (png, jpg, tif, bmp, webp)")
    return [Photo(p.name, load_image(p)) for p in paths]


def photo_set(source: str | Path) -> list[Photo]:
    """``builtin`` / ``builtin:<split>`` (default split ``train``), or a folder path."""
    text = str(source)
    if text == "builtin" or text.startswith("builtin:"):
        return builtin_photos(text.partition(":")[2] or "train")
    return folder_photos(source)


def random_crops(photos: list[Photo], size: int, count: int, seed: int, augment: bool = True) -> torch.Tensor:
    """``count`` square crops of side ``size`` -> (count, 3, size, size).

    Each crop picks a photo uniformly (so a large photo does not crowd out the
    others) and a position uniformly. With ``augment``, it is also flipped,
    rotated by a random multiple of 90 degrees, and its colour channels are
    permuted at random, so a handful of photographs covers many hues. Seeded: the
    same arguments give the same crops.
    """
    usable = [p for p in photos if min(p.size) >= size]
    if not usable:
        raise UserError(f"no photo is at least {size}x{size} pixels; use larger images or a smaller crop")
    rng = np.random.default_rng(seed)
    out = torch.empty(count, 3, size, size)
    for k in range(count):
        image = usable[int(rng.integers(0, len(usable)))].image[0]
        top = int(rng.integers(0, image.shape[-2] - size + 1))
        left = int(rng.integers(0, image.shape[-1] - size + 1))
        crop = image[:, top:top + size, left:left + size]
        if augment:
            if rng.random() < 0.5:
                crop = crop.flip(-1)
            crop = torch.rot90(crop, int(rng.integers(0, 4)), dims=(-2, -1))
            crop = crop[torch.from_numpy(rng.permutation(3))]
        out[k] = crop
    return out


def center_crop(image: torch.Tensor, height: int, width: int | None = None) -> torch.Tensor:
    """The central (height, width) window of (B, C, H, W)."""
    width = height if width is None else width
    h, w = image.shape[-2:]
    if height > h or width > w:
        raise UserError(f"cannot crop {width}x{height} from a {w}x{h} image")
    top, left = (h - height) // 2, (w - width) // 2
    return image[..., top:top + height, left:left + width].contiguous()
