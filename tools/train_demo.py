#!/usr/bin/env python
"""Train srexport's built-in demo: a tiny PiSA-SR, on a CPU, in minutes.

    python tools/train_demo.py --out src/srexport/assets/demo_pisa [--budget 300] [--seed 0]

Everything is trained on crops of ``calibration.photos.TRAIN_PHOTOS`` (real
photographs shipped with scikit-image); ``HELD_OUT_PHOTOS`` are used only for
the report at the end. Low-resolution inputs come from the stated
``calibration.degradation.Degradation`` (blur, x4 bicubic downsample, noise,
JPEG). Architectures: ``configs.DEMO_VAE`` and ``configs.TRAINED_DEMO_UNET``
(Stable Diffusion 2.1's block structure, shrunk widths), the demo text encoder.

Stages (their shares of ``--budget`` in ``STAGES``; the budget is CPU seconds of
this process, all threads, so a busy shared machine takes longer on the clock
but trains the same model):

1. **VAE**: an autoencoder (encoder mean -> decoder, no sampling and no KL,
   as srexport deploys it) on HR crops and on bicubic-upscaled degraded crops.
   It starts as a linear 8x8 box codec of RGB (``box_codec_init``). Loss: L1 in an
   opponent colour space after the adain colour fix (the pipeline's default) +
   0.3 L1 raw. Afterwards the latent is rescaled (folded
   into ``quant_conv``/``post_quant_conv``, exact) so the scaled latent has unit
   variance, as SD's does.
2. **Base UNet W0**: the stand-in for SD's pretrained prior: a latent restorer at
   PiSA-SR's timestep 1 and the empty prompt (``z_bic -> z_hr``, predicting the
   residual ``eps``), starting as the identity.
3. **pix LoRA** (rank 4, upstream's module rule, scaling 8/4 = 2.0):
   PiSA-SR's one-step model ``z0 = z - UNet(z, 1, c)`` on ``z = enc(bicubic(LR))``;
   first a latent L2 loss towards ``enc(HR)``, then the pixel loss
   L2(adain(dec(z0)), HR) through the decoder: fidelity.
4. **sem LoRA** on top of W0 + dW_pix (merged, frozen): pixel L1 + an edge loss
   (L1 between the gradient magnitudes of output and HR) that rewards sharp
   edges: lambda_sem trades a little PSNR for visible sharpness, as in PiSA-SR.

Then it writes the upstream formats (a diffusers folder whose weights are fp16
safetensors, the loader upcasts them; ``pisa_sr.pkl`` with exactly the 9
upstream keys, fp32), reloads them through srexport's own loaders, and reports
PSNR of the demo against bicubic on the held-out photos
(``--report``, default ``benchmarks/results/demo_model_quality.json``).

Same ``--seed`` and ``--steps`` (the counts a run records in ``training.json``)
reproduce a run on the same software; ``--budget`` alone stops each stage on
CPU time, so the step counts depend a little on the machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from srexport.calibration.degradation import Degradation, bicubic_upscale, psnr  # noqa: E402
from srexport.calibration.photos import (  # noqa: E402
    HELD_OUT_PHOTOS, TRAIN_PHOTOS, builtin_photos, describe_builtin, random_crops,
)
from srexport.kernels import adain_color_fix, resize  # noqa: E402
from srexport.models import configs  # noqa: E402
from srexport.models.base import build_base, encode_prompt, write_base  # noqa: E402
from srexport.models.lora import add_deltas  # noqa: E402
from srexport.models.pisa import BRANCHES, PARTS, PisaCheckpoint, branch_deltas, save_checkpoint, select_lora_modules  # noqa: E402
from srexport.models.pisa_reference import PISA_TIMESTEP  # noqa: E402

SF = configs.VAE_SCALING_FACTOR
RANK = 4
SCALING = configs.PEFT_DEFAULT_LORA_ALPHA / RANK  # 2.0, what the loader will use
# stage -> (share of the budget, maximum steps, batch, crop side in HR pixels, learning rate)
STAGES = {
    "vae": (0.40, 6000, 4, 64, 2e-3),
    "w0": (0.15, 3000, 32, 64, 2e-3),
    "pix_latent": (0.12, 3000, 32, 64, 3e-3),
    "pix_pixel": (0.20, 2000, 8, 64, 1e-3),
    "sem": (0.13, 1500, 8, 64, 1e-3),
}
# Upstream's process_size (512, srexport's default too) resizes an LR image whose short side
# is below 512/4 up to 128 before the x4 upscale, and the output back down: small inputs meet
# the VAE and the UNet zoomed in. Training pairs come at these zooms (one share each), so the
# model learns the inputs it gets at the default as well as those at native scale.
ZOOMS = (1, 1, 2, 4)
EDGE_WEIGHT = 0.5  # sem's edge loss against its pixel L1: visible sharpening, little PSNR
DEGRADATION = Degradation()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Stage:
    """Steps until the stage's share of the budget (CPU seconds) or its step cap is used;
    the learning rate follows a short warm-up and a cosine over that progress."""

    def __init__(self, name: str, budget: float | None, steps: int | None, lr: float, params, groups=None):
        share, max_steps, *_ = STAGES[name]
        self.name, self.lr = name, lr
        self.seconds = None if budget is None or steps is not None else share * budget
        self.max_steps = steps if steps is not None else max_steps
        # groups: [(params, lr multiplier)]; default one group at the stage's rate
        groups = groups or [([p for p in params if p.requires_grad], 1.0)]
        self.opt = torch.optim.Adam([{"params": list(ps), "lr_scale": k} for ps, k in groups], lr=lr)
        self.step, self.t0, self.cpu0, self.losses = 0, time.perf_counter(), time.process_time(), []

    def progress(self) -> float:
        p = self.step / self.max_steps
        if self.seconds:
            p = max(p, (time.process_time() - self.cpu0) / self.seconds)
        return min(p, 1.0)

    def __iter__(self):
        while self.progress() < 1.0:
            warm = min(1.0, (self.step + 1) / 20)
            for g in self.opt.param_groups:
                g["lr"] = g["lr_scale"] * self.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * self.progress())))
            yield self.step
            self.step += 1

    def update(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.losses.append(loss.item())
        if self.step % 50 == 0:
            log(f"  {self.name} step {self.step}  loss {sum(self.losses[-50:]) / len(self.losses[-50:]):.4f}")

    def record(self) -> dict:
        tail = self.losses[-50:] or [float("nan")]
        return {"steps": self.step, "wall_s": round(time.perf_counter() - self.t0, 1),
                "cpu_s": round(time.process_time() - self.cpu0, 1), "final_loss": round(sum(tail) / len(tail), 5)}


# --- data --------------------------------------------------------------------------


def mosaics(count: int, size: int, seed: int) -> torch.Tensor:
    """``count`` HR images of side ``size``, each a 2x2 mosaic of random crops of the
    training photos. A single small crop is mostly one hue, and adain (in the losses,
    as in the pipeline) would then restore its colour from a grey output: mosaics of
    different photos make the networks carry colour themselves."""
    half = size // 2
    crops = random_crops(builtin_photos("train"), half, 4 * count, seed)
    return crops.view(count, 2, 2, 3, half, half).permute(0, 3, 1, 4, 2, 5).reshape(count, 3, size, size)


def make_pairs(count: int, size: int, seed: int, mosaic: bool) -> dict[str, torch.Tensor]:
    """HR crops (or mosaics), degraded, and the pipeline's view of them at side ``size``: for a
    zoom k, the HR crop has side size/k, its degraded LR is pre-resized by k and upscaled x4
    (bicubic, as the pipeline does), and the target is the HR crop resized by k.

    The VAE trains on mosaics (colour, see ``mosaics``); the UNet on plain crops: a UNet trained
    on mosaics learnt their quadrant layout (its 8x8 latent reaches 1x1 at the bottom), helped
    on mosaics and hurt plain images, 0.094 -> 0.067 against 0.081 -> 0.106 latent MSE."""
    parts = []
    for i, k in enumerate(ZOOMS):
        n, side = count // len(ZOOMS), size // k
        hr = (mosaics(n, side, seed + 10 * i) if mosaic
              else random_crops(builtin_photos("train"), side, n, seed + 10 * i))
        lr, _ = DEGRADATION(hr, seed + 10 * i + 1)
        if k > 1:
            hr = resize(hr, (size, size), "bicubic").clamp(0, 1)
            lr = resize(lr, (lr.shape[-2] * k, lr.shape[-1] * k), "bicubic")
        parts.append({"hr": hr, "bic": bicubic_upscale(lr, DEGRADATION.scale)})
    return {key: torch.cat([part[key] for part in parts]) for key in ("hr", "bic")}


def batches(n: int, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(0, n, (batch,), generator=g)


# --- models ------------------------------------------------------------------------


def zero_residual_branches(model: nn.Module) -> None:
    """Resnets and attention start as identities (ReZero-style): fast, stable starts."""
    with torch.no_grad():
        for name, m in model.named_modules():
            if name.endswith("conv2") or name.endswith("to_out.0") or name.endswith("proj_out"):
                m.weight.zero_()
                if m.bias is not None:
                    m.bias.zero_()


@torch.no_grad()
def box_codec_init(vae, offset: float = 4.0) -> None:
    """Start the VAE as a linear codec that already carries colour: the encoder averages
    R, G, B over 8x8 blocks into latent channels 0-2, the decoder upsamples them back
    (nearest + [1,2,1] blur per 2x step, i.e. bilinear). Residual branches and attention
    start at zero, so every block is an identity; the GroupNorm + SiLU pairs before the
    two conv_outs run near-linearly around ``offset``. Training starts from x8-blurry colour
    instead of from noise, and a tiny VAE then learns in minutes what it would not in hours.
    """
    zero_residual_branches(vae)
    for name, m in vae.named_modules():
        if name.endswith("conv_shortcut"):  # channel-changing resnets: identity on shared channels
            m.weight.zero_()
            m.bias.zero_()
            n = min(m.in_channels, m.out_channels)
            m.weight[range(n), range(n), 0, 0] = 1.0

    def select(conv, pairs, bias=0.0):
        conv.weight.zero_()
        conv.bias.zero_()
        c = conv.kernel_size[0] // 2
        for o, i in pairs:
            conv.weight[o, i, c, c] = 1.0
            conv.bias[o] = bias

    enc, dec = vae.encoder, vae.decoder
    rgb = [(c, c) for c in range(3)]
    select(enc.conv_in, rgb)
    for block in enc.down_blocks:
        for down in block.downsamplers or []:  # stride-2 conv after (0,1,0,1) padding: 2x2 mean
            down.conv.weight.zero_()
            down.conv.bias.zero_()
            for c in range(down.conv.in_channels):
                down.conv.weight[c, c, 0:2, 0:2] = 0.25
    blur = torch.tensor([1.0, 2.0, 1.0]) / 4
    for block in dec.up_blocks:
        for up in block.upsamplers or []:  # nearest x2, then this conv: bilinear x2
            up.conv.weight.zero_()
            up.conv.bias.zero_()
            for c in range(up.conv.in_channels):
                up.conv.weight[c, c] = blur[:, None] * blur[None, :]
    for norm, conv_out in ((enc.conv_norm_out, enc.conv_out), (dec.conv_norm_out, dec.conv_out)):
        norm.weight.fill_(1.0)
        norm.bias.zero_()
        norm.bias[:3] = offset
        select(conv_out, rgb, bias=-offset)
    select(vae.quant_conv, [(c, c) for c in range(8)])
    select(vae.post_quant_conv, [(c, c) for c in range(4)])
    select(dec.conv_in, rgb)


VAE_SKELETON = ("encoder.conv_in", "downsamplers", "upsamplers", "encoder.conv_out", "quant_conv",
                "decoder.conv_in", "conv_shortcut", "decoder.conv_out")


def colour_l1(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """L1 in an opponent colour space (luma, red-green, yellow-blue), chroma weighted x2:
    a plain RGB loss lets a small network settle for luminance and leave colour to adain."""
    def opponent(t):
        r, g, b = t.unbind(1)
        return torch.stack([(r + g + b) / 3, 2 * (r - g), 2 * ((r + g) / 2 - b)], 1)

    return (opponent(actual) - opponent(expected)).abs().mean()


def encode(vae, images01: torch.Tensor) -> torch.Tensor:
    return vae.encode(images01 * 2 - 1).latent_dist.mean * SF


def decode(vae, z: torch.Tensor) -> torch.Tensor:
    return vae.decode(z / SF).sample.clamp(-1, 1) * 0.5 + 0.5


def unet_eps(unet, z: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    return unet(z, PISA_TIMESTEP, prompt.expand(z.shape[0], -1, -1)).sample


@torch.no_grad()
def rescale_latent(vae, scale: float) -> None:
    """Multiply the latent mean by ``scale`` and undo it in the decoder: the same autoencoder."""
    qc, pqc = vae.quant_conv, vae.post_quant_conv
    qc.weight[:4] *= scale
    qc.bias[:4] *= scale
    pqc.weight /= scale


class Lora(nn.Module):
    """base(x) + scaling * B(A(x)), with upstream's shapes: Linear A (r,in), B (out,r);
    conv A with the base kernel/stride/padding, B 1x1. peft's init: A Kaiming-uniform, B zero."""

    def __init__(self, base: nn.Module, rank: int, scaling: float):
        super().__init__()
        self.base, self.scaling = base, scaling
        if isinstance(base, nn.Linear):
            self.A = nn.Linear(base.in_features, rank, bias=False)
            self.B = nn.Linear(rank, base.out_features, bias=False)
        else:
            self.A = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, base.dilation,
                               bias=False)
            self.B = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        nn.init.kaiming_uniform_(self.A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.B.weight)

    def forward(self, x):
        return self.base(x) + self.scaling * self.B(self.A(x))


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    (model.get_submodule(parent) if parent else model)._modules[child] = module


