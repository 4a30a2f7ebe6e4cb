"""S3Diff in PyTorch: the parity oracle (UPSTREAM.md, S3Diff, Inference steps 1-8).

Deliberate differences from upstream, all numerically negligible or stated in the manifest:
- the latent is the posterior mean, not a sample;
- images stay float between steps (upstream round-trips through 8-bit PIL images);
- the DDPM step to the end adds no noise (upstream adds noise of std 1e-10 there);
- the two guidance passes may run as one batch of 2B (``batch_guidance``), same maths.

Degradation: ``degradation=None`` estimates (blur, noise) scores per image with the
DEResNet and modulates the LoRA in the graph; ``degradation=(blur, noise)`` merges
the LoRA for that one degradation into the weights, leaving plain SD models.

The reference takes ownership of ``base``: its UNet and VAE encoder are wrapped (or
merged) in place, so build one base per reference.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ...artifact.guidance import Resolved
from ...errors import UserError
from ...processing import Prepared, Processing, postprocess, preprocess
from ..base import BaseModel, encode_prompt
from ..components import VaeDecoder
from ..configs import VAE_SCALING_FACTOR
from .checkpoint import S3DiffCheckpoint, validate
from .degradation import DEResNet
from .lora import ModulationController, install_modulated_lora, merge_fixed_degradation

S3DIFF_SCALE = 4
S3DIFF_TIMESTEP = 999
S3DIFF_CFG_SCALE = 1.07  # hard-coded upstream
S3DIFF_SIZE_MULTIPLE = 64  # the upscaled image is reflect-padded to this before encoding
POSITIVE_PROMPT = (
    "A high-resolution, 8K, ultra-realistic image with sharp focus, vibrant colors, and natural lighting."
)
NEGATIVE_PROMPT = (
    "oil painting, cartoon, blur, dirty, messy, low quality, deformation, low resolution, oversmooth"
)


def s3diff_processing(color_fix: str = "wavelet") -> Processing:
    """x4 bilinear (align_corners=False), clamp, reflect-pad to 64, crop back, colour fix."""
    return Processing(
        scale=S3DIFF_SCALE,
        upscale_filter="bilinear",
        color_fix=color_fix,
        size_policy="reflect_pad",
        size_multiple=S3DIFF_SIZE_MULTIPLE,
    )


# --- the one DDPM step --------------------------------------------------------------------------


def alphas_cumprod(scheduler_config: Mapping) -> torch.Tensor:
    """Cumulative alphas of the base folder's DDPM schedule, float32 like diffusers' DDPMScheduler
    (whose defaults apply to absent keys)."""
    if scheduler_config.get("rescale_betas_zero_snr", False):
        raise UserError("the base model's scheduler config sets rescale_betas_zero_snr, which S3Diff does not use")
    count = int(scheduler_config.get("num_train_timesteps", 1000))
    start = float(scheduler_config.get("beta_start", 0.0001))
    end = float(scheduler_config.get("beta_end", 0.02))
    schedule = scheduler_config.get("beta_schedule", "linear")
    if scheduler_config.get("trained_betas") is not None:
        betas = torch.tensor(scheduler_config["trained_betas"], dtype=torch.float32)
    elif schedule == "linear":
        betas = torch.linspace(start, end, count, dtype=torch.float32)
    elif schedule == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, count, dtype=torch.float32) ** 2
    else:
        raise UserError(
            f"the base model's scheduler uses beta_schedule {schedule!r}; supported: linear, scaled_linear "
            "(SD-Turbo uses scaled_linear)"
        )
    return torch.cumprod(1.0 - betas, dim=0)


@dataclass(frozen=True)
class OneStepSchedule:
    """x0 = (z - sqrt(1 - a) * eps) / sqrt(a) at one timestep, clipped as DDPMScheduler clips."""

    alpha_cumprod: float  # a = alphas_cumprod[timestep] (0.0046601 for SD-Turbo at 999)
    clip_range: float | None  # None when the config's clip_sample is false
    timestep: int = S3DIFF_TIMESTEP

    @classmethod
    def from_config(cls, scheduler_config: Mapping | None, timestep: int = S3DIFF_TIMESTEP) -> OneStepSchedule:
        if not scheduler_config:
            raise UserError(
                "the base model has no scheduler config (scheduler/scheduler_config.json); S3Diff needs it for "
                "the noise schedule"
            )
        prediction = scheduler_config.get("prediction_type", "epsilon")
        if prediction != "epsilon":
            raise UserError(f"the base model's scheduler predicts {prediction!r}; S3Diff's UNet predicts 'epsilon'")
        if scheduler_config.get("thresholding", False):
            raise UserError("the base model's scheduler config enables thresholding, which S3Diff does not use")
        alphas = alphas_cumprod(scheduler_config)
        if not 0 <= timestep < len(alphas):
            raise UserError(f"timestep {timestep} is outside the schedule's {len(alphas)} steps")
        # DDPMScheduler clips x0 by default; SD-Turbo's config turns it off.
        clip = bool(scheduler_config.get("clip_sample", True))
        clip_range = float(scheduler_config.get("clip_sample_range", 1.0)) if clip else None
        return cls(float(alphas[timestep]), clip_range, timestep)

    def coefficients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(1 - a), sqrt(a)) as float32 scalars, computed as diffusers computes them."""
        alpha = torch.tensor(self.alpha_cumprod, dtype=torch.float32)
        return (1 - alpha) ** 0.5, alpha**0.5


