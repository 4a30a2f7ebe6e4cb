"""Reading and writing images, with one stated rule for every mode.

Conversion to RGB float in [0,1]:
- 8-bit RGB as is; greyscale (L) replicated to three channels;
- alpha (RGBA, LA, PA) discarded, as upstream's ``convert("RGB")`` does;
- palette (P) through its palette; CMYK/YCbCr/LAB through Pillow's conversion;
- 16-bit (I;16*) and 32-bit integer (I) greyscale scaled by 1/65535, float (F)
  clipped to [0,1]; 16-bit-per-channel colour PNGs are read by Pillow as 8-bit.
An EXIF orientation (phone photos) is applied first, so the image is upright.
Writes are atomic (temporary file in the same folder, then rename).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..artifact.manifest import current_umask
from ..errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF", ".webp": "WEBP"}


# EXIF orientations that swap width and height (transposed, rotated 90 or 270 degrees)
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
_ORIENTATION_TAG = 0x0112


def upright(image):
    """The image turned as its EXIF orientation says (a copy), or itself when it has none."""
    from PIL import ImageOps

    orientation = image.getexif().get(_ORIENTATION_TAG, 1)
    return ImageOps.exif_transpose(image) if orientation not in (None, 1) else image


def pil_to_tensor(image) -> torch.Tensor:
    image = upright(image)
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        grey = np.asarray(image, dtype=np.float64) / 65535.0
        array = np.repeat(np.clip(grey, 0, 1)[..., None], 3, axis=2)
    elif mode == "F":
        array = np.repeat(np.clip(np.asarray(image, dtype=np.float64), 0, 1)[..., None], 3, axis=2)
    else:
        array = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    return torch.from_numpy(array.astype(np.float32)).permute(2, 0, 1)[None].contiguous()


def load_image(path: str | Path) -> torch.Tensor:
    """Path -> (1,3,h,w) float32 in [0,1]."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"input {path} does not exist")
    try:
        with Image.open(path) as image:
            image.load()
            return pil_to_tensor(image)
    except UnidentifiedImageError:
        raise UserError(f"{path} is not an image Pillow can read; pass a PNG, JPEG, TIFF, BMP or WebP file") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__} (truncated or corrupt?)") from None


def decode_image(data: bytes, what: str = "the image bytes") -> torch.Tensor:
    """An encoded image (PNG, JPEG, ...) in memory -> (1,3,h,w) float32 in [0,1], upright."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return pil_to_tensor(image)
    except UnidentifiedImageError:
        raise UserError(f"{what} are not an image Pillow can read; send a PNG, JPEG, TIFF, BMP or WebP file") from None
    except (OSError, SyntaxError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot decode {what}: {reason} (truncated or corrupt?)") from None


def probe_image(path: str | Path) -> tuple[int, int]:
    """(height, width) from the header alone, upright (its EXIF orientation applied), failing like
    ``load_image`` on non-images."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"input {path} does not exist")
    try:
        with Image.open(path) as image:
            swapped = image.getexif().get(_ORIENTATION_TAG, 1) in _SWAPPING_ORIENTATIONS
            return (image.width, image.height) if swapped else (image.height, image.width)
    except UnidentifiedImageError:
        raise UserError(f"{path} is not an image Pillow can read; pass a PNG, JPEG, TIFF, BMP or WebP file") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def tensor_to_pil(image: torch.Tensor):
    from PIL import Image

    from .regions import to_uint8_hwc  # round(clamp(x, 0, 1) * 255), in bands: no full-size float temporaries

    return Image.fromarray(to_uint8_hwc(image), "RGB")


def check_output_path(path: str | Path, force: bool) -> Path:
    path = Path(path)
    if path.suffix.lower() not in _FORMATS:
        raise UserError(f"output {path} has an unknown image extension; use one of {', '.join(IMAGE_SUFFIXES)}")
    if path.exists() and not force:
        raise UserError(f"{path} already exists; pass --force to overwrite it")
    if path.is_dir():
        raise UserError(f"output {path} is a folder; pass an image file name (or a folder input for folder output)")
    if not path.parent.is_dir():
        raise UserError(f"the folder of output {path} does not exist; create it first")
    return path


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file or folder: symlinks, ``./`` spellings and hard links
    included (the second may not exist yet)."""
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def save_image(image: torch.Tensor, path: str | Path) -> Path:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=path.suffix)
    os.close(fd)
    try:
        tensor_to_pil(image).save(tmp, format=_FORMATS[path.suffix.lower()])
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it private; an image is a user's file like others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
