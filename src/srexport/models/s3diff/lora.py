"""S3Diff's degradation-guided LoRA (UPSTREAM.md, S3Diff, steps 1-5).

Each wrapped layer computes ``y = base(x) + scaling * B(A(x) . M_block)`` where
``M`` (B, n_blocks, r, r) comes from the degradation scores through a small MLP
and the contraction is over A's rank axis with M's first axis. So per image the
weight is ``W0 + scaling * B @ M^T @ A``: mergeable for one fixed degradation,
not across images.

``M`` is computed once per forward and shared by every layer through a
:class:`ModulationController`::

    controller = install_modulated_lora(unet, ckpt.unet)
    controller.set(controller.modulation(scores))   # inside the caller's forward
    eps = unet(z, t, c).sample

Because the wrapped layers read the controller's tensors through ordinary ops,
this traces (legacy ONNX exporter) with the scores as a graph input, provided
``set`` runs inside the traced forward. The controller stores ``scaling * M``
split per block, so each layer does one small matmul and no extra multiply.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from ...errors import UserError

if TYPE_CHECKING:
    from .checkpoint import LoRAPart

# Upstream's target rules (what its s3diff.pkl stores): PEFT's module-name matching.
UNET_LORA_TARGET_MODULES = [
    "to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_shortcut", "conv_out",
    "proj_in", "proj_out", "ff.net.2", "ff.net.0.proj",
]
VAE_LORA_TARGET_MODULES = r"^encoder\..*(conv1|conv2|conv_in|conv_shortcut|conv|conv_out|to_k|to_q|to_v|to_out\.0)$"


# --- which layers, which block ------------------------------------------------------------------


def matches_lora_target(name: str, target_modules: list[str] | str) -> bool:
    """PEFT's rule: a regex string must match the whole name; a list entry must equal the name or
    be its dotted suffix (so ``conv`` selects ``...downsamplers.0.conv`` but not ``conv_in``)."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return name in target_modules or any(name.endswith(f".{target}") for target in target_modules)


def select_lora_targets(model: nn.Module, target_modules: list[str] | str) -> list[str]:
    """Names of the modules the rule wraps (SD 2.1: 257 in the UNet, 31 in the VAE), in model order."""
    names = []
    for name, module in model.named_modules():
        if not name or not matches_lora_target(name, target_modules):
            continue
        if type(module) not in (nn.Linear, nn.Conv2d):
            raise UserError(
                f"LoRA target {name!r} is a {type(module).__name__}; "
                "only plain Linear and Conv2d layers can be wrapped"
            )
        names.append(name)
    return names


def unet_block_index(name: str) -> int:
    """down_blocks.k -> k, mid_block -> 4, up_blocks.k -> 5 + k, anything else (conv_out) -> 9."""
    parts = name.split(".")
    if parts[0] == "down_blocks":
        return int(parts[1])
    if parts[0] == "mid_block":
        return 4
    if parts[0] == "up_blocks":
        return 5 + int(parts[1])
    return 9


def vae_block_index(name: str) -> int:
    """encoder.down_blocks.k -> k, encoder.mid_block -> 4, anything else (conv_in, conv_out) -> 5."""
    parts = name.split(".")
    if len(parts) > 2 and parts[1] == "down_blocks":
        return int(parts[2])
    if len(parts) > 1 and parts[1] == "mid_block":
        return 4
    return 5


BLOCK_INDEX: dict[str, Callable[[str], int]] = {"unet": unet_block_index, "vae": vae_block_index}


# --- scores -> M ---------------------------------------------------------------------------------


def fourier_embedding(scores: torch.Tensor, frequencies: torch.Tensor) -> torch.Tensor:
    """(B, 2) scores -> (B, 4F): [sin p0, cos p0, sin p1, cos p1] with p = score * w * 2 pi."""
    phases = scores[..., None] * frequencies * 2 * math.pi  # same operation order as upstream
    return torch.cat([torch.sin(phases), torch.cos(phases)], dim=-1).flatten(1)


class DegradationModulation(nn.Module):
    """Degradation scores (B, 2) -> per-block rank-mixing matrices M (B, n_blocks, r, r)."""

    def __init__(
        self,
        rank: int,
        num_blocks: int,
        num_frequencies: int = 64,
        degradation_dim: int = 256,
        block_dim: int = 64,
        num_degradations: int = 2,
    ):
        super().__init__()
        self.rank = rank
        self.num_blocks = num_blocks
        self.register_buffer("w", torch.zeros(num_frequencies))
        self.de_mlp = nn.Sequential(nn.Linear(2 * num_degradations * num_frequencies, degradation_dim), nn.ReLU())
        self.block_embedding = nn.Embedding(num_blocks, block_dim)
        self.block_mlp = nn.Sequential(nn.Linear(block_dim, block_dim), nn.ReLU())
        self.fuse_mlp = nn.Linear(degradation_dim + block_dim, rank * rank)

    @classmethod
    def from_part(cls, part: LoRAPart) -> DegradationModulation:
        modulation = cls(rank=part.rank, num_blocks=part.num_blocks, num_frequencies=part.fourier_frequencies.shape[0])
        state_dict = {"w": part.fourier_frequencies, "block_embedding.weight": part.block_embedding}
        state_dict.update({f"de_mlp.{k}": v for k, v in part.de_mlp.items()})
        state_dict.update({f"block_mlp.{k}": v for k, v in part.block_mlp.items()})
        state_dict.update({f"fuse_mlp.{k}": v for k, v in part.fuse_mlp.items()})
        modulation.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
        return modulation.eval()

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        degradation = self.de_mlp(fourier_embedding(scores, self.w))  # (B, 256)
        blocks = self.block_mlp(self.block_embedding.weight)  # (n_blocks, 64)
        batch = degradation.shape[0]
        fused = torch.cat(
            [degradation.unsqueeze(1).expand(-1, self.num_blocks, -1), blocks.unsqueeze(0).expand(batch, -1, -1)],
            dim=-1,
        )
        return self.fuse_mlp(fused).reshape(batch, self.num_blocks, self.rank, self.rank)


# --- the wrapped layers ------------------------------------------------------------------------


class ModulationController:
    """Holds the modulation network and the current ``scaling * M`` that every wrapped layer reads.

    ``set(M)`` takes M (B, n_blocks, r, r) with B equal to the batch the model will see, or 1 to
    apply one degradation to the whole batch. Not an nn.Module on purpose: the wrapped layers
    point at it without making it (or each other) their submodule.
    """

    def __init__(self, modulation: DegradationModulation, scaling: float):
        self.modulation = modulation
        self.scaling = scaling
        self.layers: dict[str, ModulatedLoRALinear | ModulatedLoRAConv2d] = {}
        self._blocks: tuple[torch.Tensor, ...] | None = None

    @property
    def rank(self) -> int:
        return self.modulation.rank

    def set(self, modulation_matrices: torch.Tensor) -> None:
        expected = (self.modulation.num_blocks, self.rank, self.rank)
        if modulation_matrices.dim() != 4 or tuple(modulation_matrices.shape[1:]) != expected:
            found = tuple(modulation_matrices.shape)
            raise ValueError(f"M should be (B, {', '.join(map(str, expected))}), got {found}")
        self._blocks = (modulation_matrices * self.scaling).unbind(1)

    def set_scores(self, scores: torch.Tensor) -> None:
        """``set(modulation(scores))``."""
        self.set(self.modulation(scores))

    def clear(self) -> None:
        self._blocks = None

    def block(self, index: int) -> torch.Tensor:
        """``scaling * M[:, index]`` (B, r, r)."""
        if self._blocks is None:
            raise RuntimeError("no degradation modulation set: call controller.set(M) before running the model")
        return self._blocks[index]


class ModulatedLoRALinear(nn.Module):
    def __init__(self, base_layer: nn.Linear, rank: int, block_index: int, controller: ModulationController):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.Linear(base_layer.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base_layer.out_features, bias=False)
        self.block_index = block_index
        self.controller = controller

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixing = self.controller.block(self.block_index)  # (B, r, r), scaling folded in
        t = self.lora_A(x)
        if t.dim() == 3:  # (B, tokens, r): the transformer layers
            t = torch.matmul(t, mixing)
        else:
            t = torch.matmul(t.reshape(t.shape[0], -1, t.shape[-1]), mixing).reshape(t.shape)
        return self.base_layer(x) + self.lora_B(t)

    def delta_weight(self, mixing: torch.Tensor) -> torch.Tensor:
        """scaling * B @ M^T @ A for one image's ``scaling * M_block`` (r, r), in mixing's dtype."""
        lora_a, lora_b = self.lora_A.weight.to(mixing.dtype), self.lora_B.weight.to(mixing.dtype)
        return lora_b @ mixing.T @ lora_a


