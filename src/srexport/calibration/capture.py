"""Calibration inputs: what each component really sees, captured from the fp32 reference.

A calibration set is made of LR tiles: square crops of ``lr_tile * scale``
pixels from photographs (the built-in training photos, or a user folder of
high-resolution photos), degraded by the stated pipeline
(``calibration.degradation``) to ``lr_tile`` pixels: the same kind of input
the model gets, at the tile shape the runtime runs. The fp32 PyTorch
reference runs each tile (``stage_tensors``), and each component's spec input
names pick its tensors (``image`` for the VAE encoder, ``latent`` for the
UNet, ``denoised`` for the decoder, ``scores`` where S3Diff has them), so every
graph is calibrated on the inputs of the fp32 pipeline, not on synthetic
ones. The result is cached (``calibration.cache``).

Held-out inputs, for measuring a precision's error, are centre crops of the
held-out built-in photos (never used for calibration), degraded the same way
with a fixed seed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..errors import UserError
from ..artifact.guidance import LORA_SCALES
from ..models.group_norm_stats import TWO_PASS_COMPONENTS, TWO_PASS_OF, add_whole_image_stats, graph_modules
from .degradation import Degradation

DEFAULT_CALIB = "builtin"
DEFAULT_CALIB_SIZE = 32
DEFAULT_LR_TILE = 64  # LR pixels: x4 -> 256x256, pre-resized to process_size when smaller


@dataclass(frozen=True)
class CalibrationSettings:
    source: str = DEFAULT_CALIB  # "builtin" (the training photos) or a folder of photos
    size: int = DEFAULT_CALIB_SIZE  # number of LR tiles
    lr_tile: int | None = None  # None: the artifact's denoiser tile over the scale, else DEFAULT_LR_TILE
    seed: int = 0
    degradation: Degradation = field(default_factory=Degradation)

    def validate(self) -> "CalibrationSettings":
        if self.size < 1 or self.size > 4096:
            raise UserError(f"--calib-size {self.size} is out of range; use 1 to 4096 calibration tiles")
        if self.lr_tile is not None and self.lr_tile < 8:
            raise UserError(f"calibration tile side {self.lr_tile} is too small (at least 8 LR pixels)")
        if self.source.startswith("builtin") and self.source not in ("builtin", "builtin:train"):
            raise UserError(f"--calib {self.source}: the built-in preset is 'builtin' (the training photos; the "
                            "held-out photos are kept for measuring error)")
        if not self.builtin:
            from pathlib import Path

            from ..runtime.images import list_images

            if not Path(self.source).is_dir():
                raise UserError(f"--calib {self.source}: not 'builtin' and not a folder of photos")
            if not list_images(Path(self.source)):  # found now, not after the export
                raise UserError(f"--calib {self.source} holds no images (png, jpg, tif, bmp, webp); pass a folder of "
                                "photos or --calib builtin")
        return self

    @property
    def builtin(self) -> bool:
        return self.source in ("builtin", "builtin:train")

    def describe(self) -> dict:
        d = asdict(self)
        d["degradation"] = dict(self.degradation.describe(), **asdict(self.degradation))
        return d


def photos_fingerprint(settings: CalibrationSettings) -> dict:
    """What identifies the photo set in the cache key."""
    if settings.builtin:
        import importlib.metadata as md

        from .photos import TRAIN_PHOTOS

        try:
            version = md.version("scikit-image")
        except md.PackageNotFoundError:
            version = None
        return {"builtin": list(TRAIN_PHOTOS), "scikit-image": version}
    from pathlib import Path

    from ..artifact.manifest import sha256_of
    from ..runtime.images import list_images

    folder = Path(settings.source)
    if not folder.is_dir():
        raise UserError(f"--calib {folder} is neither 'builtin' nor a folder of photos")
    return {"folder": str(folder.absolute()), "files": [[p.name, sha256_of(p)] for p in list_images(folder)]}


def calibration_tiles(settings: CalibrationSettings, scale: int) -> torch.Tensor:
    """(N, 3, lr_tile, lr_tile) LR tiles in [0, 1], seeded."""
    from .photos import photo_set, random_crops

    photos = photo_set("builtin:train" if settings.builtin else settings.source)
    hr = random_crops(photos, settings.lr_tile * scale, settings.size, seed=settings.seed)
    degradation = Degradation(scale, settings.degradation.blur_sigma, settings.degradation.noise_sigma,
                              settings.degradation.jpeg_quality)
    lr, _ = degradation(hr, seed=settings.seed)
    return lr


def held_out_inputs(scale: int, lr_side: int = DEFAULT_LR_TILE, seed: int = 1234) -> list[tuple[str, torch.Tensor]]:
    """Centre crops of the held-out photos, degraded to ``lr_side`` LR pixels: (name, (1,3,s,s))."""
    from .photos import builtin_photos, center_crop

    out = []
    degradation = Degradation(scale)
    for i, photo in enumerate(builtin_photos("held_out")):
        side = min(lr_side * scale, min(photo.size) // scale * scale)
        hr = center_crop(photo.image, side)
        lr, params = degradation(hr, seed=seed + i)
        out.append((f"{photo.name} (held out, {lr.shape[-1]}x{lr.shape[-2]} LR)", lr))
    return out


def builtin_photos_available() -> bool:
    try:
        import skimage.data  # noqa: F401
    except ImportError:
        return False
    return True


def capture_inputs(reference, specs: dict, tiles: torch.Tensor, progress=None) -> dict[str, dict[str, np.ndarray]]:
    """Run the fp32 reference on every tile; component -> input name -> (N, ...) float32 (an
    adjustable UNet's N: tiles x the coefficient sets it is calibrated at)."""
    wanted = {name: spec.input_names for name, spec in specs.items()}
    out: dict[str, dict[str, list]] = {name: {i: [] for i in inputs} for name, inputs in wanted.items()}
    step = max(1, math.ceil(len(tiles) / 4))
    modules = graph_modules(reference)
    # an adjustable UNet is calibrated in both modes: each tile at every (a, b) it runs by default
    coefficients = [torch.tensor([c]) for c in reference.calibration_coefficients()] if (
        getattr(getattr(reference, "settings", None), "guidance", None) == "adjustable") else []
    for k in range(len(tiles)):
        env, _ = reference.stage_tensors(tiles[k:k + 1])
        add_whole_image_stats(env, modules, specs)  # two-pass VAE graphs: one tile is its own pool
        for component, inputs in wanted.items():
            variants = [{LORA_SCALES: c} for c in coefficients] if LORA_SCALES in inputs and coefficients else [{}]
            if variants != [{}] and any(n.endswith("_norm_stats") for n in inputs):
                # the pooled graph's statistics are those of the (a, b) it runs at: its own stats pass's
                stats_module = modules[TWO_PASS_OF[TWO_PASS_COMPONENTS[component][0]][0]]
                variants = [dict(v, **{n: stats_module(env["latent"], v[LORA_SCALES])
                                       for n in inputs if n.endswith("_norm_stats")}) for v in variants]
            for variant in variants:
                for name in inputs:
                    value = variant.get(name, env.get(name))
                    if value is None:
                        raise RuntimeError(f"the reference has no tensor {name!r} for {component}'s input")
                    out[component][name].append(value.detach().float().cpu().numpy())
        if progress is not None and ((k + 1) % step == 0 or k + 1 == len(tiles)):
            progress(f"calibration: {k + 1}/{len(tiles)} tiles through the fp32 reference")
    return {c: {n: np.concatenate(v) for n, v in inputs.items()} for c, inputs in out.items()}


def calibration_inputs(reference, specs: dict, settings: CalibrationSettings, model: dict, scale: int,
                       progress=None) -> tuple[dict[str, dict[str, np.ndarray]], dict]:
    """Captured inputs (from the cache when present) and a record for the manifest."""
    from . import cache

    settings = settings.validate()
    if settings.lr_tile is None:
        import dataclasses

        settings = dataclasses.replace(settings, lr_tile=DEFAULT_LR_TILE)
    source = model.get("source", {})
    description = {
        "model": {"kind": model.get("kind"), "settings": model.get("settings"),
                  "checkpoint_sha256": source.get("checkpoint_sha256"), "de_net_sha256": source.get("de_net_sha256"),
                  "demo": source.get("demo"), "seed": source.get("seed"),
                  "base": source.get("base"), "base_files": cache.folder_fingerprint(source.get("base", ""))},
        "inputs": {name: spec.input_names for name, spec in specs.items()},
        "photos": photos_fingerprint(settings),
        "calibration": settings.describe(),
        "scale": scale,
    }
    key = cache.cache_key(description)
    inputs = cache.load(key)
    hit = inputs is not None and set(inputs) >= set(specs)
    if not hit:
        tiles = calibration_tiles(settings, scale)
        inputs = capture_inputs(reference, specs, tiles, progress)
        cache.store(key, inputs, description)
    record = {"source": "built-in training photos (scikit-image)" if settings.builtin else str(settings.source),
              "size": settings.size, "lr_tile": settings.lr_tile, "seed": settings.seed,
              "degradation": settings.degradation.describe(), "cache_key": key, "cache_hit": hit,
              "input_shapes": {c: {n: list(a.shape) for n, a in v.items()} for c, v in inputs.items() if c in specs}}
    return {c: inputs[c] for c in specs}, record
