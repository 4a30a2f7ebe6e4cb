"""S3Diff's ``s3diff.pkl``: reading it, and checking it against the base UNet and VAE.

The file is a ``torch.save`` dict with exactly the keys of ``CHECKPOINT_KEYS``
(UPSTREAM.md, S3Diff). :class:`S3DiffCheckpoint` mirrors that dict one field per
key; :attr:`S3DiffCheckpoint.unet` / :attr:`S3DiffCheckpoint.vae` regroup it into
the per-model :class:`LoRAPart` that the LoRA code consumes. Structure that can
be checked without a model (keys, types, ranks against tensor shapes, MLP and
embedding shapes) is checked on load; :func:`validate` adds the checks against
the base model's modules.
"""

from __future__ import annotations

import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ...errors import UserError
from ..configs import PEFT_DEFAULT_LORA_ALPHA
from ..lora import lora_shapes

CHECKPOINT_KEYS = (
    "unet_lora_target_modules",
    "vae_lora_target_modules",
    "rank_unet",
    "rank_vae",
    "state_dict_unet",
    "state_dict_vae",
    "state_dict_vae_de_mlp",
    "state_dict_unet_de_mlp",
    "state_dict_vae_block_mlp",
    "state_dict_unet_block_mlp",
    "state_dict_vae_fuse_mlp",
    "state_dict_unet_fuse_mlp",
    "w",
    "state_embeddings",
)

# PEFT adapter names upstream used when it saved the LoRA tensors.
UNET_ADAPTER = "default"
VAE_ADAPTER = "vae_skip"

# Widths of the degradation-modulation MLPs (fixed upstream).
NUM_FREQUENCIES = 64  # len(w); the Fourier embedding is 4x this (sin, cos of two scores)
DEGRADATION_EMBED_DIM = 256  # de_mlp: Linear(4 * 64, 256)
BLOCK_EMBED_DIM = 64  # block embeddings and block_mlp: Linear(64, 64)
UNET_NUM_BLOCKS = 10  # down 0-3, mid 4, up 5-8, everything else 9
VAE_NUM_BLOCKS = 6  # encoder down 0-3, mid 4, everything else 5

# Parameters fully fine-tuned upstream and stored beside the UNet LoRA tensors.
UNET_FULL_WEIGHTS = ("conv_in.weight", "conv_in.bias")

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])\.(?P<adapter>[^.]+)\.weight$")


def load_torch_file(path: str | Path, what: str) -> Any:
    """``torch.load`` on CPU, restricted to tensors and containers where the file allows it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file (expected the {what})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # holds objects the restricted unpickler refuses (or is not a pickle): try in full below
    except Exception as error:  # truncated zip, wrong format...
        raise UserError(f"{path}: cannot read the {what}: {_first_line(error)}") from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise UserError(f"{path}: cannot read the {what}: {_first_line(error)}") from None
    warnings.warn(f"{path}: loaded with full unpickling (it holds more than tensors); only load files you trust")
    return loaded


@dataclass(frozen=True)
class LoRAPart:
    """Everything the checkpoint holds for one model (UNet or VAE encoder)."""

    kind: Literal["unet", "vae"]
    target_modules: list[str] | str  # PEFT rule: list = name or ".name" suffix, str = regex fullmatch
    rank: int
    adapter: str
    lora_tensors: dict[str, torch.Tensor]  # "<module>.lora_A.<adapter>.weight" / "...lora_B..."
    full_weights: dict[str, torch.Tensor]  # plain parameters that replace the base ones (UNet conv_in)
    de_mlp: dict[str, torch.Tensor]  # Sequential(Linear(256, 256)) keys "0.weight", "0.bias"
    block_mlp: dict[str, torch.Tensor]  # Sequential(Linear(64, 64))
    fuse_mlp: dict[str, torch.Tensor]  # Linear(320, rank * rank) keys "weight", "bias"
    block_embedding: torch.Tensor  # (num_blocks, 64)
    fourier_frequencies: torch.Tensor  # w, (64,), shared by both parts

    @property
    def scaling(self) -> float:
        # No alpha is stored: PEFT's default alpha over the rank (0.25 UNet, 0.5 VAE).
        return PEFT_DEFAULT_LORA_ALPHA / self.rank

    @property
    def num_blocks(self) -> int:
        return self.block_embedding.shape[0]

    @property
    def model_name(self) -> str:
        return "UNet" if self.kind == "unet" else "VAE"

    @property
    def state_dict_key(self) -> str:
        return f"state_dict_{self.kind}"

    def lora_weights(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) weights of one wrapped module."""
        prefix = f"{module}.lora_"
        suffix = f".{self.adapter}.weight"
        return self.lora_tensors[f"{prefix}A{suffix}"], self.lora_tensors[f"{prefix}B{suffix}"]

    def lora_modules(self) -> list[str]:
        """Names of the modules that carry LoRA tensors, in checkpoint order."""
        modules = (_LORA_KEY.match(key)["module"] for key in self.lora_tensors)
        return list(dict.fromkeys(modules))


