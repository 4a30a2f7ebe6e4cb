"""S3Diff's part of a build: reference, specs, manifest sections.

Dynamic degradation (default): a ``degradation`` graph estimates the scores
per image and both the encoder and the UNet take them as an input; the LoRA
stays in the graphs as low-rank branches mixed by matrices computed inside
the graph, once per image. Fixed degradation: the modulated deltas are merged
into static weights for the given scores, and the estimator is left out.
"""

from __future__ import annotations

import dataclasses

from .. import __version__
from ..artifact.guidance import s3diff_guidance_section
from ..models.configs import VAE_SCALING_FACTOR
from ..models.sources import demo_description
from ..samples import sample_image
from ..models.s3diff.settings import S3DiffSettings, parse_degradation  # noqa: F401  (the recipe's settings)
from .build import Progress, Recipe
from ..artifact.specs import ComponentSpec, degradation_spec, unet_spec, vae_decoder_spec, vae_encoder_spec


def s3diff_specs(settings: S3DiffSettings) -> dict[str, ComponentSpec]:
    dynamic = settings.dynamic
    lora = "LoRA modulated by the scores input" if dynamic else f"LoRA merged for fixed scores {settings.degradation}"
    guidance = ("positive and negative prompts as one batch of 2B, eps = neg + cfg * (pos - neg), cfg the "
                "per-image input cfg_scale" if settings.cfg_scale != 1.0 else "positive prompt only (cfg 1.0)")
    specs = {"degradation": degradation_spec()} if dynamic else {}
    specs["vae_encoder"] = vae_encoder_spec(with_scores=dynamic)
    specs["unet"] = unet_spec("unet", with_scores=dynamic, with_cfg=settings.cfg_scale != 1.0, description=(
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
                     "description": "scaling = lora_alpha 8 / rank; a layer computes y = base(x) + scaling * "
                                    "B(A(x) . M_block), M from the scores"},
            "source": source.to_dict(),
        },
        "processing": reference.processing.to_dict(),
        "latent": {"encoder_output": "posterior mean (upstream samples)", "scaling_factor": VAE_SCALING_FACTOR,
                   "vae_factor": 8},
        "guidance": s3diff_guidance_section(settings.cfg_scale, POSITIVE_PROMPT, NEGATIVE_PROMPT),
        "schedule": {"timestep": schedule.timestep, "alpha_cumprod": schedule.alpha_cumprod,
                     "clip_sample_range": schedule.clip_range,
                     "description": "one DDPM step x0 = (z - sqrt(1-a) * eps) / sqrt(a) with a = alpha_cumprod, "
                                    "inside the unet graph"},
        "denoise": reference.denoise_plan(),
    }
    return Recipe(reference, s3diff_specs(settings), manifest, sample_output)
