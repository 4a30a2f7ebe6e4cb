"""S3Diff (degradation-guided one-step SR on SD-Turbo): checkpoint, estimator, LoRA, reference.

The reference pipeline (``reference.S3DiffReference``) is imported from its module
directly; it pulls in the base-model and processing code.
"""

from .checkpoint import LoRAPart, S3DiffCheckpoint, load_s3diff_checkpoint, validate
from .degradation import DEResNet, load_de_net
from .demo import write_demo_checkpoints
from .lora import (
    DegradationModulation,
    ModulatedLoRAConv2d,
    ModulatedLoRALinear,
    ModulationController,
    install_modulated_lora,
    merge_fixed_degradation,
    select_lora_targets,
    unet_block_index,
    vae_block_index,
)

__all__ = [
    "DEResNet",
    "DegradationModulation",
    "LoRAPart",
    "ModulatedLoRAConv2d",
    "ModulatedLoRALinear",
    "ModulationController",
    "S3DiffCheckpoint",
    "install_modulated_lora",
    "load_de_net",
    "load_s3diff_checkpoint",
    "merge_fixed_degradation",
    "select_lora_targets",
    "unet_block_index",
    "validate",
    "vae_block_index",
    "write_demo_checkpoints",
]