@dataclass
class S3DiffCheckpoint:
    """``s3diff.pkl``, one field per key of the upstream dict."""

    unet_lora_target_modules: list[str]
    vae_lora_target_modules: str
    rank_unet: int
    rank_vae: int
    state_dict_unet: dict[str, torch.Tensor]
    state_dict_vae: dict[str, torch.Tensor]
    state_dict_vae_de_mlp: dict[str, torch.Tensor]
    state_dict_unet_de_mlp: dict[str, torch.Tensor]
    state_dict_vae_block_mlp: dict[str, torch.Tensor]
    state_dict_unet_block_mlp: dict[str, torch.Tensor]
    state_dict_vae_fuse_mlp: dict[str, torch.Tensor]
    state_dict_unet_fuse_mlp: dict[str, torch.Tensor]
    w: torch.Tensor
    state_embeddings: dict[str, dict[str, torch.Tensor]]
    source: str = field(default="s3diff.pkl", compare=False)  # where it came from, for messages

    @classmethod
    def from_dict(cls, content: Any, source: str = "s3diff.pkl") -> S3DiffCheckpoint:
        """Check the structure of a loaded ``s3diff.pkl`` dict and wrap it."""
        _check_structure(content, source)
        fields = {key: content[key] for key in CHECKPOINT_KEYS}
        fields["w"] = fields["w"].detach()  # saved as an nn.Parameter upstream
        fields["state_embeddings"] = {name: dict(sd) for name, sd in fields["state_embeddings"].items()}
        return cls(**fields, source=source)

    def to_dict(self) -> dict[str, Any]:
        """The upstream dict (what ``torch.save`` writes)."""
        return {key: getattr(self, key) for key in CHECKPOINT_KEYS}

    @property
    def unet(self) -> LoRAPart:
        return self._part("unet")

    @property
    def vae(self) -> LoRAPart:
        return self._part("vae")

    def _part(self, kind: Literal["unet", "vae"]) -> LoRAPart:
        state_dict = getattr(self, f"state_dict_{kind}")
        return LoRAPart(
            kind=kind,
            target_modules=getattr(self, f"{kind}_lora_target_modules"),
            rank=getattr(self, f"rank_{kind}"),
            adapter=UNET_ADAPTER if kind == "unet" else VAE_ADAPTER,
            lora_tensors={k: v for k, v in state_dict.items() if _LORA_KEY.match(k)},
            full_weights={k: v for k, v in state_dict.items() if not _LORA_KEY.match(k)},
            de_mlp=getattr(self, f"state_dict_{kind}_de_mlp"),
            block_mlp=getattr(self, f"state_dict_{kind}_block_mlp"),
            fuse_mlp=getattr(self, f"state_dict_{kind}_fuse_mlp"),
            block_embedding=self.state_embeddings[f"state_dict_{kind}_block"]["weight"],
            fourier_frequencies=self.w,
        )


def load_s3diff_checkpoint(path: str | Path) -> S3DiffCheckpoint:
    """Read ``s3diff.pkl`` (tensors go to CPU) and check its structure."""
    content = load_torch_file(path, "S3Diff checkpoint (s3diff.pkl)")
    return S3DiffCheckpoint.from_dict(content, source=str(path))


def validate(ckpt: S3DiffCheckpoint, unet: nn.Module, vae: nn.Module) -> None:
    """Check the checkpoint against the (unwrapped) base UNet and VAE; raise a one-line UserError."""
    validate_part(ckpt.unet, unet, ckpt.source)
    validate_part(ckpt.vae, vae, ckpt.source)


