"""PiSA-SR's checkpoint (``pisa_sr.pkl``): loading, validation, LoRA deltas.

Format (UPSTREAM.md): a ``torch.save`` dict of exactly nine keys; two LoRA
branches (pix, sem), each split into encoder/decoder/others adapters, applied
to the UNet only; no alpha stored, so scaling is PEFT's default 8 / rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from .configs import PEFT_DEFAULT_LORA_ALPHA
from .lora import lora_delta, lora_pairs, lora_shapes

BRANCHES = ("pix", "sem")
PARTS = ("encoder", "decoder", "others")
CHECKPOINT_KEYS = frozenset(
    [f"unet_lora_{part}_modules_{branch}" for branch in BRANCHES for part in PARTS]
    + [f"lora_rank_unet_{branch}" for branch in BRANCHES]
    + ["state_dict_unet"]
)
# Substrings that select LoRA targets (UPSTREAM.md "Module selection rule").
TARGET_SUBSTRINGS = (
    "to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in",
    "conv_shortcut", "conv_out", "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj",
)


def select_lora_modules(unet: nn.Module) -> dict[str, list[str]]:
    """Upstream's rule: which UNet modules get LoRA, split encoder/decoder/others."""
    split = {part: [] for part in PARTS}
    for name, _ in unet.named_parameters():
        if "bias" in name or "norm" in name or not any(s in name for s in TARGET_SUBSTRINGS):
            continue
        module = name[: -len(".weight")]
        if "down_blocks" in module or "conv_in" in module:
            split["encoder"].append(module)
        elif "up_blocks" in module or "conv_out" in module:
            split["decoder"].append(module)
        else:
            split["others"].append(module)
    return split


