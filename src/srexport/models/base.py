"""The Stable Diffusion base model: a local diffusers folder, or a seeded demo.

Real use points at a diffusers folder of SD 2.1-base (PiSA-SR) or SD-Turbo
(S3Diff): ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/`` and ``model_index.json``. Nothing is downloaded. The demo is
the same structure with shrunk widths (``configs.DEMO_*``) and seeded random
weights, written as a real diffusers folder so the same loader reads it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from . import configs

REQUIRED_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class BaseModel:
    unet: "torch.nn.Module"
    vae: "torch.nn.Module"
    text_encoder: "torch.nn.Module"
    tokenizer: object
    scheduler_config: dict
    path: Path | None = None

    def eval(self) -> "BaseModel":
        for m in (self.unet, self.vae, self.text_encoder):
            m.eval().requires_grad_(False)
        return self


def _quiet_hf_logging() -> None:
    # diffusers/transformers log config mismatches at warning level for every
    # load; they are noise for a CLI user.
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        dlog.set_verbosity_error()
        tlog.set_verbosity_error()
        dlog.disable_progress_bar()
        tlog.disable_progress_bar()
    except Exception:  # pragma: no cover - logging helpers moved
        pass


def read_scheduler_config(folder: Path) -> dict:
    path = Path(folder) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise UserError(
            f"{folder} has no scheduler/scheduler_config.json; point --base at a complete diffusers "
            "folder (it needs the scheduler config for the noise schedule)"
        )
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}; restore the file from the original model folder") from None


def validate_base_folder(folder: Path) -> None:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--base {folder} is not a folder; pass a local diffusers folder of Stable Diffusion 2.1")
    missing = [s for s in REQUIRED_SUBFOLDERS if not (folder / s).is_dir()]
    if missing or not (folder / "model_index.json").is_file():
        what = ", ".join(missing + ([] if (folder / "model_index.json").is_file() else ["model_index.json"]))
        raise UserError(
            f"{folder} is not a diffusers Stable Diffusion folder (missing {what}); "
            "pass the folder that holds unet/, vae/, text_encoder/, tokenizer/, scheduler/ and model_index.json"
        )


def load_base(folder: str | Path) -> BaseModel:
    """Load UNet, VAE, text encoder, tokenizer and scheduler config in fp32 on CPU."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    validate_base_folder(folder)
    scheduler_config = read_scheduler_config(folder)
    _quiet_hf_logging()
    try:
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.float32)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32)
        text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=torch.float32)
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    except (OSError, ValueError, EnvironmentError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load the diffusers folder {folder}: {first}; check that its files are complete") from None
    _check_sd21_structure(unet, vae, folder)
    return BaseModel(unet, vae, text_encoder, tokenizer, scheduler_config, folder).eval()


def _check_sd21_structure(unet, vae, folder: Path) -> None:
    expected = configs.SD21_UNET
    if tuple(unet.config.down_block_types) != tuple(expected["down_block_types"]) or tuple(
        unet.config.up_block_types
    ) != tuple(expected["up_block_types"]):
        raise UserError(
            f"{folder}/unet does not have Stable Diffusion 2.1's block structure "
            f"(down {list(unet.config.down_block_types)}); PiSA-SR and S3Diff need an SD 2.1 / SD-Turbo base"
        )
    if unet.config.in_channels != 4 or vae.config.latent_channels != 4:
        raise UserError(f"{folder}: expected 4 latent channels (SD 2.1); got unet in_channels={unet.config.in_channels}")


def build_base(arch: str = "demo", seed: int = 0, device: str | torch.device = "cpu") -> BaseModel:
    """A base model of the named architecture with seeded random weights, in memory.

    ``arch="sd21"`` gives the full-size SD 2.1 shapes (random weights) for
    export and latency work: latency does not depend on the weights.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    _quiet_hf_logging()
    arch_cfg = configs.ARCHITECTURES[arch]
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**arch_cfg["unet"])
        vae = AutoencoderKL(**arch_cfg["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**arch_cfg["text_encoder"]))
    _randomise_zero_inits(unet, seed)
    # SD 2.1's real 49,408-token BPE vocabulary is a download; the byte-level
    # demo tokenizer's ids fit any CLIP vocabulary, so it serves both shapes.
    tokenizer = demo_tokenizer()
    return BaseModel(unet, vae, text_encoder, tokenizer, dict(configs.SD21_SCHEDULER)).eval()


def _randomise_zero_inits(unet, seed: int) -> None:
    """diffusers zero-initialises nothing in SD's UNet, but its conv_out and
    attention outputs start tiny; give every weight visible magnitude so parity
    tests compare signals, not near-zeros."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        w = unet.conv_out.weight
        w.copy_(torch.randn(w.shape, generator=g) * 0.05)


def demo_tokenizer():
    """A byte-level CLIP tokenizer with no merges: every character is one token.

    Written to disk by ``write_demo_base``; it stands in for SD 2.1's
    49,408-token BPE vocabulary, which is a download.
    """
    import tempfile

    from transformers import CLIPTokenizer

    symbols = list(_byte_symbols())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    if len(vocab) != configs.DEMO_TOKENIZER_VOCAB_SIZE:  # the demo text encoder's embedding is sized by it
        raise RuntimeError(f"the demo tokenizer has {len(vocab)} tokens, but configs.DEMO_TOKENIZER_VOCAB_SIZE is "
                           f"{configs.DEMO_TOKENIZER_VOCAB_SIZE}; update one to match the other")
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.json").write_text(json.dumps(vocab))
        (Path(d) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(
            vocab=str(Path(d) / "vocab.json"),
            merges=str(Path(d) / "merges.txt"),
            pad_token="<|endoftext|>",
            model_max_length=77,
        )


def _byte_symbols():
    """GPT-2/CLIP's reversible byte -> printable-unicode map, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = 0
    for b in range(256):
        if b in printable:
            yield chr(b)
        else:
            yield chr(256 + extra)
            extra += 1


def write_base(base: BaseModel, folder: str | Path) -> Path:
    """Write a base model as a diffusers folder (the layout load_base reads)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base.unet.save_pretrained(folder / "unet", safe_serialization=True)
    base.vae.save_pretrained(folder / "vae", safe_serialization=True)
    base.text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    base.tokenizer.save_pretrained(folder / "tokenizer")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(base.scheduler_config, indent=2))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def write_demo_base(folder: str | Path, seed: int = 0) -> Path:
    return write_base(build_base("demo", seed), folder)


@torch.no_grad()
def encode_prompt(base: BaseModel, text: str) -> torch.Tensor:
    """CLIP-encode one prompt to (1, 77, D), as upstream: last hidden state,
    padded to the tokenizer's max length."""
    tok = base.tokenizer
    max_length = tok.model_max_length if tok.model_max_length <= 1024 else 77
    ids = tok(text, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").input_ids
    return base.text_encoder(ids)[0].float()