def validate_part(part: LoRAPart, model: nn.Module, source: str = "s3diff.pkl") -> None:
    """LoRA modules = the target rule's modules; A/B shapes fit each base layer; full weights fit."""
    from .lora import select_lora_targets  # lora.py only needs this module for types

    where = f"{source}: {part.state_dict_key}"
    modules = dict(model.named_modules())
    targets = select_lora_targets(model, part.target_modules)
    target_set = set(targets)
    for name in part.lora_modules():
        if name not in modules:
            raise UserError(
                f"{where} has LoRA tensors for {name!r}, a module the base {part.model_name} does not have"
            )
        if name not in target_set:
            raise UserError(
                f"{where} has LoRA tensors for {name!r}, which {part.kind}_lora_target_modules does not select"
            )
        _check_lora_shapes(part, name, modules[name], where)
    covered = set(part.lora_modules())
    uncovered = [name for name in targets if name not in covered]
    if uncovered:
        raise UserError(
            f"{where} has no LoRA tensors for target module {uncovered[0]!r}"
            + (f" (+{len(uncovered) - 1} more)" if len(uncovered) > 1 else "")
        )

    base_state = model.state_dict()
    if part.kind == "unet":
        for key in UNET_FULL_WEIGHTS:
            if key not in part.full_weights:
                raise UserError(f"{where} lacks {key!r} (the fine-tuned UNet input conv)")
    for key, tensor in part.full_weights.items():
        if key not in base_state:
            raise UserError(
                f"{where} has unexpected key {key!r}: neither a LoRA tensor nor a base {part.model_name} parameter"
            )
        if tuple(tensor.shape) != tuple(base_state[key].shape):
            raise UserError(
                f"{where}[{key!r}] has shape {tuple(tensor.shape)}, expected {tuple(base_state[key].shape)} "
                f"as in the base {part.model_name}"
            )


def _check_lora_shapes(part: LoRAPart, name: str, layer: nn.Module, where: str) -> None:
    a, b = part.lora_weights(name)
    r = part.rank
    shapes = lora_shapes(layer, r)
    if shapes is None:
        raise UserError(f"{where}: {name!r} is a {type(layer).__name__}; S3Diff LoRA wraps only Linear and Conv2d")
    expected_a, expected_b = shapes
    for side, tensor, expected in (("A", a, expected_a), ("B", b, expected_b)):
        if tuple(tensor.shape) != expected:
            raise UserError(
                f"{where}[{name}.lora_{side}.{part.adapter}.weight] has shape {tuple(tensor.shape)}, "
                f"expected {expected} for the base {type(layer).__name__} at rank {r}"
            )


# --- structure checks (no model needed) ---------------------------------------------------------


