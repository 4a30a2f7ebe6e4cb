"""Architectures as data: Stable Diffusion 2.1's, and the shrunk demo copy of it.

The demo keeps SD 2.1's block structure exactly (four down blocks, the mid
block and four up blocks of the same types, linear projections in the
transformers, the same 1:2:4:4 width ratios so the same layers get
``conv_shortcut``) and only shrinks widths, heads and the text encoder, so
every code path (module names, LoRA targets, block indices) is the real one.
"""

SD21_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20],
    "use_linear_projection": True,
    "norm_num_groups": 32,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}

SD21_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

SD21_TEXT_ENCODER = {
    "vocab_size": 49408,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 512,
}

# SD 2.1-base / SD-Turbo scheduler (scaled-linear betas 0.00085..0.012, 1000 steps).
SD21_SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}

DEMO_UNET = dict(
    SD21_UNET,
    sample_size=16,
    block_out_channels=[32, 64, 128, 128],
    cross_attention_dim=32,
    attention_head_dim=[2, 4, 8, 8],
    norm_num_groups=8,
)

DEMO_VAE = dict(SD21_VAE, block_out_channels=[16, 32, 64, 64], norm_num_groups=8, sample_size=128)

DEMO_TEXT_ENCODER = dict(
    SD21_TEXT_ENCODER,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    projection_dim=32,
)

# The demo ships a byte-level tokenizer with no merges (every character is a token),
# so its vocabulary is the 256 byte symbols, their word-final forms and two specials.
DEMO_TOKENIZER_VOCAB_SIZE = 2 * 256 + 2

# The trained demo (weights in srexport/assets/demo_pisa, made by tools/train_demo.py):
# the demo VAE and text encoder, and the demo UNet at half its widths (same 1:2:4:4
# ratios, same head size) so the shipped weights stay a few MB.
TRAINED_DEMO_UNET = dict(DEMO_UNET, block_out_channels=[16, 32, 64, 64], attention_head_dim=[1, 2, 4, 4])

ARCHITECTURES = {
    "sd21": {"unet": SD21_UNET, "vae": SD21_VAE, "text_encoder": SD21_TEXT_ENCODER},
    "demo": {"unet": DEMO_UNET, "vae": DEMO_VAE,
             "text_encoder": dict(DEMO_TEXT_ENCODER, vocab_size=DEMO_TOKENIZER_VOCAB_SIZE)},
    "demo_trained": {"unet": TRAINED_DEMO_UNET, "vae": DEMO_VAE,
                     "text_encoder": dict(DEMO_TEXT_ENCODER, vocab_size=DEMO_TOKENIZER_VOCAB_SIZE)},
}

# LoRA scaling when no alpha is stored: PEFT's default lora_alpha=8 over the rank.
PEFT_DEFAULT_LORA_ALPHA = 8

# Latent scaling of the SD VAE (UPSTREAM.md).
VAE_SCALING_FACTOR = 0.18215