def attach_lora(unet: nn.Module) -> dict[str, Lora]:
    unet.requires_grad_(False)
    wrapped = {}
    for part, names in select_lora_modules(unet).items():
        for name in names:
            wrapped[name] = Lora(unet.get_submodule(name), RANK, SCALING)
            _set_module(unet, name, wrapped[name])
    return wrapped


def detach_lora(unet: nn.Module, wrapped: dict[str, Lora], branch: str) -> dict[str, torch.Tensor]:
    """Put the base layers back; return the branch's tensors under upstream's key names."""
    for name, w in wrapped.items():
        _set_module(unet, name, w.base)
    part_of = {name: part for part, names in select_lora_modules(unet).items() for name in names}
    assert set(part_of) == set(wrapped)
    state = {}
    for name, w in wrapped.items():
        adapter = f"default_{part_of[name]}_{branch}"
        state[f"{name}.lora_A.{adapter}.weight"] = w.A.weight.detach().clone().contiguous()
        state[f"{name}.lora_B.{adapter}.weight"] = w.B.weight.detach().clone().contiguous()
    return state


def gradient_magnitude(x: torch.Tensor) -> torch.Tensor:
    gx = x[..., :, 1:] - x[..., :, :-1]
    gy = x[..., 1:, :] - x[..., :-1, :]
    return torch.sqrt(gx[..., :-1, :] ** 2 + gy[..., :, :-1] ** 2 + 1e-6)


