"""PiSA-SR in PyTorch: the parity oracle (UPSTREAM.md, PiSA-SR inference steps 1-9).

Deliberate differences from upstream, all stated in the manifest:
the latent is the posterior mean, not a sample; images stay float between
steps (upstream round-trips through 8-bit PIL images); by default
(``size_policy="pad"``) the output is exactly scale x the input: the upscaled
image is reflect-padded to the multiple of 8 the VAE needs and the result
cropped back, where upstream resizes it to the size floored to a multiple of 8
(``size_policy="floor"``, which loses up to 7 pixels per side).

Guidance (artifact/guidance.py says what a call may change):
- ``exact``: two UNets, W_pix = W0 + dW_pix and W_sem = W_pix + dW_sem;
  eps = lambda_pix * eps_pix + lambda_sem * (eps_sem - eps_pix).
- ``merged``: one UNet, W = W0 + dW_pix + (lambda_sem / lambda_pix) dW_sem and
  eps scaled by lambda_pix: first order in the deltas, exact at lambda_pix=1
  for lambda_sem in {0, 1}.
- ``adjustable``: one UNet with both LoRA sets as branches mixed per sample
  (models/pisa_branches.py); runs merged or exact at any scales per call.

``denoise``, ``stage_tensors`` and ``forward`` take a ``Resolved`` (the
per-call plan of ``artifact.guidance.resolve``); None runs the build's scales.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..artifact.guidance import LORA_SCALES, PISA_BUILDS, EXACT_COEFFICIENTS, Resolved, default_mode, pisa_plan
from ..errors import UserError
from ..processing import Prepared, Processing, postprocess, preprocess
from .base import BaseModel, encode_prompt
from .components import EpsilonDenoiser, VaeDecoder, VaeEncoderMean
from .lora import add_deltas
from .pisa import PisaCheckpoint, branch_deltas, validate_against_unet
from .pisa_branches import AdjustableDenoiser, install_branches

PISA_TIMESTEP = 1
GUIDANCE_MODES = PISA_BUILDS  # what --guidance builds
PISA_SIZE_MULTIPLE = 8  # the VAE's downsampling factor
# --size-policy -> the manifest's processing.size_policy
SIZE_POLICIES = {"pad": "reflect_pad", "floor": "resize_floor"}


@dataclass(frozen=True)
class PisaSettings:
    lambda_pix: float = 1.0
    lambda_sem: float = 1.0
    guidance: str = "merged"
    scale: int = 4
    process_size: int = 512
    color_fix: str = "adain"
    size_policy: str = "pad"  # "pad" (exactly scale x the input) | "floor" (upstream's)

    @classmethod
    def from_manifest(cls, settings: dict) -> "PisaSettings":
        """The settings an artifact's ``model.settings`` records. Artifacts written before
        size_policy was a setting all floored, as upstream does."""
        return cls(**{"size_policy": "floor", **settings})

    def validate(self) -> "PisaSettings":
        if self.guidance not in GUIDANCE_MODES:
            raise UserError(f"--guidance {self.guidance!r} is not one of {', '.join(GUIDANCE_MODES)}")
        if not all(math.isfinite(v) for v in (self.lambda_pix, self.lambda_sem)):
            raise UserError(f"--lambda-pix {self.lambda_pix} / --lambda-sem {self.lambda_sem}: pass finite numbers")
        if self.guidance == "merged" and self.lambda_pix == 0:
            raise UserError(
                "--lambda-pix 0 cannot be merged (the semantic delta is scaled by lambda_sem/lambda_pix); "
                "use --guidance exact for lambda_pix = 0"
            )
        if self.scale < 1:
            raise UserError(f"--scale must be a positive integer, got {self.scale}")
        if self.size_policy not in SIZE_POLICIES:
            raise UserError(f"--size-policy {self.size_policy!r} is not one of {', '.join(SIZE_POLICIES)}")
        if self.process_size < 8 * self.scale:
            raise UserError(f"--process-size {self.process_size} is too small; use at least {8 * self.scale} "
                            f"(upstream uses 512)")
        return self

    def processing(self) -> Processing:
        return Processing(
            scale=self.scale,
            upscale_filter="bicubic",
            color_fix=self.color_fix,
            min_lr_side=self.process_size // self.scale,
            size_policy=SIZE_POLICIES[self.size_policy],
            size_multiple=PISA_SIZE_MULTIPLE,
        )

    def denoise_plan(self) -> dict:
        """How the runtime combines the UNet graphs' z0 outputs into the final z0 at the build's
        scales (``artifact.guidance.pisa_plan``).

        z0 = latent_weight * latent + sum(weight_i * z0_i). With z0_i = z - eps_i, the
        upstream formula z - [lp*eps_pix + ls*(eps_sem - eps_pix)] becomes
        (1 - lp) z + (lp - ls) z0_pix + ls z0_sem.
        """
        return pisa_plan(self.guidance, default_mode(self.guidance, self.lambda_pix), self.lambda_pix,
                         self.lambda_sem)

    def calibration_coefficients(self) -> list[tuple[float, float]]:
        """(a, b) an adjustable UNet is calibrated at: merged at the build's scales and exact's two."""
        merged = [(1.0, self.lambda_sem / self.lambda_pix)] if self.lambda_pix != 0 else []
        return list(dict.fromkeys([*merged, *EXACT_COEFFICIENTS]))


class PisaReference(nn.Module):
    """PiSA-SR's inference, LoRA merged into the weights (merged, exact) or kept as branches
    (adjustable); also provides the per-component modules that export turns into graphs."""

    def __init__(self, base: BaseModel, ckpt: PisaCheckpoint, settings: PisaSettings):
        super().__init__()
        self.settings = settings.validate()
        self.processing = settings.processing()
        validate_against_unet(ckpt, base.unet)
        prompt = encode_prompt(base, "")
        self.register_buffer("prompt_embeds", prompt, persistent=False)
        if settings.guidance != "adjustable":
            d_pix = branch_deltas(ckpt, base.unet, "pix")
            d_sem = branch_deltas(ckpt, base.unet, "sem")
        lp, ls = settings.lambda_pix, settings.lambda_sem

        self.encoder = VaeEncoderMean(base.vae)
        self.decoder = VaeDecoder(base.vae)
        unets = nn.ModuleDict()
        if settings.guidance == "adjustable":
            coefficients = install_branches(base.unet, ckpt)
            unets["unet"] = AdjustableDenoiser(base.unet, coefficients, prompt, PISA_TIMESTEP)
        elif settings.guidance == "exact":
            # Two weight sets; the base UNet becomes W_pix to spare one copy.
            unet_pix = base.unet
            add_deltas(unet_pix, d_pix)
            unet_sem = copy.deepcopy(unet_pix)
            add_deltas(unet_sem, d_sem)
            unets["unet_pix"] = EpsilonDenoiser(unet_pix, prompt, PISA_TIMESTEP)
            unets["unet_sem"] = EpsilonDenoiser(unet_sem, prompt, PISA_TIMESTEP)
        else:
            unet = base.unet
            add_deltas(unet, d_pix)
            add_deltas(unet, d_sem, weight=ls / lp)
            unets["unet"] = EpsilonDenoiser(unet, prompt, PISA_TIMESTEP, eps_scale=lp)
        self.unets = unets
        self.eval().requires_grad_(False)

    # --- components (what export and the torch backend run) -----------------

    def components(self) -> dict[str, nn.Module]:
        return {"vae_encoder": self.encoder, **dict(self.unets.items()), "vae_decoder": self.decoder}

    def denoise_plan(self) -> dict:
        """How the runtime combines the UNet graphs' outputs (as S3DiffReference.denoise_plan)."""
        return self.settings.denoise_plan()

    def calibration_coefficients(self) -> list[tuple[float, float]]:
        return self.settings.calibration_coefficients()

    # --- the reference pipeline ------------------------------------------------

    def preprocess(self, lr: torch.Tensor) -> Prepared:
        return preprocess(lr, self.processing)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def plan(self, resolved: Resolved | None = None) -> dict:
        return resolved.plan if resolved is not None else self.denoise_plan()

    @torch.no_grad()
    def run_term(self, term: dict, z: torch.Tensor) -> torch.Tensor:
        """One plan term's UNet output z0_i on ``z`` (its lora_scales where it has them)."""
        unet = self.unets[term["component"]]
        if LORA_SCALES in term:
            return unet(z, torch.tensor([term[LORA_SCALES]], dtype=z.dtype).expand(z.shape[0], 2))
        return unet(z)

    @torch.no_grad()
    def denoise(self, z: torch.Tensor, resolved: Resolved | None = None) -> torch.Tensor:
        """z0 by the plan (``denoise_plan``; per call: ``resolved.plan``), one UNet call per term:
        the formula of upstream's two passes, with nothing batched."""
        plan = self.plan(resolved)
        denoised = plan["latent_weight"] * z if plan["latent_weight"] else 0
        for term in plan["terms"]:
            denoised = denoised + term["weight"] * self.run_term(term, z)
        return denoised

    @torch.no_grad()
    def decode(self, z0: torch.Tensor) -> torch.Tensor:
        return self.decoder(z0)

    @torch.no_grad()
    def stage_tensors(self, lr: torch.Tensor, resolved: Resolved | None = None
                      ) -> tuple[dict[str, torch.Tensor], Prepared]:
        """Every named tensor of one run (the spec names), computed the reference way; an adjustable
        UNet's ``lora_scales`` are its first term's."""
        prepared = self.preprocess(lr)
        env = {"lr_image": lr, "image": prepared.model_input}
        env["latent"] = self.encode(env["image"])
        env["denoised"] = self.denoise(env["latent"], resolved)
        first = self.plan(resolved)["terms"][0]
        if LORA_SCALES in first:
            env[LORA_SCALES] = torch.tensor([first[LORA_SCALES]], dtype=env["latent"].dtype)
        env["decoded"] = self.decode(env["denoised"])
        return env, prepared

    @torch.no_grad()
    def forward(self, lr: torch.Tensor, resolved: Resolved | None = None) -> torch.Tensor:
        """LR (1,3,h,w) in [0,1] -> SR (1,3,scale*h,scale*w) in [0,1] (floored to multiples of 8
        under size_policy "floor", unless pre-resized: ``Processing.output_size``)."""
        env, prepared = self.stage_tensors(lr, resolved)
        return postprocess(env["decoded"], prepared, self.processing)
