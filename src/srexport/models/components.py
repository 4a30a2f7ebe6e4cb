"""The PyTorch modules that become graphs, one per component spec.

Each wraps a diffusers module so that its forward has exactly the spec's
inputs and outputs; constants (prompt embeddings, timestep, scales) are
buffers, so ONNX export folds them into the graph.
"""

from __future__ import annotations

import torch
from torch import nn

from .configs import VAE_SCALING_FACTOR


class VaeEncoderMean(nn.Module):
    """image in [-1,1] -> posterior mean * 0.18215 (a deployment uses the mean, not a sample)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(image).latent_dist.mean * VAE_SCALING_FACTOR


class VaeDecoder(nn.Module):
    """scaled latent -> image clamped to [-1,1]."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, denoised: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(denoised / VAE_SCALING_FACTOR).sample.clamp(-1, 1)


class EpsilonDenoiser(nn.Module):
    """latent -> latent - eps_scale * UNet(latent, t, prompt): one-step x0 for an eps model at t=1.

    PiSA-SR predicts the residual directly (z0 = z - eps, timestep 1), so the
    graph returns z0; ``eps_scale`` carries lambda_pix in merged guidance.
    """

    def __init__(self, unet: nn.Module, prompt_embeds: torch.Tensor, timestep: float, eps_scale: float = 1.0):
        super().__init__()
        self.unet = unet
        self.register_buffer("prompt_embeds", prompt_embeds.detach().clone(), persistent=False)
        self.register_buffer("timestep", torch.tensor(float(timestep)), persistent=False)
        self.eps_scale = float(eps_scale)

    def epsilon(self, latent: torch.Tensor) -> torch.Tensor:
        prompt = self.prompt_embeds.expand(latent.shape[0], -1, -1)
        return self.unet(latent, self.timestep, prompt).sample

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        eps = self.epsilon(latent)
        return latent - eps * self.eps_scale if self.eps_scale != 1.0 else latent - eps