@dataclass
class PisaCheckpoint:
    modules: dict[str, dict[str, list[str]]]  # branch -> part -> module names
    ranks: dict[str, int]  # branch -> rank
    state_dict: dict[str, torch.Tensor]
    path: Path | None = None

    def scaling(self, branch: str) -> float:
        return PEFT_DEFAULT_LORA_ALPHA / self.ranks[branch]

    def pairs(self, branch: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """All (A, B) pairs of one branch, across its three adapters."""
        out = {}
        for part in PARTS:
            out.update(lora_pairs(self.state_dict, f"default_{part}_{branch}"))
        return out

    def to_dict(self) -> dict:
        """The upstream on-disk dict."""
        d = {f"unet_lora_{p}_modules_{b}": list(self.modules[b][p]) for b in BRANCHES for p in PARTS}
        d.update({f"lora_rank_unet_{b}": self.ranks[b] for b in BRANCHES})
        d["state_dict_unet"] = self.state_dict
        return d


def load_pisa_checkpoint(path: str | Path) -> PisaCheckpoint:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass --checkpoint PATH/TO/pisa_sr.pkl")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt pickles
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read checkpoint {path} ({reason}); pass the pisa_sr.pkl released by PiSA-SR") from None
    return parse_pisa_checkpoint(raw, path)


def parse_pisa_checkpoint(raw: object, path: Path | None = None) -> PisaCheckpoint:
    where = str(path) if path else "checkpoint"
    if not isinstance(raw, dict):
        raise UserError(f"{where} holds a {type(raw).__name__}, not PiSA-SR's dict of 9 keys; pass pisa_sr.pkl")
    missing = sorted(CHECKPOINT_KEYS - raw.keys())
    extra = sorted(set(raw) - CHECKPOINT_KEYS)
    if missing or extra:
        parts = []
        if missing:
            parts.append("missing keys " + ", ".join(missing))
        if extra:
            parts.append("unexpected keys " + ", ".join(map(str, extra[:5])) + (" ..." if len(extra) > 5 else ""))
        raise UserError(f"{where} is not a PiSA-SR checkpoint: {'; '.join(parts)}")
    for key in sorted(CHECKPOINT_KEYS):
        if "_modules_" in key:
            value = raw[key]
            if not isinstance(value, (list, tuple)) or not all(isinstance(m, str) for m in value):
                raise UserError(f"{where}: {key} must be a list of UNet module names, got {type(value).__name__}")
    for branch in BRANCHES:
        rank = raw[f"lora_rank_unet_{branch}"]
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise UserError(f"{where}: lora_rank_unet_{branch} must be a positive int, got {rank!r}")
    state_dict = raw["state_dict_unet"]
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise UserError(f"{where}: state_dict_unet must be a dict of tensors")
    ckpt = PisaCheckpoint(
        modules={b: {p: list(raw[f"unet_lora_{p}_modules_{b}"]) for p in PARTS} for b in BRANCHES},
        ranks={b: raw[f"lora_rank_unet_{b}"] for b in BRANCHES},
        state_dict={k: v.float() for k, v in state_dict.items()},
        path=path,
    )
    _check_lists_match_tensors(ckpt, where)
    return ckpt


def _check_lists_match_tensors(ckpt: PisaCheckpoint, where: str) -> None:
    for branch in BRANCHES:
        for part in PARTS:
            adapter = f"default_{part}_{branch}"
            listed = set(ckpt.modules[branch][part])
            have = {k[: -len(f".lora_A.{adapter}.weight")] for k in ckpt.state_dict if k.endswith(f".lora_A.{adapter}.weight")}
            if listed != have:
                diff = sorted(listed ^ have)
                raise UserError(
                    f"{where}: unet_lora_{part}_modules_{branch} and the {adapter} tensors disagree "
                    f"on {len(diff)} modules (e.g. {diff[0]})"
                )
            for module in listed:
                if module + f".lora_B.{adapter}.weight" not in ckpt.state_dict:
                    raise UserError(f"{where}: {module} has lora_A but no lora_B for adapter {adapter}")
    expected = {f"{m}.lora_{ab}.default_{part}_{branch}.weight"
                for branch in BRANCHES for part in PARTS for m in ckpt.modules[branch][part] for ab in "AB"}
    stray = sorted(set(ckpt.state_dict) - expected)
    if stray:
        raise UserError(f"{where}: state_dict_unet holds {len(stray)} tensors that belong to no listed LoRA module "
                        f"(e.g. {stray[0]}); PiSA-SR stores only LoRA pairs")


def validate_against_unet(ckpt: PisaCheckpoint, unet: nn.Module) -> None:
    """Every LoRA pair names a UNet module and fits its shape and the stated rank."""
    where = str(ckpt.path) if ckpt.path else "checkpoint"
    modules = dict(unet.named_modules())
    for branch in BRANCHES:
        rank = ckpt.ranks[branch]
        for module, (a, b) in ckpt.pairs(branch).items():
            base = modules.get(module)
            if base is None:
                raise UserError(f"{where}: LoRA module {module} does not exist in the base UNet; is --base SD 2.1-base?")
            shapes = lora_shapes(base, rank)
            if shapes is None:
                raise UserError(f"{where}: LoRA on {module} ({type(base).__name__}) is not a Linear or Conv2d")
            want_a, want_b = shapes
            if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
                raise UserError(
                    f"{where}: {module} ({branch}) LoRA shapes A{tuple(a.shape)} B{tuple(b.shape)} do not fit "
                    f"rank {rank} on the base layer (expected A{want_a} B{want_b}); wrong base model or rank"
                )


def branch_deltas(ckpt: PisaCheckpoint, unet: nn.Module, branch: str) -> dict[str, torch.Tensor]:
    """dW for every module of one branch (scaling included)."""
    modules = dict(unet.named_modules())
    scaling = ckpt.scaling(branch)
    return {m: lora_delta(modules[m], a, b, scaling) for m, (a, b) in ckpt.pairs(branch).items()}


def make_demo_checkpoint(unet: nn.Module, rank: int = 4, seed: int = 0, std: float = 0.05) -> PisaCheckpoint:
    """A seeded checkpoint in the exact upstream layout, with non-zero A and B."""
    g = torch.Generator().manual_seed(seed)
    modules = dict(unet.named_modules())
    selected = select_lora_modules(unet)
    state_dict = {}
    for branch in BRANCHES:
        for part in PARTS:
            adapter = f"default_{part}_{branch}"
            for name in selected[part]:
                base = modules[name]
                if isinstance(base, nn.Linear):
                    a_shape, b_shape = (rank, base.in_features), (base.out_features, rank)
                    fan_in = base.in_features
                else:
                    a_shape = (rank, base.in_channels, *base.kernel_size)
                    b_shape = (base.out_channels, rank, 1, 1)
                    fan_in = base.in_channels * base.kernel_size[0] * base.kernel_size[1]
                state_dict[f"{name}.lora_A.{adapter}.weight"] = torch.randn(a_shape, generator=g) / fan_in**0.5
                state_dict[f"{name}.lora_B.{adapter}.weight"] = torch.randn(b_shape, generator=g) * std
    return PisaCheckpoint(
        modules={b: {p: list(selected[p]) for p in PARTS} for b in BRANCHES},
        ranks={b: rank for b in BRANCHES},
        state_dict=state_dict,
    )


def save_checkpoint(ckpt: PisaCheckpoint, path: str | Path) -> Path:
    path = Path(path)
    torch.save(ckpt.to_dict(), path)
    return path
