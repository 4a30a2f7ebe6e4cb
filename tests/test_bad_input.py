"""Every bad input: one line on stderr naming the problem and the fix, exit
status 2, no traceback, nothing half-written, no input touched.

The session's small demo artifact (tests/conftest.py) is reused; checkpoint
and base-folder errors are detected before any export work, so those tests
only load the tiny demo base.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from srexport.cli import main
from srexport.models.pisa import load_pisa_checkpoint
from srexport.models.pisa_reference import PisaSettings
from srexport.processing import Processing


# --- fixtures and helpers -------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(demo_source):
    return demo_source


@pytest.fixture(scope="module")
def raw_checkpoint(demo):
    return torch.load(demo.checkpoint, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def artifact(demo_artifact):
    return demo_artifact


@pytest.fixture
def artifact_copy(artifact, tmp_path):
    """A private copy of the artifact that a test may damage."""
    return Path(shutil.copytree(artifact, tmp_path / "art"))


def user_error(rc, capsys, *words: str) -> str:
    """Assert the CLI's bad-input contract and return the error line."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("srexport: error: "), line
    for word in words:
        assert word in line, (word, line)
    return line


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file below folder (hidden ones included)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def assert_nothing_built(out: Path) -> None:
    assert not out.exists()
    if out.parent.exists():
        leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
        assert leftovers == [], leftovers


def write_image(path: Path, size=(16, 16), mode="RGB") -> Path:
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(array).convert(mode).save(path)
    return path


def build_with_checkpoint(demo, tmp_path, raw: dict, capsys, *words: str) -> str:
    ckpt = tmp_path / "pisa_sr.pkl"
    torch.save(raw, ckpt)
    before = ckpt.read_bytes()
    out = tmp_path / "out" / "art"
    rc = main(["build", "--base", str(demo.base), "--checkpoint", str(ckpt), "--out", str(out), "--quiet"])
    line = user_error(rc, capsys, *words)
    assert_nothing_built(out)
    assert ckpt.read_bytes() == before
    return line


# --- build: flags ---------------------------------------------------------------------


def test_lambda_pix_zero_merged_points_to_exact(tmp_path, capsys):
    out = tmp_path / "art"
    rc = main(["build", "--lambda-pix", "0", "--guidance", "merged", "--out", str(out), "--quiet"])
    user_error(rc, capsys, "--lambda-pix 0", "--guidance exact")
    assert_nothing_built(out)
    PisaSettings(lambda_pix=0.0, guidance="exact").validate()  # the pointed-to fix is accepted


@pytest.mark.parametrize("flag", ["--base", "--checkpoint"])
def test_base_and_checkpoint_go_together(tmp_path, capsys, demo, flag):
    value = demo.base if flag == "--base" else demo.checkpoint
    out = tmp_path / "art"
    rc = main(["build", flag, str(value), "--out", str(out), "--quiet"])
    user_error(rc, capsys, "--base", "--checkpoint")
    assert_nothing_built(out)


@pytest.mark.parametrize("scale", ["0", "17", "-2"])
def test_scale_out_of_range(tmp_path, capsys, scale):
    rc = main(["build", "--scale", scale, "--out", str(tmp_path / "art"), "--quiet"])
    user_error(rc, capsys, "--scale")
    assert_nothing_built(tmp_path / "art")


