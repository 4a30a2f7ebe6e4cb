"""LoRA maths shared by both models: deltas from (A, B) pairs and merging them.

Linear: A is (r, in), B is (out, r); dW = scaling * B @ A.
Conv:   A is a conv (in -> r) with the base layer's kernel, stride and padding;
        B is a 1x1 conv (r -> out); dW[o,i,:,:] = scaling * sum_r B[o,r] A[r,i,:,:].
"""

from __future__ import annotations

import torch
from torch import nn


def lora_delta(base: nn.Module, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The weight delta of one LoRA pair, shaped like ``base.weight``."""
    a, b = a.double(), b.double()
    if isinstance(base, nn.Linear):
        delta = b @ a
    elif isinstance(base, nn.Conv2d):
        delta = torch.einsum("or,rikl->oikl", b.flatten(1), a)
    else:
        raise TypeError(f"LoRA on {type(base).__name__} is not supported")
    return (scaling * delta).to(base.weight.dtype)


def lora_shapes(base: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The (A, B) shapes a rank-``rank`` LoRA pair must have on ``base``; None if LoRA can't wrap it."""
    if isinstance(base, nn.Linear):
        return (rank, base.in_features), (base.out_features, rank)
    if isinstance(base, nn.Conv2d):
        return (rank, base.in_channels, *base.kernel_size), (base.out_channels, rank, 1, 1)
    return None


def lora_pairs(state_dict: dict[str, torch.Tensor], adapter: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``<module>.lora_A.<adapter>.weight`` / ``lora_B`` keys -> {module: (A, B)}."""
    a_suffix, b_suffix = f".lora_A.{adapter}.weight", f".lora_B.{adapter}.weight"
    pairs = {}
    for key, a in state_dict.items():
        if key.endswith(a_suffix):
            module = key[: -len(a_suffix)]
            pairs[module] = (a, state_dict[module + b_suffix])
    return pairs


@torch.no_grad()
def add_deltas(model: nn.Module, deltas: dict[str, torch.Tensor], weight: float = 1.0) -> None:
    """W <- W + weight * dW for every named module, in place."""
    modules = dict(model.named_modules())
    for name, delta in deltas.items():
        modules[name].weight.add_(delta, alpha=weight)
