"""S3Diff model pieces: estimator layout, checkpoint checks, modulated LoRA maths, reference pipeline."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import nn

from srexport.errors import UserError
from srexport.models.configs import DEMO_UNET, DEMO_VAE, SD21_SCHEDULER, SD21_UNET, SD21_VAE
from srexport.models.s3diff.checkpoint import S3DiffCheckpoint, load_s3diff_checkpoint, validate
from srexport.models.s3diff.degradation import DEResNet, load_de_net
from srexport.models.s3diff.demo import build_demo_checkpoint, write_demo_checkpoints
from srexport.models.s3diff.lora import (
    UNET_LORA_TARGET_MODULES,
    VAE_LORA_TARGET_MODULES,
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


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    return write_demo_checkpoints(tmp_path_factory.mktemp("s3diff"), seed=0)


@pytest.fixture(scope="module")
def demo_ckpt(demo_files):
    return load_s3diff_checkpoint(demo_files[0])


def _demo_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**DEMO_UNET).eval()


def _demo_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(**DEMO_VAE).eval()


# --- degradation estimator ----------------------------------------------------------------------


def test_deresnet_has_upstream_layout():
    model = DEResNet()
    state = model.state_dict()
    assert len(state) == 80
    assert sum(p.numel() for p in model.parameters()) == 2_351_362
    # six residual blocks at 64, the stride-2 conv 64->128 at index 6, two blocks at 128
    assert state["body.0.5.conv2.weight"].shape == (64, 64, 3, 3)
    assert state["body.1.6.weight"].shape == (128, 64, 3, 3)
    assert state["body.1.8.conv1.weight"].shape == (128, 128, 3, 3)
    assert state["fc_degree.1.0.weight"].shape == (512, 128)
    assert state["fc_degree.0.2.bias"].shape == (1,)
    assert model.body[0][6].stride == (2, 2)
    scores = model.eval()(torch.rand(3, 3, 21, 17))
    assert scores.shape == (3, 2) and bool(((scores > 0) & (scores < 1)).all())


def test_load_de_net_round_trip(demo_files):
    model = load_de_net(demo_files[1])
    image = torch.rand(2, 3, 24, 24)
    reference = DEResNet().eval()
    reference.load_state_dict(torch.load(demo_files[1]), strict=True)
    torch.testing.assert_close(model(image), reference(image))


def test_load_de_net_names_bad_keys(tmp_path, demo_files):
    state = torch.load(demo_files[1])
    missing = dict(state)
    del missing["body.0.3.conv1.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(UserError, match=r"missing keys body\.0\.3\.conv1\.weight"):
        load_de_net(tmp_path / "missing.pth")

    extra = dict(state, **{"head.weight": torch.zeros(1)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(UserError, match=r"unexpected keys head\.weight"):
        load_de_net(tmp_path / "extra.pth")

    wrong = dict(state, **{"conv_first.0.weight": torch.zeros(64, 1, 3, 3)})
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(UserError, match=r"conv_first\.0\.weight has shape \(64, 1, 3, 3\), expected \(64, 3, 3, 3\)"):
        load_de_net(tmp_path / "wrong.pth")

    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="cannot read"):
        load_de_net(tmp_path / "garbage.pth")
    with pytest.raises(UserError, match="no such file"):
        load_de_net(tmp_path / "absent.pth")


# --- target rules and block indices --------------------------------------------------------------


def test_target_rules_on_sd21():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD21_UNET)
        vae = AutoencoderKL(**SD21_VAE)
    unet_targets = select_lora_targets(unet, UNET_LORA_TARGET_MODULES)
    assert len(unet_targets) == 257
    assert "conv_in" not in unet_targets and "conv_out" in unet_targets
    assert "down_blocks.0.downsamplers.0.conv" in unet_targets
    assert not any(name.startswith("time_embedding") for name in unet_targets)
    vae_targets = select_lora_targets(vae, VAE_LORA_TARGET_MODULES)
    assert len(vae_targets) == 31
    assert all(name.startswith("encoder.") for name in vae_targets)
    assert "encoder.conv_in" in vae_targets and "encoder.mid_block.attentions.0.to_out.0" in vae_targets


def test_block_indices():
    assert unet_block_index("down_blocks.2.resnets.0.conv1") == 2
    assert unet_block_index("mid_block.attentions.0.proj_in") == 4
    assert unet_block_index("up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2") == 8
    assert unet_block_index("conv_out") == 9
    assert vae_block_index("encoder.down_blocks.3.resnets.1.conv2") == 3
    assert vae_block_index("encoder.mid_block.attentions.0.to_q") == 4
    assert vae_block_index("encoder.conv_in") == 5 and vae_block_index("encoder.conv_out") == 5


# --- the modulated layers -------------------------------------------------------------------------

RANK, BLOCKS, SCALING = 4, 3, 0.25


def _controller(seed: int = 0) -> ModulationController:
    torch.manual_seed(seed)
    modulation = DegradationModulation(rank=RANK, num_blocks=BLOCKS)
    nn.init.normal_(modulation.w)
    return ModulationController(modulation.eval(), SCALING)


def _randomise_lora(layer: nn.Module) -> None:
    with torch.no_grad():
        layer.lora_A.weight.normal_(0, 0.3)
        layer.lora_B.weight.normal_(0, 0.3)


def _merged_weight(layer, controller: ModulationController, scores: torch.Tensor) -> torch.Tensor:
    """W0 + scaling * B @ M^T @ A for one image, written out with einsum."""
    m = controller.modulation(scores)[0, layer.block_index]
    a, b = layer.lora_A.weight, layer.lora_B.weight
    if isinstance(layer, ModulatedLoRALinear):
        delta = b @ m.T @ a
    else:
        delta = torch.einsum("os,rs,rikl->oikl", b[:, :, 0, 0], m, a)
    return layer.base_layer.weight + SCALING * delta


SCORES = torch.tensor([[0.2, 0.9], [0.7, 0.1]])


def test_modulated_linear_equals_merged_weight():
    controller = _controller()
    layer = ModulatedLoRALinear(nn.Linear(12, 20), RANK, block_index=1, controller=controller)
    _randomise_lora(layer)
    x = torch.randn(2, 5, 12)
    with torch.no_grad():
        controller.set_scores(SCORES)
        out = layer(x)
        for i in range(2):
            expected = F.linear(x[i], _merged_weight(layer, controller, SCORES[i : i + 1]), layer.base_layer.bias)
            torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0)
        # (B, C) inputs too
        flat = layer(x[:, 0])
        torch.testing.assert_close(flat, out[:, 0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("padding", [0, 1])
def test_modulated_strided_conv_equals_merged_weight(padding):
    controller = _controller(1)
    base = nn.Conv2d(6, 10, 3, stride=2, padding=padding)
    layer = ModulatedLoRAConv2d(base, RANK, block_index=2, controller=controller)
    assert layer.lora_A.stride == (2, 2) and layer.lora_A.padding == (padding, padding)
    _randomise_lora(layer)
    x = torch.randn(2, 6, 11, 9)
    with torch.no_grad():
        controller.set_scores(SCORES)
        out = layer(x)
        for i in range(2):
            weight = _merged_weight(layer, controller, SCORES[i : i + 1])
            expected = F.conv2d(x[i : i + 1], weight, base.bias, stride=2, padding=padding)
            torch.testing.assert_close(out[i : i + 1], expected, atol=1e-5, rtol=0)


def test_batch_items_get_their_own_degradation():
    controller = _controller(2)
    linear = ModulatedLoRALinear(nn.Linear(8, 8), RANK, 0, controller)
    conv = ModulatedLoRAConv2d(nn.Conv2d(8, 8, 3, padding=1), RANK, 2, controller)
    _randomise_lora(linear)
    _randomise_lora(conv)
    x = torch.randn(2, 8, 6, 6)
    model = lambda v: linear(conv(v).permute(0, 2, 3, 1).flatten(1, 2))  # noqa: E731
    with torch.no_grad():
        controller.set_scores(SCORES)
        together = model(x)
        for i in range(2):
            controller.set_scores(SCORES[i : i + 1])
            alone = model(x[i : i + 1])
            torch.testing.assert_close(together[i : i + 1], alone, atol=1e-5, rtol=0)
        # one set of scores (batch 1) applies to every item, like a repeated M
        controller.set_scores(SCORES[:1])
        broadcast = model(x)
        controller.set(controller.modulation(SCORES[:1]).repeat(2, 1, 1, 1))
        torch.testing.assert_close(broadcast, model(x), atol=1e-6, rtol=0)
        assert not torch.allclose(together[1], broadcast[1], atol=1e-3)


def test_modulation_survives_tracing():
    """M computed inside the traced forward: the scores stay a live graph input."""
    controller = _controller(3)
    layer = ModulatedLoRAConv2d(nn.Conv2d(4, 4, 3, padding=1), RANK, 1, controller)
    _randomise_lora(layer)

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer, self.modulation = layer, controller.modulation

        def forward(self, x, scores):
            controller.set(self.modulation(scores))
            return self.layer(x)

    wrapper = Wrapper().eval()
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        traced = torch.jit.trace(wrapper, (x, SCORES[:1]))
        torch.testing.assert_close(traced(x, SCORES[1:]), wrapper(x, SCORES[1:]), atol=1e-6, rtol=0)


def test_merge_fixed_degradation_equals_modulated_unet(demo_ckpt):
    unet = _demo_unet()
    torch.manual_seed(5)
    latent, prompt = torch.randn(1, 4, 8, 8), torch.randn(1, 77, DEMO_UNET["cross_attention_dim"])
    scores = torch.tensor([[0.35, 0.6]])
    with torch.no_grad():
        plain = unet(latent, 999, prompt).sample
        controller = install_modulated_lora(unet, demo_ckpt.unet)
        assert len(controller.layers) == 257
        controller.set_scores(scores)
        modulated = unet(latent, 999, prompt).sample
        merge_fixed_degradation(unet, controller, scores)
        merged = unet(latent, 999, prompt).sample
    assert not any(isinstance(m, (ModulatedLoRALinear, ModulatedLoRAConv2d)) for m in unet.modules())
    torch.testing.assert_close(merged, modulated, atol=1e-4, rtol=0)
    assert (modulated - plain).abs().max() > 1e-2  # the demo LoRA (and conv_in) matter
    torch.testing.assert_close(unet.conv_in.weight, demo_ckpt.state_dict_unet["conv_in.weight"])
    with pytest.raises(ValueError, match="already installed"):
        install_modulated_lora(unet, demo_ckpt.unet)


# --- checkpoint format and checks -------------------------------------------------------------------


def test_demo_checkpoint_has_upstream_format(demo_ckpt):
    content = demo_ckpt.to_dict()
    assert set(content) == {
        "unet_lora_target_modules", "vae_lora_target_modules", "rank_unet", "rank_vae", "state_dict_unet",
        "state_dict_vae", "state_dict_vae_de_mlp", "state_dict_unet_de_mlp", "state_dict_vae_block_mlp",
        "state_dict_unet_block_mlp", "state_dict_vae_fuse_mlp", "state_dict_unet_fuse_mlp", "w", "state_embeddings",
    }
    assert (content["rank_unet"], content["rank_vae"]) == (32, 16)
    # the demo keeps SD 2.1's structure, so the key counts are upstream's
    assert len(content["state_dict_unet"]) == 516 and len(content["state_dict_vae"]) == 62
    assert content["state_dict_unet_fuse_mlp"]["weight"].shape == (32 * 32, 320)
    assert content["state_embeddings"]["state_dict_unet_block"]["weight"].shape == (10, 64)
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.default.weight"
    assert content["state_dict_unet"][key].abs().sum() > 0
    assert demo_ckpt.unet.scaling == 0.25 and demo_ckpt.vae.scaling == 0.5
    validate(demo_ckpt, _demo_unet(), _demo_vae())


def _saved(tmp_path, content, name="bad.pkl"):
    torch.save(content, tmp_path / name)
    return tmp_path / name


def test_checkpoint_structure_errors(tmp_path):
    good = build_demo_checkpoint(seed=1)

    missing = {k: v for k, v in good.items() if k != "state_dict_vae_fuse_mlp"}
    with pytest.raises(UserError, match="missing key.*'state_dict_vae_fuse_mlp'"):
        load_s3diff_checkpoint(_saved(tmp_path, missing))

    with pytest.raises(UserError, match="unexpected key.*'optimizer'"):
        load_s3diff_checkpoint(_saved(tmp_path, dict(good, optimizer={})))

    with pytest.raises(UserError, match="has rank 32.*but rank_unet is 16"):
        load_s3diff_checkpoint(_saved(tmp_path, dict(good, rank_unet=16)))

    fuse = {"weight": torch.zeros(100, 320), "bias": torch.zeros(100)}
    message = r"state_dict_vae_fuse_mlp\['weight'\] has shape \(100, 320\), expected \(256, 320\)"
    with pytest.raises(UserError, match=message):
        load_s3diff_checkpoint(_saved(tmp_path, dict(good, state_dict_vae_fuse_mlp=fuse)))

    embeddings = copy.deepcopy(good["state_embeddings"])
    embeddings["state_dict_unet_block"]["weight"] = torch.zeros(9, 64)
    with pytest.raises(UserError, match=r"state_dict_unet_block.*\(9, 64\), expected \(10, 64\)"):
        load_s3diff_checkpoint(_saved(tmp_path, dict(good, state_embeddings=embeddings)))

    lonely = dict(good["state_dict_vae"])
    del lonely["encoder.conv_in.lora_B.vae_skip.weight"]
    with pytest.raises(UserError, match=r"lacks encoder\.conv_in\.lora_B\.vae_skip\.weight"):
        load_s3diff_checkpoint(_saved(tmp_path, dict(good, state_dict_vae=lonely)))

    with pytest.raises(UserError, match="expected the S3Diff checkpoint dict"):
        load_s3diff_checkpoint(_saved(tmp_path, [1, 2]))


def test_checkpoint_model_errors():
    good = build_demo_checkpoint(seed=1)
    unet, vae = _demo_unet(), _demo_vae()

    unknown = dict(good["state_dict_unet"])
    unknown["extra_block.conv.lora_A.default.weight"] = torch.zeros(32, 4, 3, 3)
    unknown["extra_block.conv.lora_B.default.weight"] = torch.zeros(4, 32, 1, 1)
    ckpt = S3DiffCheckpoint.from_dict(dict(good, state_dict_unet=unknown))
    with pytest.raises(UserError, match="'extra_block.conv', a module the base UNet does not have"):
        validate(ckpt, unet, vae)

    shapes = dict(good["state_dict_unet"])
    key = "mid_block.attentions.0.proj_in.lora_A.default.weight"
    shapes[key] = torch.zeros(32, 64)
    ckpt = S3DiffCheckpoint.from_dict(dict(good, state_dict_unet=shapes))
    message = r"proj_in\.lora_A\.default\.weight\] has shape \(32, 64\), expected \(32, 128\)"
    with pytest.raises(UserError, match=message):
        validate(ckpt, unet, vae)

    uncovered = {k: v for k, v in good["state_dict_vae"].items() if not k.startswith("encoder.conv_out.")}
    ckpt = S3DiffCheckpoint.from_dict(dict(good, state_dict_vae=uncovered))
    with pytest.raises(UserError, match="no LoRA tensors for target module 'encoder.conv_out'"):
        validate(ckpt, unet, vae)

    no_conv_in = {k: v for k, v in good["state_dict_unet"].items() if not k.startswith("conv_in.")}
    ckpt = S3DiffCheckpoint.from_dict(dict(good, state_dict_unet=no_conv_in))
    with pytest.raises(UserError, match="lacks 'conv_in.weight'"):
        validate(ckpt, unet, vae)


# --- the reference pipeline ----------------------------------------------------------------------

from srexport.models.base import build_base  # noqa: E402
from srexport.models.s3diff.reference import OneStepSchedule, S3DiffReference, alphas_cumprod  # noqa: E402

LR = torch.rand(1, 3, 20, 24, generator=torch.Generator().manual_seed(7))  # x4 = 80x96, padded to 128x128
SMALL_LR = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(8))  # x4 = 64x64, no padding


def _reference(demo_ckpt, demo_files, **kwargs) -> S3DiffReference:
    return S3DiffReference(build_base("demo", seed=0), demo_ckpt, load_de_net(demo_files[1]), **kwargs)


def test_sd_turbo_schedule():
    alphas = alphas_cumprod(SD21_SCHEDULER)
    assert abs(float(alphas[999]) - 0.0046601) < 5e-7
    assert float(alphas[999]) == float(DDPMScheduler.from_config(SD21_SCHEDULER).alphas_cumprod[999])
    assert OneStepSchedule.from_config(SD21_SCHEDULER).clip_range is None
    no_clip_key = {k: v for k, v in SD21_SCHEDULER.items() if k != "clip_sample"}
    assert OneStepSchedule.from_config(no_clip_key).clip_range == 1.0  # DDPMScheduler's default
    assert OneStepSchedule.from_config(dict(SD21_SCHEDULER, clip_sample=True, clip_sample_range=2.5)).clip_range == 2.5
    with pytest.raises(UserError, match="no scheduler config"):
        OneStepSchedule.from_config({})


def test_reference_output(demo_ckpt, demo_files):
    reference = _reference(demo_ckpt, demo_files)
    env, prepared = reference.stage_tensors(LR)
    assert env["image"].shape == (1, 3, 128, 128)  # 80x96 reflect-padded to multiples of 64
    assert env["latent"].shape == (1, 4, 16, 16)
    out = reference(LR)
    assert out.shape == (1, 3, 80, 96)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    torch.testing.assert_close(out, reference.postprocess(env["decoded"], prepared))
    assert set(reference.components()) == {"degradation", "vae_encoder", "unet", "vae_decoder"}

    # the two guidance passes as one 2B batch or one after the other: same maths; x0 scales
    # eps differences by sqrt(1-a)/sqrt(a) ~ 15, hence the bound
    separate = _reference(demo_ckpt, demo_files, batch_guidance=False)
    torch.testing.assert_close(separate.denoise(env["latent"], env["scores"]), env["denoised"], atol=2e-4, rtol=0)


def test_reference_cfg_one_is_the_positive_pass(demo_ckpt, demo_files):
    reference = _reference(demo_ckpt, demo_files, cfg_scale=1.0)
    denoiser = reference.denoiser
    assert denoiser.negative_embeds is None
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    scores = reference.scores(LR)
    with torch.no_grad():
        denoiser._controller.set_scores(scores)
        eps = denoiser.unet(z, 999, denoiser.positive_embeds).sample
        denoiser._controller.clear()
    a = reference.schedule.alpha_cumprod
    expected = (z - (1 - a) ** 0.5 * eps) / a**0.5
    torch.testing.assert_close(reference.denoise(z, scores), expected, atol=1e-5, rtol=1e-5)


def test_fixed_degradation_equals_dynamic(demo_ckpt, demo_files):
    dynamic = _reference(demo_ckpt, demo_files)
    scores = dynamic.scores(SMALL_LR)
    fixed = S3DiffReference(build_base("demo", seed=0), demo_ckpt, None, degradation=tuple(scores[0].tolist()))
    assert "degradation" not in fixed.components()
    assert not any(isinstance(m, (ModulatedLoRALinear, ModulatedLoRAConv2d)) for m in fixed.modules())
    torch.testing.assert_close(fixed(SMALL_LR), dynamic(SMALL_LR), atol=1e-4, rtol=0)
    with pytest.raises(UserError, match="in \\[0, 1\\]"):
        S3DiffReference(build_base("demo", seed=0), demo_ckpt, None, degradation=(1.5, 0.0))