def test_existing_out_without_force_is_untouched(tmp_path, capsys, demo):
    out = tmp_path / "art"
    out.mkdir()
    (out / "manifest.json").write_text('{"mine": true}\n')
    (out / "notes.txt").write_text("keep me\n")
    before = snapshot(tmp_path)
    rc = main(["build", "--process-size", "128", "--out", str(out), "--quiet"])
    user_error(rc, capsys, str(out.name), "--force")
    assert snapshot(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


# --- build: the base folder -----------------------------------------------------------


def test_base_is_not_a_folder(tmp_path, capsys, demo):
    not_folder = tmp_path / "base.txt"
    not_folder.write_text("x")
    rc = main(["build", "--base", str(not_folder), "--checkpoint", str(demo.checkpoint),
               "--out", str(tmp_path / "art"), "--quiet"])
    user_error(rc, capsys, "base.txt", "diffusers")
    assert_nothing_built(tmp_path / "art")


def test_base_is_not_a_diffusers_folder(tmp_path, capsys, demo):
    base = tmp_path / "base"
    (base / "unet").mkdir(parents=True)
    (base / "vae").mkdir()
    rc = main(["build", "--base", str(base), "--checkpoint", str(demo.checkpoint),
               "--out", str(tmp_path / "art"), "--quiet"])
    line = user_error(rc, capsys, "not a diffusers", "text_encoder", "tokenizer", "scheduler", "model_index.json")
    assert "missing unet" not in line
    assert_nothing_built(tmp_path / "art")


def test_base_with_empty_subfolders(tmp_path, capsys, demo):
    base = tmp_path / "base"
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (base / sub).mkdir(parents=True)
    (base / "model_index.json").write_text("{}")
    rc = main(["build", "--base", str(base), "--checkpoint", str(demo.checkpoint),
               "--out", str(tmp_path / "art"), "--quiet"])
    user_error(rc, capsys, "scheduler_config.json")
    (base / "scheduler" / "scheduler_config.json").write_text("{}")
    rc = main(["build", "--base", str(base), "--checkpoint", str(demo.checkpoint),
               "--out", str(tmp_path / "art"), "--quiet"])
    user_error(rc, capsys, str(base))
    assert_nothing_built(tmp_path / "art")


@pytest.mark.parametrize("damage", ["config", "weights"])
def test_base_with_damaged_files(tmp_path, capsys, demo, damage):
    base = Path(shutil.copytree(demo.base, tmp_path / "base"))
    if damage == "config":
        (base / "unet" / "config.json").write_text("{not json")
    else:
        weights = base / "unet" / "diffusion_pytorch_model.safetensors"
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    before = snapshot(base)
    rc = main(["build", "--base", str(base), "--checkpoint", str(demo.checkpoint),
               "--out", str(tmp_path / "art"), "--quiet"])
    user_error(rc, capsys, "cannot load the diffusers folder")
    assert_nothing_built(tmp_path / "art")
    assert snapshot(base) == before


# --- build: the checkpoint ------------------------------------------------------------


def test_checkpoint_does_not_exist(tmp_path, capsys, demo):
    rc = main(["build", "--base", str(demo.base), "--checkpoint", str(tmp_path / "nope.pkl"),
               "--out", str(tmp_path / "art"), "--quiet"])
    user_error(rc, capsys, "nope.pkl", "does not exist")
    assert_nothing_built(tmp_path / "art")


@pytest.mark.parametrize("content", ["text", "truncated"])
def test_checkpoint_unreadable(tmp_path, capsys, demo, content):
    ckpt = tmp_path / "pisa_sr.pkl"
    if content == "text":
        ckpt.write_text("not a pickle\n")
    else:
        data = demo.checkpoint.read_bytes()
        ckpt.write_bytes(data[: len(data) // 2])
    rc = main(["build", "--base", str(demo.base), "--checkpoint", str(ckpt),
               "--out", str(tmp_path / "art"), "--quiet"])
    user_error(rc, capsys, "cannot read checkpoint", "pisa_sr.pkl")
    assert_nothing_built(tmp_path / "art")


def test_checkpoint_not_a_dict(tmp_path, capsys, demo):
    build_with_checkpoint(demo, tmp_path, [1, 2, 3], capsys, "list", "9 keys")


def test_checkpoint_missing_key_is_named(tmp_path, capsys, demo, raw_checkpoint):
    raw = dict(raw_checkpoint)
    del raw["lora_rank_unet_sem"]
    del raw["unet_lora_decoder_modules_pix"]
    build_with_checkpoint(demo, tmp_path, raw, capsys, "missing keys",
                          "lora_rank_unet_sem", "unet_lora_decoder_modules_pix")


def test_checkpoint_extra_key_is_named(tmp_path, capsys, demo, raw_checkpoint):
    raw = dict(raw_checkpoint, vae_lora_modules=["x"])
    build_with_checkpoint(demo, tmp_path, raw, capsys, "unexpected keys", "vae_lora_modules")


@pytest.mark.parametrize("rank", [0, -4, 4.0, "4"])
def test_checkpoint_rank_not_a_positive_int(tmp_path, capsys, demo, raw_checkpoint, rank):
    raw = dict(raw_checkpoint, lora_rank_unet_pix=rank)
    build_with_checkpoint(demo, tmp_path, raw, capsys, "lora_rank_unet_pix", "positive int")


def test_checkpoint_rank_mismatch(tmp_path, capsys, demo, raw_checkpoint):
    assert raw_checkpoint["lora_rank_unet_sem"] == 4
    raw = dict(raw_checkpoint, lora_rank_unet_sem=8)
    build_with_checkpoint(demo, tmp_path, raw, capsys, "rank 8", "(sem)", "wrong base model or rank")


def _first_pair(raw: dict, adapter: str = "default_encoder_pix") -> tuple[str, str, str]:
    a_key = next(k for k in raw["state_dict_unet"] if k.endswith(f".lora_A.{adapter}.weight"))
    module = a_key[: -len(f".lora_A.{adapter}.weight")]
    return module, a_key, a_key.replace(".lora_A.", ".lora_B.")


@pytest.mark.parametrize("which", ["A", "B"])
def test_checkpoint_shape_mismatch_with_base(tmp_path, capsys, demo, raw_checkpoint, which):
    raw = copy.copy(raw_checkpoint)
    raw["state_dict_unet"] = dict(raw_checkpoint["state_dict_unet"])
    module, a_key, b_key = _first_pair(raw)
    key = a_key if which == "A" else b_key
    shape = list(raw["state_dict_unet"][key].shape)
    shape[1 if which == "A" else 0] += 3  # the base layer's in/out width
    raw["state_dict_unet"][key] = torch.zeros(shape)
    build_with_checkpoint(demo, tmp_path, raw, capsys, module, "do not fit", "wrong base model")


def test_checkpoint_module_missing_from_base(tmp_path, capsys, demo, raw_checkpoint):
    raw = copy.copy(raw_checkpoint)
    sd = raw["state_dict_unet"] = dict(raw_checkpoint["state_dict_unet"])
    module, a_key, b_key = _first_pair(raw)
    sd["no_such_block.conv.lora_A.default_encoder_pix.weight"] = sd.pop(a_key)
    sd["no_such_block.conv.lora_B.default_encoder_pix.weight"] = sd.pop(b_key)
    raw["unet_lora_encoder_modules_pix"] = [
        "no_such_block.conv" if m == module else m for m in raw_checkpoint["unet_lora_encoder_modules_pix"]]
    build_with_checkpoint(demo, tmp_path, raw, capsys, "no_such_block.conv", "does not exist in the base UNet")


def test_checkpoint_lora_A_missing(tmp_path, capsys, demo, raw_checkpoint):
    raw = copy.copy(raw_checkpoint)
    raw["state_dict_unet"] = dict(raw_checkpoint["state_dict_unet"])
    module, a_key, _ = _first_pair(raw)
    del raw["state_dict_unet"][a_key]
    build_with_checkpoint(demo, tmp_path, raw, capsys, "unet_lora_encoder_modules_pix", module)


def test_checkpoint_lora_B_missing(tmp_path, capsys, demo, raw_checkpoint):
    raw = copy.copy(raw_checkpoint)
    raw["state_dict_unet"] = dict(raw_checkpoint["state_dict_unet"])
    module, _, b_key = _first_pair(raw)
    del raw["state_dict_unet"][b_key]
    build_with_checkpoint(demo, tmp_path, raw, capsys, module, "lora_B")


def test_checkpoint_state_dict_not_tensors(tmp_path, capsys, demo, raw_checkpoint):
    raw = copy.copy(raw_checkpoint)
    raw["state_dict_unet"] = dict(raw_checkpoint["state_dict_unet"])
    _, a_key, _ = _first_pair(raw)
    raw["state_dict_unet"][a_key] = "not a tensor"
    build_with_checkpoint(demo, tmp_path, raw, capsys, "state_dict_unet", "tensors")


def test_checkpoint_module_list_not_a_list(tmp_path, capsys, demo, raw_checkpoint):
    raw = dict(raw_checkpoint, unet_lora_encoder_modules_pix=None)
    build_with_checkpoint(demo, tmp_path, raw, capsys, "unet_lora_encoder_modules_pix")


def test_checkpoint_stray_state_dict_key_is_named(tmp_path, capsys, demo, raw_checkpoint):
    raw = copy.copy(raw_checkpoint)
    raw["state_dict_unet"] = dict(raw_checkpoint["state_dict_unet"], **{"conv_in.lora_X.weight": torch.zeros(1)})
    out = tmp_path / "out" / "art"
    ckpt = tmp_path / "pisa_sr.pkl"
    torch.save(raw, ckpt)
    with pytest.raises(Exception) as e:  # fail fast: the parser must refuse it, before any export
        load_pisa_checkpoint(ckpt)
    assert "conv_in.lora_X.weight" in str(e.value)
    assert not out.exists()


def test_subprocess_one_line_no_traceback(artifact, tmp_path):
    """End to end through ``python -m srexport.cli``: one line, status 2, no traceback, nothing written."""
    image = write_image(tmp_path / "in.png", size=(64, 64))
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    before = snapshot(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "srexport.cli", "run", str(artifact), str(image), "-o", str(tmp_path / "out.png")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("srexport: error: "), proc.stderr
    assert "in.png" in lines[0] and "truncated" in lines[0]
    assert proc.stdout == ""
    assert snapshot(tmp_path) == before


# --- artifacts --------------------------------------------------------------------------


def test_artifact_file_modified_is_refused(artifact_copy, tmp_path, capsys):
    graph = artifact_copy / "vae_decoder.onnx"
    data = bytearray(graph.read_bytes())
    data[-1] ^= 0x01  # same size, different content
    graph.write_bytes(bytes(data))
    image = write_image(tmp_path / "in.png")
    for argv in (["run", str(artifact_copy), str(image), "-o", str(tmp_path / "out.png")],
                 ["inspect", str(artifact_copy)]):
        user_error(main(argv), capsys, "vae_decoder.onnx", "sha256", "rebuild")
    assert not (tmp_path / "out.png").exists()


def test_artifact_file_truncated_is_refused(artifact_copy, capsys):
    graph = artifact_copy / "unet.onnx"
    data = graph.read_bytes()
    graph.write_bytes(data[: len(data) // 2])
    user_error(main(["inspect", str(artifact_copy)]), capsys, "unet.onnx", "sha256")


def test_artifact_file_missing(artifact_copy, capsys):
    (artifact_copy / "vae_encoder.onnx").unlink()
    user_error(main(["inspect", str(artifact_copy)]), capsys, "missing vae_encoder.onnx", "rebuild")


def test_artifact_without_manifest(artifact_copy, tmp_path, capsys):
    (artifact_copy / "manifest.json").unlink()
    image = write_image(tmp_path / "in.png")
    for argv in (["run", str(artifact_copy), str(image), "-o", str(tmp_path / "out.png")],
                 ["check", str(artifact_copy)],
                 ["inspect", str(artifact_copy)]):
        user_error(main(argv), capsys, "manifest.json", "srexport build")
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("text", ["{not json", json.dumps({"format_version": 999})])
def test_artifact_manifest_unreadable_or_wrong_version(artifact_copy, capsys, text):
    (artifact_copy / "manifest.json").write_text(text)
    user_error(main(["inspect", str(artifact_copy)]), capsys, "manifest.json", "rebuild")


@pytest.mark.parametrize("text", ["[1, 2]", json.dumps({"format_version": 1})])
def test_artifact_manifest_wrong_structure(artifact_copy, capsys, text):
    (artifact_copy / "manifest.json").write_text(text)
    user_error(main(["inspect", str(artifact_copy)]), capsys, "manifest.json")


def test_artifact_is_not_a_folder(tmp_path, capsys):
    image = write_image(tmp_path / "in.png")
    rc = main(["run", str(tmp_path / "no-artifact"), str(image), "-o", str(tmp_path / "out.png")])
    user_error(rc, capsys, "no-artifact", "not a folder")
    assert not (tmp_path / "out.png").exists()


# --- run ------------------------------------------------------------------------------


def test_run_existing_output_without_force_is_byte_identical(artifact, tmp_path, capsys):
    image = write_image(tmp_path / "in.png")
    out = tmp_path / "out.png"
    out.write_bytes(b"\x89PNG precious earlier result")
    before = snapshot(tmp_path)
    rc = main(["run", str(artifact), str(image), "-o", str(out)])
    user_error(rc, capsys, "out.png", "already exists", "--force")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", ["text", "truncated", "empty"])
def test_run_unreadable_input(artifact, tmp_path, capsys, kind):
    image = tmp_path / "in.png"
    if kind == "text":
        image.write_text("this is not an image\n")
    elif kind == "empty":
        image.write_bytes(b"")
    else:
        write_image(image, size=(64, 64))
        data = image.read_bytes()
        image.write_bytes(data[: len(data) // 2])
    before = snapshot(tmp_path)
    rc = main(["run", str(artifact), str(image), "-o", str(tmp_path / "out.png")])
    user_error(rc, capsys, "in.png")
    assert snapshot(tmp_path) == before  # input untouched, no output, no temporary file


def test_run_missing_input(artifact, tmp_path, capsys):
    rc = main(["run", str(artifact), str(tmp_path / "nope.png"), "-o", str(tmp_path / "out.png")])
    user_error(rc, capsys, "nope.png", "does not exist")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("size", [(5, 1), (1, 5), (1, 1)])
def test_run_image_smaller_than_the_model_accepts(artifact, tmp_path, capsys, size):
    manifest = json.loads((artifact / "manifest.json").read_text())
    minimum = Processing.from_dict(manifest["processing"]).min_input_side()
    assert minimum == 2  # scale 4, size multiple 8
    image = write_image(tmp_path / "tiny.png", size=size)
    before = snapshot(tmp_path)
    rc = main(["run", str(artifact), str(image), "-o", str(tmp_path / "out.png")])
    user_error(rc, capsys, f"{size[0]}x{size[1]}", f"at least {minimum} pixels", "x4")
    assert snapshot(tmp_path) == before


def test_run_smallest_accepted_image_works(artifact, tmp_path, capsys):
    image = write_image(tmp_path / "small.png", size=(2, 3))
    out = tmp_path / "out.png"
    assert main(["run", str(artifact), str(image), "-o", str(out)]) == 0
    assert Image.open(out).size == (8, 12)


@pytest.mark.parametrize("name", ["out.txt", "out"])
def test_run_unknown_output_extension(artifact, tmp_path, capsys, name):
    image = write_image(tmp_path / "in.png")
    before = snapshot(tmp_path)
    rc = main(["run", str(artifact), str(image), "-o", str(tmp_path / name)])
    user_error(rc, capsys, name, "extension")
    assert snapshot(tmp_path) == before


def test_run_output_folder_missing(artifact, tmp_path, capsys):
    image = write_image(tmp_path / "in.png")
    rc = main(["run", str(artifact), str(image), "-o", str(tmp_path / "nope" / "out.png")])
    user_error(rc, capsys, "does not exist")
    assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize("force", [False, True])
def test_run_output_is_a_folder(artifact, tmp_path, capsys, force):
    image = write_image(tmp_path / "in.png")
    (tmp_path / "out.png").mkdir()
    (tmp_path / "out.png" / "keep.txt").write_text("keep")
    before = snapshot(tmp_path)
    rc = main(["run", str(artifact), str(image), "-o", str(tmp_path / "out.png")] + (["--force"] if force else []))
    user_error(rc, capsys, "out.png")
    assert snapshot(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png", "out.png"]


def test_run_folder_without_images(artifact, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("x")
    rc = main(["run", str(artifact), str(tmp_path / "in"), "-o", str(tmp_path / "out")])
    user_error(rc, capsys, "holds no images")
    assert not (tmp_path / "out").exists()


def test_run_folder_input_with_file_output(artifact, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    write_image(tmp_path / "in" / "a.png")
    (tmp_path / "out.png").write_bytes(b"keep")
    before = snapshot(tmp_path)
    rc = main(["run", str(artifact), str(tmp_path / "in"), "-o", str(tmp_path / "out.png")])
    user_error(rc, capsys, "out.png", "folder")
    assert snapshot(tmp_path) == before


def test_run_folder_existing_output_checked_before_any_work(artifact, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    write_image(tmp_path / "in" / "a.png")
    write_image(tmp_path / "in" / "b.png")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "b.png").write_bytes(b"earlier")
    before = snapshot(tmp_path)
    rc = main(["run", str(artifact), str(tmp_path / "in"), "-o", str(tmp_path / "out")])
    user_error(rc, capsys, "b.png", "--force")
    assert snapshot(tmp_path) == before  # a.png not written either


def test_run_folder_output_name_collision(artifact, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    write_image(tmp_path / "in" / "a.png")
    write_image(tmp_path / "in" / "a.jpg")
    rc = main(["run", str(artifact), str(tmp_path / "in"), "-o", str(tmp_path / "out")])
    user_error(rc, capsys, "a.png")


def test_run_converts_greyscale_rgba_palette_16bit(artifact, tmp_path, capsys):
    """Not errors: every mode is converted by the stated rule and upscaled."""
    folder = tmp_path / "in"
    folder.mkdir()
    write_image(folder / "grey.png", size=(6, 5), mode="L")
    write_image(folder / "rgba.png", size=(6, 5), mode="RGBA")
    write_image(folder / "palette.png", size=(6, 5), mode="P")
    Image.fromarray(np.full((5, 6), 40000, dtype=np.uint16)).save(folder / "grey16.png")
    inputs = snapshot(folder)
    assert main(["run", str(artifact), str(folder), "-o", str(tmp_path / "out")]) == 0
    assert snapshot(folder) == inputs
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["grey.png", "grey16.png", "palette.png", "rgba.png"]
    for name in names:
        with Image.open(tmp_path / "out" / name) as im:
            assert im.mode == "RGB" and im.size == (24, 20)


# --- check ----------------------------------------------------------------------------


def test_check_bad_image_fails_before_reference(artifact, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    rc = main(["check", str(artifact), str(bad), "--json", str(tmp_path / "report.json")])
    user_error(rc, capsys, "bad.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.png"]
