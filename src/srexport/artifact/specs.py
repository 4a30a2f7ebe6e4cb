"""One spec per exported component: the single source of names, dims and dtypes.

ONNX export (input/output names, dynamic axes), graph checks, TensorRT
optimisation profiles, the runtime's buffer binding and the manifest all read
a ``ComponentSpec``; nothing restates a shape elsewhere.

Dims are either fixed integers or symbols. Symbols are resolved from a
``Geometry`` (batch and output-resolution pixel size): ``height``/``width`` are
pixels at output resolution, ``latent_height``/``latent_width`` are those over
the VAE factor 8, ``lr_height``/``lr_width`` over the model's upscale factor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .tile_settings import VAE_FACTOR  # noqa: F401  (held torch-free there for the CLI)
# The pipeline stage a component serves, in pipeline order. A "whole-image" stage runs once on the
# whole LR image (S3Diff's degradation estimator); the others run per tile.
STAGES = ("degradation", "encode", "denoise", "decode")
WHOLE_IMAGE_STAGES = ("degradation",)
# Dims that make an input spatial: an input with a batch dim and none of these is per-image
# (computed once from the whole image, repeated over a batch of tiles).
SPATIAL_DIMS = frozenset({"height", "width", "latent_height", "latent_width", "lr_height", "lr_width"})
LATENT_CHANNELS = 4

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}  # a tensor spec's dtype names


@dataclass(frozen=True)
class Geometry:
    """Concrete sizes that resolve a spec's symbolic dims."""

    batch: int
    height: int  # output-resolution pixels
    width: int
    scale: int = 4

    def dims(self) -> dict[str, int]:
        return {
            "batch": self.batch,
            "height": self.height,
            "width": self.width,
            "latent_height": self.height // VAE_FACTOR,
            "latent_width": self.width // VAE_FACTOR,
            "lr_height": self.height // self.scale,
            "lr_width": self.width // self.scale,
        }


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dims: tuple  # each an int (static) or a str symbol (dynamic)
    dtype: str = "float32"
    # Sample values: uniform in this range, or standard normal when None.
    value_range: tuple[float, float] | None = None

    def shape(self, geometry: Geometry) -> tuple[int, ...]:
        known = geometry.dims()
        return tuple(d if isinstance(d, int) else known[d] for d in self.dims)

    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.dims) if isinstance(d, str)}

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]

    def sample(self, geometry: Geometry, generator: torch.Generator) -> torch.Tensor:
        shape = self.shape(geometry)
        if self.value_range is None:
            t = torch.randn(shape, generator=generator)
        else:
            lo, hi = self.value_range
            t = torch.rand(shape, generator=generator) * (hi - lo) + lo
        return t.to(self.torch_dtype)

    def to_dict(self) -> dict:
        d = {"name": self.name, "dims": list(self.dims), "dtype": self.dtype}
        if self.value_range is not None:
            d["value_range"] = list(self.value_range)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TensorSpec":
        vr = d.get("value_range")
        return cls(d["name"], tuple(d["dims"]), d.get("dtype", "float32"), tuple(vr) if vr else None)


