"""S3Diff's degradation estimator (``DEResNet``): LR image -> (blur, noise) scores.

The layout reproduces upstream's so that its released ``de_net.pth`` (a plain
state dict, 80 keys, 2,351,362 parameters) loads with ``strict=True``. Key names
that must hold:

    conv_first.<i>.{weight,bias}                     i = branch (one per degradation)
    body.<i>.<j>.conv1.{weight,bias} / .conv2.*      j = residual block
    body.<i>.<j>.{weight,bias}                       j = a plain (down-scaling) conv
    fc_degree.<i>.0.{weight,bias} / .2.{weight,bias} Linear(C, 512), ReLU, Linear(512, 1), Sigmoid

At the default widths each body is: six residual blocks at 64 channels
(indices 0-5), a 3x3 stride-2 conv 64->128 (index 6), two residual blocks at
128 (indices 7-8).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ...errors import UserError
from .checkpoint import load_torch_file

DEGRADATION_NAMES = ("blur", "noise")


class ResidualBlockNoBN(nn.Module):
    """conv3x3 -> ReLU -> conv3x3, plus the identity (no normalisation)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.relu(self.conv1(x)))


def _branch_body(num_feats: Sequence[int], num_blocks: Sequence[int], downscales: Sequence[int]) -> nn.Sequential:
    """One branch's trunk. Stages change width only through a conv appended after their blocks
    (stride 2 when the stage down-scales), which is what fixes the upstream indices."""
    layers: list[nn.Module] = []
    last = len(num_feats) - 1
    for stage, (width, blocks, downscale) in enumerate(zip(num_feats, num_blocks, downscales)):
        layers.extend(ResidualBlockNoBN(width) for _ in range(blocks))
        next_width = num_feats[min(stage + 1, last)]
        if downscale == 2:
            layers.append(nn.Conv2d(width, next_width, 3, 2, 1))
        elif downscale == 1:
            if stage < last and width != next_width:
                layers.append(nn.Conv2d(width, next_width, 3, 1, 1))
        else:
            raise ValueError(f"downscales must be 1 or 2, got {downscale}")
    return nn.Sequential(*layers)


class DEResNet(nn.Module):
    """Independent ResNet branches, one per degradation, each ending in a sigmoid score.

    Input: the original low-resolution image in [0, 1], any size, not normalised.
    Output: (B, num_degradation) scores in (0, 1); for S3Diff column 0 is blur, 1 is noise.
    """

    def __init__(
        self,
        num_in_ch: int = 3,
        num_degradation: int = 2,
        num_feats: Sequence[int] = (64, 64, 64, 128),
        num_blocks: Sequence[int] = (2, 2, 2, 2),
        downscales: Sequence[int] = (1, 1, 2, 1),
        hidden_features: int = 512,
    ):
        super().__init__()
        if not len(num_feats) == len(num_blocks) == len(downscales):
            raise ValueError("num_feats, num_blocks and downscales need one entry per stage")
        self.num_degradation = num_degradation
        self.conv_first = nn.ModuleList(nn.Conv2d(num_in_ch, num_feats[0], 3, 1, 1) for _ in range(num_degradation))
        self.body = nn.ModuleList(_branch_body(num_feats, num_blocks, downscales) for _ in range(num_degradation))
        self.fc_degree = nn.ModuleList(
            nn.Sequential(
                nn.Linear(num_feats[-1], hidden_features),
                nn.ReLU(),
                nn.Linear(hidden_features, 1),
                nn.Sigmoid(),
            )
            for _ in range(num_degradation)
        )
        self.avg_pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        scores = []
        for conv_first, body, fc_degree in zip(self.conv_first, self.body, self.fc_degree):
            features = self.avg_pool(body(conv_first(image))).flatten(1)
            scores.append(fc_degree(features).squeeze(-1))
        return torch.stack(scores, dim=1)


def load_de_net(path: str | Path) -> DEResNet:
    """Load upstream's ``de_net.pth`` (a plain state dict) into a default-width DEResNet, in eval mode."""
    state_dict = load_torch_file(path, "degradation estimator")
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise UserError(f"{path}: expected a plain state dict of tensors for the degradation estimator (de_net.pth)")
    model = DEResNet()
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_first_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_first_few(unexpected)}")
        raise UserError(f"{path}: not an S3Diff DEResNet state dict: {'; '.join(parts)}")
    for key, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise UserError(
                f"{path}: {key} has shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)} "
                f"(DEResNet at the default widths)"
            )
    model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
    return model.eval()


def _first_few(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown
