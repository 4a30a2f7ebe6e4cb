"""S3Diff's part of a build: reference, specs, manifest sections.

Dynamic degradation (default): a ``degradation`` graph estimates the scores
per image and both the encoder and the UNet take them as an input; the LoRA
stays in the graphs as low-rank branches mixed by matrices computed inside
the graph, once per image. Fixed degradation: the modulated deltas are merged
into static weights for the given scores, and the estimator is left out.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .. import __version__
from ..errors import UserError
from ..models.configs import VAE_SCALING_FACTOR
from ..models.sources import demo_description
from ..samples import sample_image
from .build import Progress, Recipe
from .specs import ComponentSpec, degradation_spec, unet_spec, vae_decoder_spec, vae_encoder_spec


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


def s3diff_specs(settings: S3DiffSettings) -> dict[str, ComponentSpec]:
    dynamic = settings.dynamic
    lora = "LoRA modulated by the scores input" if dynamic else f"LoRA merged for fixed scores {settings.degradation}"
    guidance = ("positive and negative prompts as one batch of 2B, eps = neg + cfg * (pos - neg)"
                if settings.cfg_scale != 1.0 else "positive prompt only (cfg 1.0)")
    specs = {"degradation": degradation_spec()} if dynamic else {}
    specs["vae_encoder"] = vae_encoder_spec(with_scores=dynamic)
    specs["unet"] = unet_spec("unet", with_scores=dynamic, description=(
        f"latent -> z0: UNet at t=999 ({lora}; {guidance}), then one DDPM step x0 = (z - sqrt(1-a) eps) / sqrt(a)"))
    specs["vae_decoder"] = vae_decoder_spec()
    return specs


def prepare_s3diff(source, loaded, settings: S3DiffSettings, progress: Progress) -> Recipe:
    from ..models.s3diff.reference import NEGATIVE_PROMPT, POSITIVE_PROMPT, S3DiffReference

    settings = settings.validate()
    base, ckpt, de_net = loaded
    progress("building the S3Diff reference " + ("(dynamic degradation)" if settings.dynamic
                                                 else f"(LoRA merged for degradation {settings.degradation})"))
    reference = S3DiffReference(base, ckpt, de_net, cfg_scale=settings.cfg_scale, degradation=settings.degradation,
                                color_fix=settings.color_fix)
    sample_output = reference(sample_image())
    schedule = reference.schedule
    demo_note = f" Built-in demo: {demo_description(source)}." if source.demo else ""
    manifest = {
        "description": (
            f"S3Diff x4 ({'dynamic degradation: scores from the degradation graph' if settings.dynamic else 'fixed degradation %s' % (settings.degradation,)}, "
            f"cfg {settings.cfg_scale}) exported by srexport {__version__}. Run: pre-process (processing), "
            + ("degradation (on the LR image), " if settings.dynamic else "")
            + "vae_encoder, unet (returns z0), vae_decoder, post-process. The encoder returns the posterior mean, "
            "not a sample." + demo_note),
        "model": {
            "kind": "s3diff",
            "demo": source.demo,
            "settings": dataclasses.asdict(settings),
            "degradation": {"mode": "dynamic" if settings.dynamic else "fixed",
                            "scores_source": "degradation graph (DEResNet) on the whole LR image" if settings.dynamic
                            else "fixed at build", "fixed_scores": settings.degradation},
            "lora": {"unet": {"rank": ckpt.unet.rank, "scaling": ckpt.unet.scaling,
                              "layers": len(ckpt.unet.lora_modules()), "blocks": ckpt.unet.num_blocks},
                     "vae": {"rank": ckpt.vae.rank, "scaling": ckpt.vae.scaling,
                             "layers": len(ckpt.vae.lora_modules()), "blocks": ckpt.vae.num_blocks},
                     "scaling": "lora_alpha 8 / rank",
                     "form": "y = base(x) + scaling * B(A(x) . M_block), M from the scores"},
            "source": source.to_dict(),
        },
        "processing": reference.processing.to_dict(),
        "latent": {"encoder_output": "posterior mean (upstream samples)", "scaling_factor": VAE_SCALING_FACTOR,
                   "vae_factor": 8},
        "guidance": {"cfg_scale": settings.cfg_scale, "batched": settings.cfg_scale != 1.0,
                     "positive_prompt": POSITIVE_PROMPT,
                     "negative_prompt": NEGATIVE_PROMPT if settings.cfg_scale != 1.0 else None},
        "schedule": {"timestep": schedule.timestep, "alpha_cumprod": schedule.alpha_cumprod,
                     "clip_sample_range": schedule.clip_range,
                     "step": "x0 = (z - sqrt(1-a) * eps) / sqrt(a), in the unet graph"},
        "denoise": reference.denoise_plan(),
    }
    return Recipe(reference, s3diff_specs(settings), manifest, sample_output)
