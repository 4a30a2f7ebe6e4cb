"""PiSA-SR's part of a build: reference, specs, manifest sections, merged-vs-exact."""

from __future__ import annotations

import copy
import dataclasses

from .. import __version__
from ..artifact.guidance import Resolved, default_mode, pisa_guidance_section, pisa_plan
from ..artifact.guidance import pisa_unets as guidance_unets
from ..models.configs import VAE_SCALING_FACTOR
from ..models.pisa_reference import PISA_TIMESTEP, PisaReference
from ..parity import compare
from ..models.sources import demo_description
from ..samples import SAMPLE_NAME, sample_image
from .build import Progress, Recipe
from ..artifact.specs import ComponentSpec, unet_spec, vae_decoder_spec, vae_encoder_spec

_UNET_WEIGHTS = {
    "unet": "W0 + dW_pix + (lambda_sem/lambda_pix) dW_sem, eps scaled by lambda_pix",
    "unet_pix": "W0 + dW_pix",
    "unet_sem": "W0 + dW_pix + dW_sem",
}
_ADJUSTABLE_UNET = ("latent, lora_scales (a, b) per sample -> z0 = latent - eps; every LoRA layer W0 x + a B_pix A_pix x "
                    "+ b B_sem A_sem x (both sets as branches); timestep 1 and empty-prompt embedding folded in")


# What processing.size_policy means for the output, in the manifest's words.
_SIZE_NOTES = {
    "pad": "Output is exactly scale x the input: the upscaled image is reflect-padded to a multiple of 8 "
           "(processing.size_policy reflect_pad) and the result cropped back; upstream floors instead.",
    "floor": "Output sides are scale x the input floored to a multiple of 8, as upstream (processing.size_policy "
             "resize_floor), except that inputs pre-resized for process_size end at exactly scale x the input.",
}


def pisa_unets(settings) -> list[str]:
    return guidance_unets(settings.guidance)


def pisa_specs(settings) -> dict[str, ComponentSpec]:
    specs = {"vae_encoder": vae_encoder_spec()}
    if settings.guidance == "adjustable":
        specs["unet"] = unet_spec("unet", description=_ADJUSTABLE_UNET, with_lora_scales=True)
    for name in pisa_unets(settings) if settings.guidance != "adjustable" else []:
        specs[name] = unet_spec(name, description=f"latent -> z0 = latent - eps; UNet weights {_UNET_WEIGHTS[name]}; "
                                                   "timestep 1 and empty-prompt embedding folded in")
    specs["vae_decoder"] = vae_decoder_spec()
    return specs


def prepare_pisa(source, loaded, settings, progress: Progress) -> Recipe:
    settings = settings.validate()
    base, ckpt = loaded
    lr = sample_image()

    progress("measuring merged vs exact guidance on the sample image")
    other = "exact" if default_mode(settings.guidance, settings.lambda_pix) == "merged" else "merged"
    other_out = None
    if other == "merged" and settings.lambda_pix == 0:
        progress.note("lambda_pix = 0 has no merged form; skipped")
        reference = PisaReference(base, ckpt, settings)
    elif settings.guidance == "adjustable":  # one UNet runs both: the other mode is a per-call plan
        reference = PisaReference(base, ckpt, settings)
        other_out = reference(lr, Resolved(pisa_plan("adjustable", other, settings.lambda_pix, settings.lambda_sem)))
    else:
        # the reference merges into the UNet it is given: the other mode gets a copy
        other_ref = PisaReference(dataclasses.replace(base, unet=copy.deepcopy(base.unet)), ckpt,
                                  dataclasses.replace(settings, guidance=other))
        other_out = other_ref(lr)
        del other_ref
        reference = PisaReference(base, ckpt, settings)
    sample_output = reference(lr)
    checks = {}
    if other_out is not None:
        agreement = compare(other_out, sample_output, peak_to_peak=1.0)
        progress.note(f"merged vs exact at lambda_pix={settings.lambda_pix}, lambda_sem={settings.lambda_sem}: "
                      f"{agreement.describe()}")
        checks["merged_vs_exact"] = dict(agreement.to_dict(), input=SAMPLE_NAME)
    return Recipe(reference, pisa_specs(settings), pisa_manifest(source, settings, reference, ckpt.ranks),
                  sample_output, checks)


def pisa_manifest(source, settings, reference, ranks: dict) -> dict:
    demo_note = f" Built-in demo: {demo_description(source)}." if source.demo else ""
    return {
        "description": (
            f"PiSA-SR x{settings.scale} ({settings.guidance} guidance, lambda_pix={settings.lambda_pix}, "
            f"lambda_sem={settings.lambda_sem}) exported by srexport {__version__}. Run: pre-process (processing), "
            "vae_encoder, the denoise plan's UNet graphs (guidance: what a call may change), vae_decoder, post-process. The encoder returns the "
            "posterior mean, not a sample. " + _SIZE_NOTES[settings.size_policy] + demo_note
        ),
        "model": {
            "kind": "pisa-sr",
            "demo": source.demo,
            "settings": dataclasses.asdict(settings),
            "lora": {"ranks": dict(ranks), "description": "scaling = lora_alpha 8 / rank (PEFT's default)"},
            "source": source.to_dict(),
        },
        "processing": reference.processing.to_dict(),
        "latent": {"encoder_output": "posterior mean (upstream samples)", "scaling_factor": VAE_SCALING_FACTOR,
                   "vae_factor": 8, "timestep": PISA_TIMESTEP, "prompt": ""},
        "denoise": settings.denoise_plan(),
        "guidance": pisa_guidance_section(settings.guidance, settings.lambda_pix, settings.lambda_sem,
                                          pisa_unets(settings)),
    }