# --- the components (what export turns into graphs) ---------------------------------------------


class ModulatedVaeEncoder(nn.Module):
    """(image in [-1,1], scores) -> posterior mean * 0.18215, the VAE encoder's LoRA driven by the scores.

    Without a controller (degradation merged) it takes the image only.
    """

    def __init__(self, vae: nn.Module, controller: ModulationController | None):
        super().__init__()
        self.vae = vae
        self.modulation = controller.modulation if controller else None  # registered, so .to() moves it
        self._controller = controller

    def forward(self, image: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
        with _modulated(self._controller, scores):
            return self.vae.encode(image).latent_dist.mean * VAE_SCALING_FACTOR


class S3DiffDenoiser(nn.Module):
    """(latent, scores) -> z0: classifier-free guided UNet at t=999, then one DDPM step to the end."""

    def __init__(
        self,
        unet: nn.Module,
        controller: ModulationController | None,
        positive_embeds: torch.Tensor,
        negative_embeds: torch.Tensor | None,
        cfg_scale: float,
        schedule: OneStepSchedule,
        batch_guidance: bool = True,
    ):
        super().__init__()
        self.unet = unet
        self.modulation = controller.modulation if controller else None
        self._controller = controller
        self.cfg_scale = float(cfg_scale)
        self.batch_guidance = batch_guidance
        self.clip_range = schedule.clip_range
        sqrt_one_minus_alpha, sqrt_alpha = schedule.coefficients()
        self.register_buffer("positive_embeds", positive_embeds.detach().clone(), persistent=False)
        negative = negative_embeds.detach().clone() if negative_embeds is not None else None
        self.register_buffer("negative_embeds", negative, persistent=False)
        self.register_buffer("timestep", torch.tensor(float(schedule.timestep)), persistent=False)
        self.register_buffer("sqrt_one_minus_alpha", sqrt_one_minus_alpha, persistent=False)
        self.register_buffer("sqrt_alpha", sqrt_alpha, persistent=False)

    def epsilon(self, latent: torch.Tensor, scores: torch.Tensor | None = None,
                cfg_scale: torch.Tensor | None = None) -> torch.Tensor:
        batch = latent.shape[0]
        positive = self.positive_embeds.expand(batch, -1, -1)
        controller = self._controller
        if self.negative_embeds is None:  # cfg_scale == 1: the guidance is the positive pass alone
            with _modulated(controller, scores):
                return self.unet(latent, self.timestep, positive).sample
        negative = self.negative_embeds.expand(batch, -1, -1)
        if self.batch_guidance:
            # positive and negative as one 2B batch: M repeats to match ([pos batch; neg batch])
            repeated = scores.repeat(2, 1) if scores is not None else None
            with _modulated(controller, repeated):
                both = self.unet(torch.cat([latent, latent]), self.timestep, torch.cat([positive, negative])).sample
            eps_positive, eps_negative = both.chunk(2)
        else:
            with _modulated(controller, scores):
                eps_positive = self.unet(latent, self.timestep, positive).sample
                eps_negative = self.unet(latent, self.timestep, negative).sample
        if cfg_scale is None:
            return eps_negative + self.cfg_scale * (eps_positive - eps_negative)
        if cfg_scale.shape != (batch, 1):
            raise ValueError(f"cfg_scale should be ({batch}, 1), got {tuple(cfg_scale.shape)}")
        return eps_negative + cfg_scale.to(latent.dtype)[:, :, None, None] * (eps_positive - eps_negative)

    @property
    def takes_cfg(self) -> bool:
        """Whether the CFG scale is an input (the negative pass is kept: cfg_scale != 1 at build)."""
        return self.negative_embeds is not None

    def forward(self, latent: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        """(latent[, scores][, cfg_scale]) -> z0, in the spec's input order: ``scores`` (B, 2) where
        the LoRA is modulated, ``cfg_scale`` (B, 1) where the negative pass is kept (absent: the
        build's scale)."""
        inputs = list(inputs)
        scores = inputs.pop(0) if self._controller is not None else None
        cfg_scale = inputs.pop(0) if inputs else None
        return self.denoise(latent, scores, cfg_scale)

    def denoise(self, latent: torch.Tensor, scores: torch.Tensor | None = None,
                cfg_scale: torch.Tensor | None = None) -> torch.Tensor:
        eps = self.epsilon(latent, scores, cfg_scale)
        denoised = (latent - self.sqrt_one_minus_alpha * eps) / self.sqrt_alpha
        if self.clip_range is not None:
            denoised = denoised.clamp(-self.clip_range, self.clip_range)
        return denoised


@contextmanager
def _modulated(controller: ModulationController | None, scores: torch.Tensor | None) -> Iterator[None]:
    """Set the controller's M from the scores for one forward (nothing to do once merged)."""
    if controller is None:
        yield
        return
    if scores is None:
        raise ValueError("this component's LoRA is modulated: pass the degradation scores")
    controller.set_scores(scores)
    try:
        yield
    finally:
        controller.clear()  # no stale (or traced) M outlives the call


# --- the pipeline -------------------------------------------------------------------------------


class S3DiffReference(nn.Module):
    """S3Diff x4 inference: LR (B,3,h,w) in [0,1] -> SR (B,3,4h,4w) in [0,1].

    Stages, each a method so parity can be checked per component:
    ``scores(lr)`` -> ``preprocess(lr)`` -> ``encode(x, scores)`` -> ``denoise(z, scores)`` ->
    ``decode(z0)`` -> ``postprocess(decoded, prepared)``.
    """

    def __init__(
        self,
        base: BaseModel,
        ckpt: S3DiffCheckpoint,
        de_net: DEResNet | None = None,
        cfg_scale: float = S3DIFF_CFG_SCALE,
        positive_prompt: str = POSITIVE_PROMPT,
        negative_prompt: str = NEGATIVE_PROMPT,
        degradation: tuple[float, float] | None = None,
        color_fix: str = "wavelet",
        batch_guidance: bool = True,
    ):
        super().__init__()
        schedule = OneStepSchedule.from_config(base.scheduler_config)
        validate(ckpt, base.unet, base.vae)
        if degradation is None and de_net is None:
            raise UserError("S3Diff needs the degradation estimator (de_net.pth) unless a fixed degradation is given")
        self.processing = s3diff_processing(color_fix)
        self.schedule = schedule
        self.cfg_scale = float(cfg_scale)

        unet_lora = install_modulated_lora(base.unet, ckpt.unet, check=False)
        vae_lora = install_modulated_lora(base.vae, ckpt.vae, check=False)
        if degradation is not None:
            fixed = _fixed_scores(degradation)
            merge_fixed_degradation(base.unet, unet_lora, fixed)
            merge_fixed_degradation(base.vae, vae_lora, fixed)
            unet_lora = vae_lora = None
            self.register_buffer("fixed_scores", fixed, persistent=False)
            self.estimator = None
        else:
            self.fixed_scores = None
            self.estimator = de_net.eval()

        positive = encode_prompt(base, positive_prompt)
        negative = encode_prompt(base, negative_prompt) if self.cfg_scale != 1.0 else None
        self.encoder = ModulatedVaeEncoder(base.vae, vae_lora)
        self.denoiser = S3DiffDenoiser(
            base.unet, unet_lora, positive, negative, self.cfg_scale, schedule, batch_guidance
        )
        self.decoder = VaeDecoder(base.vae)
        self.eval().requires_grad_(False)

    @property
    def modulated(self) -> bool:
        """True when the LoRA follows each image's scores (no fixed degradation)."""
        return self.fixed_scores is None

    # --- components (what export and the torch backend run) -----------------

    def components(self) -> dict[str, nn.Module]:
        """Graph name -> module; inputs follow the specs: degradation(lr_image),
        vae_encoder(image[, scores]), unet(latent[, scores][, cfg_scale]), vae_decoder(denoised)."""
        components = {"degradation": self.estimator} if self.modulated else {}
        components.update(vae_encoder=self.encoder, unet=self.denoiser, vae_decoder=self.decoder)
        return components

    @staticmethod
    def denoise_plan() -> dict:
        """How the runtime gets z0: the unet graph's output as is."""
        return {"latent_weight": 0.0, "terms": [{"component": "unet", "weight": 1.0}]}

    # --- the reference pipeline ------------------------------------------------

    @torch.no_grad()
    def scores(self, lr: torch.Tensor, resolved: Resolved | None = None) -> torch.Tensor:
        """(B, 2) degradation scores (blur, noise): the fixed ones, the call's given ones
        (``resolved.scores``), or estimated from the LR image."""
        if self.fixed_scores is not None:
            return self.fixed_scores.expand(lr.shape[0], -1)
        if resolved is not None and resolved.scores is not None:
            return torch.tensor([resolved.scores], dtype=lr.dtype).expand(lr.shape[0], -1)
        return self.estimator(lr)

    def cfg_input(self, batch: int, resolved: Resolved | None = None) -> torch.Tensor | None:
        """The (B, 1) cfg_scale input of a UNet that takes one: the call's, or the build's."""
        if not self.denoiser.takes_cfg:
            return None
        cfg = resolved.cfg_scale if resolved is not None and resolved.cfg_scale is not None else self.cfg_scale
        return torch.full((batch, 1), float(cfg))

    def preprocess(self, lr: torch.Tensor) -> Prepared:
        _check_image(lr)
        return preprocess(lr, self.processing)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder(x, scores if self.modulated else None)

    @torch.no_grad()
    def denoise(self, z: torch.Tensor, scores: torch.Tensor | None = None, resolved: Resolved | None = None
                ) -> torch.Tensor:
        return self.denoiser.denoise(z, scores if self.modulated else None, self.cfg_input(z.shape[0], resolved))

    @torch.no_grad()
    def decode(self, z0: torch.Tensor) -> torch.Tensor:
        return self.decoder(z0)

    def postprocess(self, decoded: torch.Tensor, prepared: Prepared) -> torch.Tensor:
        """Crop the padding, map to [0,1], colour fix against the bilinear upscale, clamp."""
        return postprocess(decoded, prepared, self.processing)

    @torch.no_grad()
    def stage_tensors(self, lr: torch.Tensor, resolved: Resolved | None = None
                      ) -> tuple[dict[str, torch.Tensor], Prepared]:
        """Every named tensor of one run (the spec names), computed the reference way; ``resolved``:
        a call's cfg scale and given scores (``artifact.guidance.resolve``)."""
        prepared = self.preprocess(lr)
        env = {"lr_image": lr, "image": prepared.model_input, "scores": self.scores(lr, resolved)}
        cfg = self.cfg_input(lr.shape[0], resolved)
        if cfg is not None:
            env["cfg_scale"] = cfg
        env["latent"] = self.encode(env["image"], env["scores"])
        env["denoised"] = self.denoise(env["latent"], env["scores"], resolved)
        env["decoded"] = self.decode(env["denoised"])
        return env, prepared

    @torch.no_grad()
    def forward(self, lr: torch.Tensor, resolved: Resolved | None = None) -> torch.Tensor:
        env, prepared = self.stage_tensors(lr, resolved)
        return self.postprocess(env["decoded"], prepared)


def _fixed_scores(degradation: tuple[float, float]) -> torch.Tensor:
    try:
        blur, noise = (float(value) for value in degradation)
    except (TypeError, ValueError):
        raise UserError(f"the fixed degradation should be two numbers (blur, noise), got {degradation!r}") from None
    if not (0.0 <= blur <= 1.0 and 0.0 <= noise <= 1.0):
        raise UserError(f"degradation scores are in [0, 1]; got blur={blur}, noise={noise}")
    return torch.tensor([[blur, noise]], dtype=torch.float32)


def _check_image(lr: torch.Tensor) -> None:
    if not isinstance(lr, torch.Tensor) or lr.dim() != 4 or lr.shape[1] != 3 or not lr.is_floating_point():
        shape = tuple(lr.shape) if isinstance(lr, torch.Tensor) else type(lr).__name__
        raise UserError(f"expected an RGB image tensor (B, 3, h, w) of floats in [0, 1], got {shape}")