# --- stages ------------------------------------------------------------------------


def train_vae(vae, budget, steps, seed) -> dict:
    share, _, batch, size, lr = STAGES["vae"]
    data = make_pairs(1024, size, seed, mosaic=True)
    images = torch.cat([data["hr"], data["bic"]])  # an autoencoder of sharp and of soft images
    box_codec_init(vae)
    vae.train().requires_grad_(True)
    # The codec's linear skeleton learns 10x slower than the residual branches: it keeps
    # carrying colour while the branches learn detail.
    skeleton = [p for n, p in vae.named_parameters() if any(k in n for k in VAE_SKELETON)]
    rest = [p for n, p in vae.named_parameters() if not any(k in n for k in VAE_SKELETON)]
    stage = Stage("vae", budget, steps, lr, None, groups=[(rest, 1.0), (skeleton, 0.1)])
    for _, idx in zip(stage, batches(len(images), batch, seed + 2)):
        x = images[idx]
        y = vae.decode(vae.encode(x * 2 - 1).latent_dist.mean).sample * 0.5 + 0.5
        loss = colour_l1(adain_color_fix(y, x), x) + 0.3 * (y - x).abs().mean()
        stage.update(loss)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        z = torch.cat([encode(vae, images[i:i + 128]) for i in range(0, len(images), len(images) // 4)])
        scale = 1.0 / float(z.std())
    rescale_latent(vae, scale)
    return dict(stage.record(), latent_rescale=round(scale, 5))


def latents(vae, data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = {k: torch.cat([encode(vae, data[k][i:i + 256]) for i in range(0, len(data[k]), 256)])
               for k in ("hr", "bic")}
    return {"z_hr": out["hr"], "z_bic": out["bic"]}


def train_w0(unet, prompt, lat, budget, steps, seed) -> dict:
    """The stand-in for SD's pretrained prior, at PiSA-SR's t=1 and the empty prompt: a latent
    restorer, from the latent of a bicubic-upscaled degraded image to the HR latent
    (z_bic -> z_hr, predicting the residual eps). conv_out starts at zero, so W0 starts as the
    identity z0 = z. (A denoising objective, z_hr + noise -> z_hr, was tried and dropped: W0 then
    "denoised" the detail of z_bic away, 1-2 dB below the identity, and rank-4 LoRA could not undo it.)"""
    _, _, batch, _, lr = STAGES["w0"]
    with torch.no_grad():
        unet.conv_out.weight.zero_()
        unet.conv_out.bias.zero_()
    zero_residual_branches(unet)
    unet.train().requires_grad_(True)
    z_hr, z_bic = lat["z_hr"], lat["z_bic"]
    stage = Stage("w0", budget, steps, lr, unet.parameters())
    for _, idx in zip(stage, batches(len(z_hr), batch, seed + 4)):
        z = z_bic[idx]
        stage.update(F.mse_loss(unet_eps(unet, z, prompt), z - z_hr[idx]))
    unet.eval().requires_grad_(False)
    return stage.record()


def sr_output(unet, vae, prompt, z: torch.Tensor, bic: torch.Tensor) -> torch.Tensor:
    """PiSA-SR's one step as the pipeline runs it: z0 = z - eps, decode, adain to the bicubic image."""
    return adain_color_fix(decode(vae, z - unet_eps(unet, z, prompt)), bic)


def train_pix(unet, vae, prompt, data, lat, budget, steps_latent, steps_pixel, seed) -> tuple[dict, dict]:
    wrapped = attach_lora(unet)
    params = [p for w in wrapped.values() for p in (w.A.weight, w.B.weight)]
    unet.train()
    _, _, batch, _, lr = STAGES["pix_latent"]
    stage = Stage("pix_latent", budget, steps_latent, lr, params)
    for _, idx in zip(stage, batches(len(lat["z_bic"]), batch, seed + 5)):
        z = lat["z_bic"][idx]
        stage.update(F.mse_loss(z - unet_eps(unet, z, prompt), lat["z_hr"][idx]))
    rec_latent = stage.record()
    _, _, batch, _, lr = STAGES["pix_pixel"]
    stage = Stage("pix_pixel", budget, steps_pixel, lr, params)
    for _, idx in zip(stage, batches(len(lat["z_bic"]), batch, seed + 6)):
        out = sr_output(unet, vae, prompt, lat["z_bic"][idx], data["bic"][idx])
        stage.update(F.mse_loss(out, data["hr"][idx]))
    unet.eval()
    return detach_lora(unet, wrapped, "pix"), {"latent": rec_latent, "pixel": stage.record()}


def train_sem(unet, vae, prompt, data, lat, budget, steps, seed) -> tuple[dict, dict]:
    wrapped = attach_lora(unet)
    params = [p for w in wrapped.values() for p in (w.A.weight, w.B.weight)]
    unet.train()
    _, _, batch, _, lr = STAGES["sem"]
    stage = Stage("sem", budget, steps, lr, params)
    for _, idx in zip(stage, batches(len(lat["z_bic"]), batch, seed + 7)):
        out, hr = sr_output(unet, vae, prompt, lat["z_bic"][idx], data["bic"][idx]), data["hr"][idx]
        loss = (out - hr).abs().mean() + EDGE_WEIGHT * (gradient_magnitude(out) - gradient_magnitude(hr)).abs().mean()
        stage.update(loss)
    unet.eval()
    return detach_lora(unet, wrapped, "sem"), stage.record()


# --- saving ------------------------------------------------------------------------


def save_demo(base, ckpt: PisaCheckpoint, out: Path, record: dict) -> None:
    """Upstream formats: a diffusers folder (weights as fp16 safetensors; the loader
    upcasts to fp32) and pisa_sr.pkl (exactly the 9 upstream keys, fp32 tensors)."""
    from safetensors.torch import load_file, save_file

    tmp = Path(tempfile.mkdtemp(prefix=".train-demo-", dir=out.parent))
    try:
        write_base(base, tmp / "base")
        for path in (tmp / "base").rglob("*.safetensors"):
            tensors = {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
            save_file(tensors, str(path), metadata={"format": "pt"})
        save_checkpoint(ckpt, tmp / "pisa_sr.pkl")
        (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --- evaluation ----------------------------------------------------------------------


EVAL_SEEDS = (0, 1, 2)
EVAL_SETTINGS = {  # name -> PisaSettings overrides; the first is the headline
    # srexport's and upstream's default process_size: LR short sides below 512/4 are resized
    # up to 128 first (chelsea 74 and coffee 100 here, and every 40-pixel crop; camera's is 128)
    "demo (lambda_pix=1, lambda_sem=1)": dict(lambda_pix=1.0, lambda_sem=1.0, guidance="merged"),
    "pix only (lambda_sem=0)": dict(lambda_pix=1.0, lambda_sem=0.0, guidance="merged"),
    # eps = 0: the VAE round trip alone, where the UNet starts from
    "VAE only (lambda_pix=0, lambda_sem=0)": dict(lambda_pix=0.0, lambda_sem=0.0, guidance="exact"),
    # no pre-resize at all: the VAE's 8x latent is then the limit on small inputs
    "demo, process_size=128 (no pre-resize)": dict(lambda_pix=1.0, lambda_sem=1.0, guidance="merged",
                                                   process_size=128),
}
PROCESS_SIZE = 512
HEADLINE = next(iter(EVAL_SETTINGS))
# Held-out 160x160 crops (LR 40x40), as tests/test_demo_model.py uses: (photo, top, left)
EVAL_CROPS = (("chelsea", 60, 140), ("coffee", 100, 300), ("camera", 60, 200))


def sharpness(x: torch.Tensor) -> float:
    return float(gradient_magnitude(x).mean())


def evaluate(source, report: Path | None, record: dict) -> dict:
    """PSNR (RGB, whole image, [0,1]) of the demo and of bicubic against HR, per held-out photo,
    each averaged over EVAL_SEEDS degradations; the demo runs through srexport's PisaReference."""
    from srexport.models.pisa_reference import PisaReference, PisaSettings

    photos = {p.name: p.image for p in builtin_photos("held_out")}
    whole = dict(photos)
    for name, top, left in EVAL_CROPS:
        photos[f"{name} crop {top},{left}"] = whole[name][..., top:top + 160, left:left + 160].contiguous()
    inputs = {}
    for k, (name, hr) in enumerate(photos.items()):
        hr = hr[..., : hr.shape[-2] // 8 * 8, : hr.shape[-1] // 8 * 8]
        for seed in EVAL_SEEDS:
            lr, (params,) = DEGRADATION(hr, 1000 + 100 * k + seed)
            inputs[(name, seed)] = (hr, lr, params)
    results = {name: {"size_hr": list(photos[name].shape[-2:]), "bicubic": [], "sharpness_hr": None}
               for name in photos}
    panels = []  # (name, bicubic, demo, HR) of each crop, first seed: the side-by-side PNG
    for (name, seed), (hr, lr, params) in inputs.items():
        results[name]["bicubic"].append(psnr(bicubic_upscale(lr), hr))
        results[name]["sharpness_hr"] = sharpness(hr)
        results[name].setdefault("degradations", []).append(params.to_dict())
    for label, overrides in EVAL_SETTINGS.items():
        base, ckpt = source.load()
        ref = PisaReference(base, ckpt, PisaSettings(**{"process_size": PROCESS_SIZE, **overrides}))
        for (name, seed), (hr, lr, params) in inputs.items():
            out = ref(lr)
            if label == HEADLINE and seed == EVAL_SEEDS[0] and " crop " in name:
                panels.append((name, bicubic_upscale(lr), out, hr))
            r = results[name].setdefault(label, {"psnr": [], "sharpness": []})
            r["psnr"].append(psnr(out, hr))
            r["sharpness"].append(sharpness(out))
        del ref
    summary = {}
    for name, r in results.items():
        row = {"bicubic_psnr_db": round(sum(r["bicubic"]) / len(r["bicubic"]), 3),
               "hr_sharpness": round(r["sharpness_hr"], 5)}
        for label in EVAL_SETTINGS:
            ps = r[label]["psnr"]
            row[label] = {"psnr_db": round(sum(ps) / len(ps), 3),
                          "gain_over_bicubic_db": round(sum(ps) / len(ps) - row["bicubic_psnr_db"], 3),
                          "per_seed_psnr_db": [round(x, 3) for x in ps],
                          "sharpness": round(sum(r[label]["sharpness"]) / len(ps), 5)}
        row["per_seed_bicubic_psnr_db"] = [round(x, 3) for x in r["bicubic"]]
        row["degradations"] = r["degradations"]
        summary[name] = row
    result = {
        "what": "PSNR (dB, RGB, [0,1]) of the trained demo PiSA-SR x4 and of bicubic x4 against the original, "
                "on each whole held-out photo and on three 160x160 held-out crops (LR 40x40); LR made by the "
                "stated degradation; mean over the seeds.",
        "held_out_photos": describe_builtin("held_out"),
        "train_photos": list(TRAIN_PHOTOS),
        "degradation": DEGRADATION.describe(),
        "degradation_seeds": "1000 + 100 * photo_index + seed, seed in " + str(list(EVAL_SEEDS)),
        "pipeline": f"srexport PisaReference, process_size={PROCESS_SIZE} (upstream's and srexport's default) "
                    "unless a setting says otherwise, colour fix adain, latent mean",
        "sharpness": "mean gradient magnitude of the output (HR's for reference)",
        "photos": summary,
        "training": record,
    }
    if report:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(result, indent=2) + "\n")
        side_by_side(panels, report.with_suffix(".png"))
    return result


def side_by_side(panels, path: Path) -> None:
    """One row per crop: bicubic | demo | original, with each PSNR in the row label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 3, figsize=(9, 3.1 * len(panels)), squeeze=False)
    for row, (name, bic, out, hr) in zip(axes, panels):
        for ax, image, title in zip(row, (bic, out, hr), (f"bicubic {psnr(bic, hr):.2f} dB",
                                                          f"demo {psnr(out, hr):.2f} dB", f"original ({name})")):
            ax.imshow(image[0].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    fig.suptitle("srexport's trained demo, x4, held-out crops (LR 40x40, first degradation seed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_summary(result: dict) -> None:
    print("\nPSNR (dB) vs the original, mean over the seeds; in brackets the gain over bicubic")
    for label in EVAL_SETTINGS:
        cells = "  ".join(f"{name} {row[label]['psnr_db']:.2f} ({row[label]['gain_over_bicubic_db']:+.2f})"
                          for name, row in result["photos"].items())
        print(f"  {label:<46} {cells}")
    print(f"  {'bicubic':<46} " + "  ".join(f"{name} {row['bicubic_psnr_db']:.2f}"
                                            for name, row in result["photos"].items()))


# --- main ----------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "src/srexport/assets/demo_pisa")
    ap.add_argument("--budget", type=float, default=900.0,
                    help="CPU seconds (this process, all threads) for training, shared by the stages (default 900: 7-8 minutes on an idle 2-core machine)")
    ap.add_argument("--steps", type=str, default=None,
                    help="exact step counts 'vae,w0,pix_latent,pix_pixel,sem' (as training.json records); "
                         "overrides --budget")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--report", type=Path, default=ROOT / "benchmarks/results/demo_model_quality.json")
    ap.add_argument("--eval-only", action="store_true", help="only evaluate the model already in --out")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    from srexport.models.sources import trained_demo_source_from

    if args.eval_only:
        with tempfile.TemporaryDirectory() as cache:
            record = json.loads((args.out / "training.json").read_text())
            result = evaluate(trained_demo_source_from(args.out, Path(cache)), args.report, record)
        print_summary(result)
        return 0

    steps = dict(zip(STAGES, (int(s) for s in args.steps.split(",")))) if args.steps else {k: None for k in STAGES}
    budget = None if args.steps else args.budget
    torch.manual_seed(args.seed)
    t0, cpu0 = time.perf_counter(), time.process_time()
    base = build_base("demo_trained", seed=args.seed)
    prompt = encode_prompt(base, "")
    record = {"seed": args.seed, "threads": args.threads, "budget_s": budget, "stages": {},
              "architecture": {"unet": configs.TRAINED_DEMO_UNET["block_out_channels"],
                               "vae": configs.DEMO_VAE["block_out_channels"]},
              "lora": {"rank": RANK, "scaling": SCALING}}

    log("stage 1/4: VAE (autoencoder on HR and bicubic-upscaled degraded crops)")
    record["stages"]["vae"] = train_vae(base.vae, budget, steps["vae"], args.seed)
    log("preparing SR pairs and their latents")
    data = make_pairs(2048, STAGES["w0"][3], args.seed + 100, mosaic=False)
    lat = latents(base.vae, data)

    log("stage 2/4: base UNet W0 (latent restorer at t=1, empty prompt)")
    record["stages"]["w0"] = train_w0(base.unet, prompt, lat, budget, steps["w0"], args.seed)

    log("stage 3/4: pix LoRA (latent L2, then pixel L2 through the decoder)")
    w0 = copy.deepcopy(base.unet)
    state_pix, rec = train_pix(base.unet, base.vae, prompt, data, lat, budget, steps["pix_latent"],
                               steps["pix_pixel"], args.seed)
    record["stages"]["pix_latent"], record["stages"]["pix_pixel"] = rec["latent"], rec["pixel"]

    split = select_lora_modules(w0)
    modules = {b: {p: list(split[p]) for p in PARTS} for b in BRANCHES}
    ckpt = PisaCheckpoint(modules, {b: RANK for b in BRANCHES}, dict(state_pix))
    # sem trains on exactly what the loader will build: W0 + dW_pix with the repo's own maths.
    base.unet = copy.deepcopy(w0)
    add_deltas(base.unet, branch_deltas(ckpt, w0, "pix"))
    log("stage 4/4: sem LoRA on W0 + dW_pix (pixel L1 + edge loss)")
    state_sem, record["stages"]["sem"] = train_sem(base.unet, base.vae, prompt, data, lat, budget, steps["sem"],
                                                   args.seed)
    ckpt.state_dict.update(state_sem)
    base.unet = w0

    record["train_wall_s"] = round(time.perf_counter() - t0, 1)
    record["train_cpu_s"] = round(time.process_time() - cpu0, 1)
    record["steps"] = ",".join(str(record["stages"][k]["steps"]) for k in STAGES)
    record["machine"] = {"python": platform.python_version(), "torch": torch.__version__,
                         "cpus": os.cpu_count(), "load_avg_1m_at_end": os.getloadavg()[0]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_demo(base, ckpt, args.out, record)
    record["shipped_bytes"] = folder_size(args.out)
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"wrote {args.out} ({record['shipped_bytes'] / 2**20:.2f} MiB); training took {record['train_wall_s']} s "
        f"wall, {record['train_cpu_s']} s CPU; steps {record['steps']}")

    log("evaluating on the held-out photos through srexport's loaders and PisaReference")
    with tempfile.TemporaryDirectory() as cache:
        result = evaluate(trained_demo_source_from(args.out, Path(cache)), args.report, record)
    print_summary(result)
    if args.report:
        log(f"wrote {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