class ModulatedLoRAConv2d(nn.Module):
    def __init__(self, base_layer: nn.Conv2d, rank: int, block_index: int, controller: ModulationController):
        super().__init__()
        if base_layer.groups != 1 or base_layer.dilation != (1, 1):
            raise ValueError("modulated LoRA supports only ungrouped, undilated convolutions")
        self.base_layer = base_layer
        # A sees the same receptive field as the base conv; B is a 1x1 projection back up.
        self.lora_A = nn.Conv2d(
            base_layer.in_channels, rank, base_layer.kernel_size, base_layer.stride, base_layer.padding, bias=False
        )
        self.lora_B = nn.Conv2d(rank, base_layer.out_channels, 1, bias=False)
        self.block_index = block_index
        self.controller = controller

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixing = self.controller.block(self.block_index)  # (B, r, r)
        t = self.lora_A(x)  # (B, r, h, w)
        # t'[b, s] = sum_r t[b, r] M[b, r, s], as a batched matmul over flattened pixels
        t = torch.matmul(mixing.transpose(1, 2), t.flatten(2)).reshape(t.shape)
        return self.base_layer(x) + self.lora_B(t)

    def delta_weight(self, mixing: torch.Tensor) -> torch.Tensor:
        """dW[o, i, kh, kw] = sum_{r,s} B[o, s] (scaling M)[r, s] A[r, i, kh, kw], in mixing's dtype."""
        lora_a, lora_b = self.lora_A.weight.to(mixing.dtype), self.lora_B.weight[:, :, 0, 0].to(mixing.dtype)
        return torch.einsum("os,rs,rikl->oikl", lora_b, mixing, lora_a)


# --- install and merge -------------------------------------------------------------------------

_INSTALLED_FLAG = "_srexport_s3diff_lora"


def install_modulated_lora(model: nn.Module, part: LoRAPart, *, check: bool = True) -> ModulationController:
    """Wrap ``part``'s target layers of ``model`` (a diffusers UNet or AutoencoderKL) in place.

    Loads the LoRA A/B tensors and the fully fine-tuned weights (the UNet's conv_in) and returns
    the controller that feeds all wrapped layers their M. ``check`` validates the part against
    the model first (one-line UserError on any mismatch).
    """
    from .checkpoint import validate_part  # checkpoint.py imports this module

    if getattr(model, _INSTALLED_FLAG, False):
        # a second install would wrap wrappers, or (after a merge) add the LoRA twice
        raise ValueError("S3Diff LoRA is already installed in this model; build a fresh base model")
    if check:
        validate_part(part, model)
    reference = next(model.parameters())
    with torch.no_grad():
        for key, tensor in part.full_weights.items():
            model.get_parameter(key).copy_(tensor)

    modulation = DegradationModulation.from_part(part).to(device=reference.device, dtype=reference.dtype)
    controller = ModulationController(modulation, part.scaling)
    block_index = BLOCK_INDEX[part.kind]
    for name in select_lora_targets(model, part.target_modules):
        base_layer = model.get_submodule(name)
        wrapper_type = ModulatedLoRALinear if isinstance(base_layer, nn.Linear) else ModulatedLoRAConv2d
        wrapper = wrapper_type(base_layer, part.rank, block_index(name), controller)
        lora_a, lora_b = part.lora_weights(name)
        with torch.no_grad():
            wrapper.lora_A.weight.copy_(lora_a)
            wrapper.lora_B.weight.copy_(lora_b)
        wrapper.to(device=reference.device, dtype=reference.dtype)
        _replace_submodule(model, name, wrapper)
        controller.layers[name] = wrapper
    setattr(model, _INSTALLED_FLAG, True)
    return controller


@torch.no_grad()
def merge_fixed_degradation(model: nn.Module, controller: ModulationController, scores: torch.Tensor) -> None:
    """Fold the LoRA for one degradation (scores (1, 2)) into the base weights and unwrap every layer.

    Afterwards ``model`` is a plain diffusers model, as fast as one without LoRA; the controller
    keeps its modulation network but no longer drives any layer.
    """
    if scores.dim() != 2 or scores.shape[0] != 1:
        raise ValueError(f"merging needs the scores of one image, shape (1, 2); got {tuple(scores.shape)}")
    modulation = controller.modulation
    matrices = modulation(scores.to(modulation.w.device, modulation.w.dtype))[0] * controller.scaling
    for name, wrapper in controller.layers.items():
        base_layer = wrapper.base_layer
        # float64 so the merged weight differs from the unmerged path by rounding of the result only
        delta = wrapper.delta_weight(matrices[wrapper.block_index].double())
        base_layer.weight.add_(delta.to(base_layer.weight.dtype))
        _replace_submodule(model, name, base_layer)
    controller.layers.clear()
    controller.clear()


def _replace_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, module)
