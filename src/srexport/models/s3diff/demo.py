"""Tiny seeded S3Diff checkpoints in exactly the upstream formats, for the demo architecture.

``s3diff.pkl`` holds every key of the upstream dict (UPSTREAM.md, S3Diff) with
upstream's ranks (32 UNet, 16 VAE; a rank above a demo layer's width is only
over-parameterised, the maths is the same), LoRA on exactly the layers the
target rules select in the DEMO_UNET / DEMO_VAE, and a non-zero B so the LoRA
changes the output. ``de_net.pth`` is a plain DEResNet state dict.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn

from ..configs import ARCHITECTURES
from .checkpoint import (
    BLOCK_EMBED_DIM,
    DEGRADATION_EMBED_DIM,
    NUM_FREQUENCIES,
    UNET_ADAPTER,
    UNET_NUM_BLOCKS,
    VAE_ADAPTER,
    VAE_NUM_BLOCKS,
)
from .degradation import DEResNet
from .lora import UNET_LORA_TARGET_MODULES, VAE_LORA_TARGET_MODULES, select_lora_targets

DEMO_RANK_UNET = 32
DEMO_RANK_VAE = 16
# Std of B relative to a unit-gain init: large enough that the LoRA visibly changes outputs,
# small enough that the tiny random models stay well behaved.
_LORA_B_GAIN = 0.1
_DE_NET_TRUNK_GAIN = 0.5
_DE_NET_HEAD_GAIN = 1.5


def write_demo_checkpoints(directory: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Write ``s3diff.pkl`` and ``de_net.pth`` into ``directory``; return their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    s3diff_path, de_net_path = directory / "s3diff.pkl", directory / "de_net.pth"
    torch.save(build_demo_checkpoint(seed), s3diff_path)
    torch.save(build_demo_de_net(seed).state_dict(), de_net_path)
    return s3diff_path, de_net_path


def build_demo_checkpoint(seed: int = 0, arch: str = "demo") -> dict:
    """The ``s3diff.pkl`` dict with seeded random weights for the demo architecture
    (or ``arch="sd21"``: full SD 2.1 / SD-Turbo shapes, for latency work)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = ARCHITECTURES[arch]
    with torch.device("meta"):  # only module names and shapes are needed
        unet = UNet2DConditionModel(**shapes["unet"])
        vae = AutoencoderKL(**shapes["vae"])

    state_dict_unet = _lora_tensors(unet, UNET_LORA_TARGET_MODULES, DEMO_RANK_UNET, UNET_ADAPTER, generator)
    conv_in = unet.conv_in
    state_dict_unet["conv_in.weight"] = _uniform(generator, tuple(conv_in.weight.shape), _fan_in(conv_in))
    state_dict_unet["conv_in.bias"] = _uniform(generator, tuple(conv_in.bias.shape), _fan_in(conv_in))
    state_dict_vae = _lora_tensors(vae, VAE_LORA_TARGET_MODULES, DEMO_RANK_VAE, VAE_ADAPTER, generator)

    content = {
        "unet_lora_target_modules": list(UNET_LORA_TARGET_MODULES),
        "vae_lora_target_modules": VAE_LORA_TARGET_MODULES,
        "rank_unet": DEMO_RANK_UNET,
        "rank_vae": DEMO_RANK_VAE,
        "state_dict_unet": state_dict_unet,
        "state_dict_vae": state_dict_vae,
    }
    for kind, rank in (("vae", DEMO_RANK_VAE), ("unet", DEMO_RANK_UNET)):
        content[f"state_dict_{kind}_de_mlp"] = _linear(generator, 4 * NUM_FREQUENCIES, DEGRADATION_EMBED_DIM, "0.")
        content[f"state_dict_{kind}_block_mlp"] = _linear(generator, BLOCK_EMBED_DIM, BLOCK_EMBED_DIM, "0.")
        content[f"state_dict_{kind}_fuse_mlp"] = _linear(
            generator, DEGRADATION_EMBED_DIM + BLOCK_EMBED_DIM, rank * rank, ""
        )
    # Upstream saves w as an nn.Parameter; keep that so loading sees the same object kinds.
    content["w"] = nn.Parameter(torch.randn(NUM_FREQUENCIES, generator=generator), requires_grad=False)
    content["state_embeddings"] = {
        "state_dict_vae_block": {"weight": torch.randn(VAE_NUM_BLOCKS, BLOCK_EMBED_DIM, generator=generator)},
        "state_dict_unet_block": {"weight": torch.randn(UNET_NUM_BLOCKS, BLOCK_EMBED_DIM, generator=generator)},
    }
    return content


def build_demo_de_net(seed: int = 0) -> DEResNet:
    """A default-width DEResNet with seeded weights (upstream's layout, so a real de_net.pth fits too)."""
    generator = torch.Generator().manual_seed(seed + 1)
    model = DEResNet()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                # Damped trunk so eight residual blocks stay bounded; livelier head so the scores
                # spread over (0, 1) and differ between images instead of sitting at 0.5.
                gain = _DE_NET_HEAD_GAIN if name.startswith("fc_degree") else _DE_NET_TRUNK_GAIN
                std = gain * math.sqrt(2 / _fan_in(module))
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
                module.bias.zero_()
    return model.eval()


def _lora_tensors(
    model: nn.Module, targets: list[str] | str, rank: int, adapter: str, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    tensors = {}
    for name in select_lora_targets(model, targets):
        layer = model.get_submodule(name)
        if isinstance(layer, nn.Linear):
            shape_a, shape_b = (rank, layer.in_features), (layer.out_features, rank)
        else:
            shape_a, shape_b = (rank, layer.in_channels, *layer.kernel_size), (layer.out_channels, rank, 1, 1)
        fan_in_a = math.prod(shape_a[1:])
        tensors[f"{name}.lora_A.{adapter}.weight"] = torch.randn(shape_a, generator=generator) / math.sqrt(fan_in_a)
        lora_b = torch.randn(shape_b, generator=generator) * _LORA_B_GAIN / math.sqrt(rank)
        tensors[f"{name}.lora_B.{adapter}.weight"] = lora_b
    return tensors


def _linear(generator: torch.Generator, in_features: int, out_features: int, prefix: str) -> dict[str, torch.Tensor]:
    """Seeded weights with nn.Linear's default range."""
    return {
        f"{prefix}weight": _uniform(generator, (out_features, in_features), in_features),
        f"{prefix}bias": _uniform(generator, (out_features,), in_features),
    }


def _uniform(generator: torch.Generator, shape: tuple[int, ...], fan_in: int) -> torch.Tensor:
    bound = 1 / math.sqrt(fan_in)
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


def _fan_in(layer: nn.Module) -> int:
    return math.prod(layer.weight.shape[1:])