def _check_structure(content: Any, source: str) -> None:
    if not isinstance(content, dict):
        raise UserError(f"{source}: expected the S3Diff checkpoint dict, found {type(content).__name__}")
    missing = [k for k in CHECKPOINT_KEYS if k not in content]
    if missing:
        raise UserError(f"{source}: missing key(s) {', '.join(map(repr, missing))} (not an S3Diff s3diff.pkl?)")
    extra = [k for k in content if k not in CHECKPOINT_KEYS]
    if extra:
        raise UserError(f"{source}: unexpected key(s) {', '.join(map(repr, extra[:5]))} (not an S3Diff s3diff.pkl?)")

    targets = content["unet_lora_target_modules"]
    if not (isinstance(targets, (list, tuple)) and targets and all(isinstance(t, str) for t in targets)):
        raise UserError(f"{source}: unet_lora_target_modules should be a list of module names")
    pattern = content["vae_lora_target_modules"]
    if not isinstance(pattern, str):
        raise UserError(f"{source}: vae_lora_target_modules should be a regex string")
    try:
        re.compile(pattern)
    except re.error as error:
        raise UserError(f"{source}: vae_lora_target_modules is not a valid regex: {error}") from None

    for kind, adapter, num_blocks in (("unet", UNET_ADAPTER, UNET_NUM_BLOCKS), ("vae", VAE_ADAPTER, VAE_NUM_BLOCKS)):
        rank = content[f"rank_{kind}"]
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            raise UserError(f"{source}: rank_{kind} should be a positive int, found {rank!r}")
        for suffix in ("", "_de_mlp", "_block_mlp", "_fuse_mlp"):
            key = f"state_dict_{kind}{suffix}"
            _check_tensor_dict(content[key], f"{source}: {key}")
        _check_lora_tensors(content[f"state_dict_{kind}"], rank, adapter, kind, source)
        _check_mlp(content, f"state_dict_{kind}_de_mlp", "0.", (DEGRADATION_EMBED_DIM, 4 * NUM_FREQUENCIES), source)
        _check_mlp(content, f"state_dict_{kind}_block_mlp", "0.", (BLOCK_EMBED_DIM, BLOCK_EMBED_DIM), source)
        _check_mlp(
            content, f"state_dict_{kind}_fuse_mlp", "", (rank * rank, DEGRADATION_EMBED_DIM + BLOCK_EMBED_DIM), source,
            why=f" (rank_{kind}={rank}, so rank*rank outputs)",
        )

    w = content["w"]
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != (NUM_FREQUENCIES,):
        found = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise UserError(f"{source}: w should be a tensor of shape ({NUM_FREQUENCIES},), found {found}")

    embeddings = content["state_embeddings"]
    if not isinstance(embeddings, dict):
        raise UserError(f"{source}: state_embeddings should be a dict")
    for name, num_blocks in (("state_dict_vae_block", VAE_NUM_BLOCKS), ("state_dict_unet_block", UNET_NUM_BLOCKS)):
        entry = embeddings.get(name)
        weight = entry.get("weight") if isinstance(entry, dict) else None
        expected = (num_blocks, BLOCK_EMBED_DIM)
        if not isinstance(weight, torch.Tensor):
            raise UserError(
                f"{source}: state_embeddings[{name!r}]['weight'] is missing (expected a {expected} tensor)"
            )
        if tuple(weight.shape) != expected:
            raise UserError(
                f"{source}: state_embeddings[{name!r}]['weight'] has shape {tuple(weight.shape)}, expected {expected}"
            )


def _check_tensor_dict(value: Any, where: str) -> None:
    is_tensor_dict = isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()
    )
    if not is_tensor_dict:
        raise UserError(f"{where} should be a dict of name -> tensor")


def _check_lora_tensors(state_dict: dict[str, torch.Tensor], rank: int, adapter: str, kind: str, source: str) -> None:
    where = f"{source}: state_dict_{kind}"
    sides: dict[str, set[str]] = {}
    for key, tensor in state_dict.items():
        match = _LORA_KEY.match(key)
        if match is None:
            if "lora" in key:
                raise UserError(
                    f"{where} has unexpected key {key!r} (expected <module>.lora_A|lora_B.{adapter}.weight)"
                )
            continue  # a fully fine-tuned base parameter; checked against the model in validate()
        if match["adapter"] != adapter:
            raise UserError(f"{where}[{key!r}] uses adapter {match['adapter']!r}, expected {adapter!r}")
        side = match["side"]
        sides.setdefault(match["module"], set()).add(side)
        if tensor.ndim not in (2, 4):
            raise UserError(f"{where}[{key!r}] has shape {tuple(tensor.shape)}: expected a Linear or Conv2d weight")
        tensor_rank = tensor.shape[0] if side == "A" else tensor.shape[1]
        if tensor_rank != rank:
            raise UserError(
                f"{where}[{key!r}] has rank {tensor_rank} (shape {tuple(tensor.shape)}) but rank_{kind} is {rank}"
            )
    for module, present in sides.items():
        if present != {"A", "B"}:
            lacking = ({"A", "B"} - present).pop()
            raise UserError(f"{where} lacks {module}.lora_{lacking}.{adapter}.weight (has only lora_{present.pop()})")
    if not sides:
        raise UserError(f"{where} holds no LoRA tensors")


def _check_mlp(
    content: dict, key: str, prefix: str, weight_shape: tuple[int, int], source: str, why: str = ""
) -> None:
    state_dict = content[key]
    expected = {f"{prefix}weight": weight_shape, f"{prefix}bias": (weight_shape[0],)}
    if set(state_dict) != set(expected):
        raise UserError(f"{source}: {key} has keys {sorted(state_dict)}, expected {sorted(expected)}")
    for name, shape in expected.items():
        if tuple(state_dict[name].shape) != shape:
            found = tuple(state_dict[name].shape)
            raise UserError(f"{source}: {key}[{name!r}] has shape {found}, expected {shape}{why}")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:200]
