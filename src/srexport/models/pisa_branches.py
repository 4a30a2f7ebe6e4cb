"""PiSA-SR's two LoRA sets kept as branches, mixed per sample: the adjustable UNet.

Every LoRA target layer computes

    y = W0 x + a * s_pix B_pix A_pix x + b * s_sem B_sem A_sem x

with the checkpoint's pairs (s = 8 / rank, PEFT's scaling) and (a, b) read per
sample from the graph input ``lora_scales`` (batch, 2). The two pairs are
stacked into one rank r_pix + r_sem branch, ``B (c * A x)`` with c the vector
of a (r_pix times) then b (r_sem times), so a layer costs one low-rank pair
more than its base, not two. At (a, b) = (1, 0) the layer is W_pix = W0 +
dW_pix, at (1, 1) W_sem = W0 + dW_pix + dW_sem, at (1, t) W0 + dW_pix + t dW_sem:
the merged and exact weights of every scale, to float rounding (a delta is
linear in its coefficient).

Names the conversions read (calibration/): the multiply by c runs in a
``lora_mix`` submodule, kept fp32 in fp16 and int8 graphs so the
coefficients are not rounded to fp16; the up-projection is ``lora_up``, kept
out of int8, because its input scales with the per-call coefficients, a range
no calibration set bounds.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .components import EpsilonDenoiser

# node names of the coefficient multiplies (torch.onnx scopes): fp32 in converted graphs
_MIX_NODE = re.compile(r"/lora_mix/")


class Coefficients:
    """The current per-sample (a, b) every branched layer reads, set once per forward. Not an
    nn.Module: the layers point at it without owning it."""

    def __init__(self):
        self.value: torch.Tensor | None = None

    def get(self) -> torch.Tensor:
        if self.value is None:
            raise RuntimeError("no lora_scales set: run the adjustable UNet through AdjustableDenoiser")
        return self.value


class LoraMix(nn.Module):
    """(batch, R, ...) low-rank activations times the per-sample coefficient vector c (batch, R)."""

    def __init__(self, ranks: tuple[int, int], coefficients: Coefficients):
        super().__init__()
        self.register_buffer("expand", torch.cat([torch.eye(2)[i].repeat(r, 1) for i, r in enumerate(ranks)]).T,
                             persistent=False)  # (2, R): [a, b] @ expand = c
        self.coefficients = coefficients
        self.channels_last = False  # Linear layers: rank on the last axis

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        c = self.coefficients.get() @ self.expand  # (batch, R)
        if self.channels_last:
            return t * c.reshape(c.shape[0], *([1] * (t.dim() - 2)), c.shape[1])
        return t * c.reshape(*c.shape, *([1] * (t.dim() - 2)))


def _projections(base: nn.Module, rank: int) -> tuple[nn.Module, nn.Module]:
    """The (down, up) pair of a rank-``rank`` branch on ``base``: a Linear's are Linears; a conv's
    down-projection sees the base conv's receptive field and its up-projection is 1x1."""
    if isinstance(base, nn.Linear):
        return nn.Linear(base.in_features, rank, bias=False), nn.Linear(rank, base.out_features, bias=False)
    return (nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False),
            nn.Conv2d(rank, base.out_channels, 1, bias=False))


class BranchedLayer(nn.Module):
    """A Linear or Conv2d plus its LoRA branch: base(x) + up(c * down(x))."""

    def __init__(self, base: nn.Module, a: torch.Tensor, b: torch.Tensor, mix: LoraMix):
        super().__init__()
        self.base_layer = base
        self.lora_down, self.lora_up = _projections(base, a.shape[0])
        self.lora_mix = mix
        mix.channels_last = isinstance(base, nn.Linear)  # a Linear's rank axis is the last
        with torch.no_grad():
            self.lora_down.weight.copy_(a)
            self.lora_up.weight.copy_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_up(self.lora_mix(self.lora_down(x)))


def install_branches(unet: nn.Module, ckpt, branches: tuple[str, ...] = ("pix", "sem")) -> Coefficients:
    """Wrap every LoRA target of ``unet`` (in place) in a branched layer with the checkpoint's pairs
    of ``branches`` (the others' coefficient multiplies nothing: their deltas are the caller's to
    merge), scaling folded into the up-projection; returns the coefficients holder."""
    coefficients = Coefficients()
    pairs = {branch: ckpt.pairs(branch) for branch in ("pix", "sem")}
    if pairs["pix"].keys() != pairs["sem"].keys():  # upstream's rule selects the same modules for both
        only = sorted(pairs["pix"].keys() ^ pairs["sem"].keys())
        raise ValueError(f"the pix and sem LoRA sets cover different modules (e.g. {only[0]})")
    ranks = tuple(ckpt.ranks[b] if b in branches else 0 for b in ("pix", "sem"))
    for name in pairs["pix"]:
        base = unet.get_submodule(name)
        a = torch.cat([pairs[b][name][0] for b in branches]).to(base.weight.dtype)
        b = torch.cat([pairs[br][name][1] * ckpt.scaling(br) for br in branches], dim=1).to(base.weight.dtype)
        mix = LoraMix(ranks, coefficients)
        wrapper = BranchedLayer(base, a, b, mix)
        parent_name, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent_name) if parent_name else unet, child, wrapper.to(base.weight.device))
    return coefficients


class AdjustableDenoiser(EpsilonDenoiser):
    """(latent, lora_scales) -> latent - eps, every branched layer mixing its LoRA sets with
    each sample's (a, b)."""

    def __init__(self, unet: nn.Module, coefficients: Coefficients, prompt_embeds: torch.Tensor, timestep: float):
        super().__init__(unet, prompt_embeds, timestep)
        self.coefficients = coefficients

    def forward(self, latent: torch.Tensor, lora_scales: torch.Tensor) -> torch.Tensor:
        if lora_scales.shape != (latent.shape[0], 2):
            raise ValueError(f"lora_scales should be ({latent.shape[0]}, 2), got {tuple(lora_scales.shape)}")
        self.coefficients.value = lora_scales.to(latent.dtype)
        try:
            return latent - self.epsilon(latent)
        finally:
            self.coefficients.value = None  # no stale (or traced) coefficients outlive the call


def coefficient_nodes(model) -> list[str]:
    """Names of an exported adjustable UNet's (an onnx.ModelProto) coefficient multiplies:
    they stay fp32 in fp16 and int8 graphs (module docstring)."""
    return [n.name for n in model.graph.node if _MIX_NODE.search(n.name)]