@dataclass(frozen=True)
class ComponentSpec:
    """A graph's contract: what goes in, what comes out, and what it computes."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    description: str = ""
    # The spatial granularity the graph needs (pixels at output resolution).
    size_multiple: int = VAE_FACTOR
    extra: dict = field(default_factory=dict, compare=False)
    # A converted (fp16/int8) graph's bound, by precision: the least PSNR (dB, output in [0,1])
    # of the pipeline's output with only this graph converted, against the fp32 reference.
    # Unset: the end-to-end bound of the precision it is converted to (calibration/precision.py).
    # Not its own output's error: how much of that reaches the image differs per graph
    # (S3Diff's UNet returns z0 = (z - sqrt(1-a) eps) / sqrt(a), 14.6x its eps error at t=999).
    min_output_psnr: dict[str, float] = field(default_factory=dict, compare=False)
    # Its role: the pipeline stage it serves (STAGES). The runtime, the tile plan, the engine
    # profiles and the bench read this, never the component's name.
    stage: str = "denoise"

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"component {self.name}: stage {self.stage!r} is not one of {', '.join(STAGES)}")

    @property
    def whole_image(self) -> bool:
        """Runs once on the whole LR image, not per tile."""
        return self.stage in WHOLE_IMAGE_STAGES

    @property
    def per_image_inputs(self) -> list[str]:
        """Inputs with a batch dim and no spatial dim: one value per image, repeated over tiles."""
        return [t.name for t in self.inputs if "batch" in t.dims and not SPATIAL_DIMS & set(t.dims)]

    @property
    def output_channels(self) -> int:
        """Channels of the first output (dims batch, channels, ...)."""
        return int(self.outputs[0].dims[1])

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: t.dynamic_axes() for t in (*self.inputs, *self.outputs) if t.dynamic_axes()}

    def input_shapes(self, geometry: Geometry) -> dict[str, tuple[int, ...]]:
        return {t.name: t.shape(geometry) for t in self.inputs}

    def output_shapes(self, geometry: Geometry) -> dict[str, tuple[int, ...]]:
        return {t.name: t.shape(geometry) for t in self.outputs}

    def sample_inputs(self, geometry: Geometry, seed: int = 0) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return {t.name: t.sample(geometry, g) for t in self.inputs}

    def profile(self, smallest: Geometry, typical: Geometry, largest: Geometry) -> dict[str, list[tuple[int, ...]]]:
        """TensorRT-style optimisation profile: input name -> [min, opt, max] shapes."""
        return {t.name: [t.shape(smallest), t.shape(typical), t.shape(largest)] for t in self.inputs}

    def to_dict(self) -> dict:
        d = {
            "name": self.name,
            "description": self.description,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "size_multiple": self.size_multiple,
            "stage": self.stage,
        }
        if self.extra:
            d["extra"] = self.extra
        if self.min_output_psnr:
            d["min_output_psnr"] = dict(self.min_output_psnr)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ComponentSpec":
        return cls(
            d["name"],
            tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
            tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
            d.get("description", ""),
            d.get("size_multiple", VAE_FACTOR),
            d.get("extra", {}),
            d.get("min_output_psnr", {}),
            d["stage"],
        )


# --- the standard tensors -------------------------------------------------------

IMAGE = TensorSpec("image", ("batch", 3, "height", "width"), value_range=(-1.0, 1.0))
LATENT = TensorSpec("latent", ("batch", LATENT_CHANNELS, "latent_height", "latent_width"))
DENOISED = TensorSpec("denoised", ("batch", LATENT_CHANNELS, "latent_height", "latent_width"))
DECODED = TensorSpec("decoded", ("batch", 3, "height", "width"), value_range=(-1.0, 1.0))
LR_IMAGE = TensorSpec("lr_image", ("batch", 3, "lr_height", "lr_width"), value_range=(0.0, 1.0))
SCORES = TensorSpec("scores", ("batch", 2), value_range=(0.0, 1.0))
# PiSA-SR adjustable: each sample's (a, b) mixing its pix and sem LoRA sets (artifact/guidance.py)
LORA_SCALES_INPUT = TensorSpec("lora_scales", ("batch", 2), value_range=(0.0, 1.5))
# S3Diff: each image's classifier-free guidance scale, eps = neg + cfg * (pos - neg)
CFG_SCALE_INPUT = TensorSpec("cfg_scale", ("batch", 1), value_range=(1.0, 1.2))


def vae_encoder_spec(with_scores: bool = False) -> ComponentSpec:
    inputs = (IMAGE, SCORES) if with_scores else (IMAGE,)
    return ComponentSpec(
        "vae_encoder", inputs, (LATENT,),
        "image in [-1,1] -> latent mean * 0.18215 (the posterior mean, not a sample)"
        + ("; VAE LoRA modulated by degradation scores" if with_scores else ""),
        stage="encode",
    )


def unet_spec(name: str = "unet", with_scores: bool = False, description: str = "", with_cfg: bool = False,
              with_lora_scales: bool = False) -> ComponentSpec:
    """latent[, scores][, cfg_scale][, lora_scales] -> denoised: the inputs in this order."""
    inputs = (LATENT, *([SCORES] if with_scores else []), *([CFG_SCALE_INPUT] if with_cfg else []),
              *([LORA_SCALES_INPUT] if with_lora_scales else []))
    return ComponentSpec(name, inputs, (DENOISED,), description or "latent -> denoised latent z0")


def vae_decoder_spec() -> ComponentSpec:
    return ComponentSpec(
        "vae_decoder", (DENOISED,), (DECODED,),
        "denoised latent -> image: decode(denoised / 0.18215) clamped to [-1,1]",
        stage="decode",
    )


def degradation_spec() -> ComponentSpec:
    return ComponentSpec(
        "degradation", (LR_IMAGE,), (SCORES,),
        "low-resolution image in [0,1] -> degradation scores (blur, noise) in (0,1)",
        size_multiple=1, stage="degradation",
    )
