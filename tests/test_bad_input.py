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
    rc = main(["run", str(artifact_copy), str(image), "-o", str(tmp_path / "out.png")])
    user_error(rc, capsys, "vae_decoder.onnx", "sha256", "rebuild")
    assert not (tmp_path / "out.png").exists()
    damaged_but_shown(artifact_copy, capsys, "vae_decoder.onnx does not match its sha256")


def damaged_but_shown(artifact: Path, capsys, *words: str) -> None:
    """``inspect`` shows a damaged artifact (that is how one is diagnosed), lists each damaged
    file, and exits 1."""
    assert main(["inspect", str(artifact)]) == 1
    out, err = capsys.readouterr()
    assert out.startswith(f"artifact   {artifact}") and "components" in out
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    files = len(json.loads((artifact / "manifest.json").read_text())["files"])
    assert lines[-1].startswith(f"srexport: error: 1 of {files} files") and "rebuild" in lines[-1], err
    for word in words:
        assert word in lines[0], (word, err)


def test_artifact_file_truncated_is_refused(artifact_copy, tmp_path, capsys):
    graph = artifact_copy / "unet.onnx"
    data = graph.read_bytes()
    graph.write_bytes(data[: len(data) // 2])
    rc = main(["check", str(artifact_copy)])
    user_error(rc, capsys, "unet.onnx", "sha256")
    damaged_but_shown(artifact_copy, capsys, "unet.onnx", "sha256")


def test_artifact_file_missing(artifact_copy, tmp_path, capsys):
    (artifact_copy / "vae_encoder.onnx").unlink()
    image = write_image(tmp_path / "in.png")
    rc = main(["run", str(artifact_copy), str(image), "-o", str(tmp_path / "out.png")])
    user_error(rc, capsys, "missing vae_encoder.onnx", "rebuild")
    damaged_but_shown(artifact_copy, capsys, "vae_encoder.onnx is missing")


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


def test_run_one_image_into_an_existing_folder(artifact, tmp_path, capsys):
    """-o FOLDER for one image writes FOLDER/<name>.png, and still refuses to overwrite without --force."""
    image = write_image(tmp_path / "in.jpg")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("keep")
    assert main(["run", str(artifact), str(image), "-o", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out" / "in.png")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["in.png", "keep.txt"]
    with Image.open(tmp_path / "out" / "in.png") as im:
        assert im.size == (64, 64)
    before = snapshot(tmp_path)
    user_error(main(["run", str(artifact), str(image), "-o", str(tmp_path / "out")]), capsys, "in.png", "--force")
    assert snapshot(tmp_path) == before


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


# --- issue 17: inputs are never outputs ------------------------------------------------------


@pytest.mark.parametrize("spelling", ["same", "dot-slash", "symlink", "hardlink"])
def test_run_output_that_is_the_input_is_refused_even_with_force(artifact, tmp_path, capsys, monkeypatch, spelling):
    image = write_image(tmp_path / "photo.png")
    monkeypatch.chdir(tmp_path)
    output = {"same": "photo.png", "dot-slash": "./photo.png", "symlink": "link.png", "hardlink": "hard.png"}[spelling]
    if spelling == "symlink":
        (tmp_path / "link.png").symlink_to(image)
    if spelling == "hardlink":
        (tmp_path / "hard.png").hardlink_to(image)
    before = snapshot(tmp_path)
    rc = main(["run", str(artifact), str(image), "-o", output, "--force"])
    user_error(rc, capsys, output.lstrip("./"), "is the input", "photo.png")
    assert snapshot(tmp_path) == before  # the photo's bytes unchanged, nothing else written


@pytest.mark.parametrize("spelling", ["same", "dot", "symlink"])
def test_run_folder_output_that_is_the_input_folder_is_refused(artifact, tmp_path, capsys, monkeypatch, spelling):
    folder = tmp_path / "photos"
    folder.mkdir()
    write_image(folder / "a.png")
    write_image(folder / "b.jpg")
    (tmp_path / "alias").symlink_to(folder)
    monkeypatch.chdir(tmp_path)
    output = {"same": "photos", "dot": "./photos/.", "symlink": "alias"}[spelling]
    before = snapshot(tmp_path)
    rc = main(["run", str(artifact), "photos", "-o", output, "--force"])
    user_error(rc, capsys, "input folder", "another folder")
    assert snapshot(tmp_path) == before


# --- issue 17: manifests that point outside the artifact, or are damaged ----------------------


def edit_manifest(artifact: Path, edit) -> None:
    path = artifact / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("path", ["../elsewhere/unet.onnx", "/etc/passwd", "sub/../../unet.onnx"])
def test_manifest_path_outside_the_artifact_is_refused(artifact_copy, tmp_path, capsys, path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(artifact_copy / "unet.onnx", outside / "unet.onnx")  # a real graph, hashes matching
    edit_manifest(artifact_copy, lambda m: m["files"]["unet.onnx"].update(path=path))
    image = write_image(tmp_path / "in.png")
    for argv in (["run", str(artifact_copy), str(image), "-o", str(tmp_path / "out.png")], ["check", str(artifact_copy)],
                 ["inspect", str(artifact_copy)]):
        user_error(main(argv), capsys, repr(path), "artifact folder")
    assert not (tmp_path / "out.png").exists()


def test_manifest_path_through_a_symlink_outside_is_refused(artifact_copy, tmp_path, capsys):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.move(artifact_copy / "unet.onnx", outside / "unet.onnx")
    (artifact_copy / "unet.onnx").symlink_to(outside / "unet.onnx")
    user_error(main(["run", str(artifact_copy), str(write_image(tmp_path / "in.png")), "-o", str(tmp_path / "o.png")]),
               capsys, "'unet.onnx'", "leaves the artifact folder")


def test_onnx_external_data_outside_the_artifact_is_refused(artifact_copy, tmp_path, capsys):
    import onnx

    from srexport.artifact.manifest import sha256_of

    graph = artifact_copy / "vae_decoder.onnx"
    onnx.save_model(onnx.load(str(graph)), str(graph), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    (tmp_path / "elsewhere").mkdir()
    shutil.move(artifact_copy / "weights.bin", tmp_path / "elsewhere" / "weights.bin")
    model = onnx.load(str(graph), load_external_data=False)  # onnx itself refuses to write '..' locations
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../elsewhere/weights.bin"
    onnx.save_model(model, str(graph))
    edit_manifest(artifact_copy, lambda m: m["files"]["vae_decoder.onnx"].update(
        sha256=sha256_of(graph), bytes=graph.stat().st_size))
    rc = main(["run", str(artifact_copy), str(write_image(tmp_path / "in.png")), "-o", str(tmp_path / "out.png")])
    user_error(rc, capsys, "vae_decoder.onnx", "'../elsewhere/weights.bin'", "outside the artifact folder")
    assert not (tmp_path / "out.png").exists()


DAMAGES = {
    "components.unet": (lambda m: m["components"].pop("unet"), "field components.unet is missing"),
    "files[unet.onnx]": (lambda m: m["files"].pop("unet.onnx"), "field files.unet.onnx is missing"),
    "denoise": (lambda m: m.pop("denoise"), "field denoise is missing"),
    "processing.scale": (lambda m: m["processing"].update(scale="four"), "field processing.scale: 'four' is not of type"),
    "tiling.tile": (lambda m: m["tiling"].update(tile=-5), "field tiling.tile: -5 is less than the minimum of 64"),
    "format_version": (lambda m: m.update(format_version="1"), "format_version '1'"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_manifest_is_one_line_naming_the_field(artifact_copy, tmp_path, capsys, damage):
    edit, words = DAMAGES[damage]
    edit_manifest(artifact_copy, edit)
    image = write_image(tmp_path / "in.png")
    for argv in (["run", str(artifact_copy), str(image), "-o", str(tmp_path / "out.png")], ["check", str(artifact_copy)],
                 ["bench", str(artifact_copy), "--iters", "1"], ["inspect", str(artifact_copy)]):
        user_error(main(argv), capsys, words, "manifest.json")
    assert not (tmp_path / "out.png").exists()


def test_written_manifests_are_valid_and_schema_refuses_what_readers_would(artifact):
    import jsonschema

    from srexport.artifact.manifest import manifest_schema, validate_manifest
    from srexport.errors import UserError

    manifest = json.loads((artifact / "manifest.json").read_text())
    jsonschema.Draft202012Validator.check_schema(manifest_schema())
    validate_manifest(manifest)  # what the build wrote passes
    broken = copy.deepcopy(manifest)
    broken["files"]["unet.onnx"]["sha256"] = "not-a-hash"
    with pytest.raises(UserError, match="files.unet.onnx.sha256"):
        validate_manifest(broken)


# --- issue 17: interrupted, killed and read-only builds and runs --------------------------------


def test_sigterm_during_build_leaves_nothing(tmp_path):
    import signal
    import time

    out = tmp_path / "art"
    proc = subprocess.Popen([sys.executable, "-m", "srexport.cli", "build", "--process-size", "128", "--precision",
                             "fp32", "--out", str(out)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".art.building-*")) and time.monotonic() < deadline:  # wait until it writes
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "srexport: terminated; nothing was written"
    assert_nothing_built(out)


def test_stale_folder_of_a_killed_build_is_removed_and_a_live_one_kept(tmp_path):
    from srexport.artifact.manifest import atomic_folder

    dead = tmp_path / ".art.building-dead"
    dead.mkdir()
    (dead / "unet.onnx").write_bytes(b"half")
    (dead / ".srexport-build-pid").write_text("999999999")  # no such process
    legacy = tmp_path / ".art.building-legacy"  # before the pid file: nothing says it is alive
    legacy.mkdir()
    live = tmp_path / ".art.building-live"
    live.mkdir()
    (live / ".srexport-build-pid").write_text(str(subprocess.os.getpid()))
    notes = []
    with atomic_folder(tmp_path / "art", note=notes.append) as tmp:
        (tmp / "manifest.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".art.building-live", "art"]
    assert sorted(p.name for p in (tmp_path / "art").iterdir()) == ["manifest.json"]  # no pid file left in it
    assert len(notes) == 1 and "removed 2 temporary folder(s) left by a killed build" in notes[0]


@pytest.fixture
def read_only_folder(tmp_path):
    """A read-only file system (a tmpfs mounted ro; needs root, as on CI) or, failing that, a folder
    without write permission (which root ignores: then skip)."""
    import os

    folder = tmp_path / "ro"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0
    if not mounted:
        folder.chmod(0o555)
        if os.access(folder, os.W_OK):
            pytest.skip("cannot make a read-only folder here (not root for mount, root for chmod)")
    yield folder
    if mounted:
        subprocess.run(["umount", str(folder)], check=True)
    else:
        folder.chmod(0o755)


def test_read_only_output_location_fails_before_any_work(artifact, tmp_path, capsys, read_only_folder):
    image = write_image(tmp_path / "in.png")
    for argv, label in ((["build", "--out", str(read_only_folder / "A"), "--quiet"], "--out"),
                        (["run", str(artifact), str(image), "-o", str(read_only_folder / "x.png")], "-o"),
                        (["run", str(artifact), str(tmp_path), "-o", str(read_only_folder / "out")], "-o")):
        user_error(main(argv), capsys, label, "cannot write in", str(read_only_folder), "writable location")
    assert list(read_only_folder.iterdir()) == []


# --- issue 17: folder runs go on past bad files -------------------------------------------------


def test_folder_run_processes_good_files_and_lists_each_bad_one(artifact, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    write_image(folder / "a.png", size=(12, 10))
    write_image(folder / "d.png", size=(9, 7))
    write_image(folder / "tiny.png", size=(1, 1))
    (folder / "text.png").write_text("not an image")
    (folder / "empty.png").write_bytes(b"")
    inputs = snapshot(folder)
    rc = main(["run", str(artifact), str(folder), "-o", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert rc == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if "image/s" not in line and line.strip()]  # not the progress bar
    assert len(lines) == 4, err
    assert all(line.startswith("srexport: error: ") for line in lines)
    for name, words in (("empty.png", "not an image"), ("text.png", "not an image"), ("tiny.png", "1x1")):
        assert any(name in line and words in line for line in lines[:3]), (name, err)
    assert lines[3] == f"srexport: error: 3 of 5 images failed (listed above); 2 written to {tmp_path / 'out'}"
    assert out.strip() == f"2 of 5 images written to {tmp_path / 'out'}"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "d.png"]
    with Image.open(tmp_path / "out" / "d.png") as im:
        assert im.size == (36, 28)
    assert snapshot(folder) == inputs


# --- issue 17: options of the other model, flags validated up front -----------------------------


@pytest.mark.parametrize("model,flag,value,owner", [
    ("pisa-sr", "--degradation", "0.3,0.1", "s3diff"), ("pisa-sr", "--cfg-scale", "1.5", "s3diff"),
    ("s3diff", "--guidance", "exact", "pisa-sr"), ("s3diff", "--lambda-pix", "0.8", "pisa-sr"),
    ("s3diff", "--lambda-sem", "0.5", "pisa-sr"), ("s3diff", "--process-size", "256", "pisa-sr"),
])
def test_build_refuses_the_other_models_options(tmp_path, capsys, model, flag, value, owner):
    out = tmp_path / "art"
    rc = main(["build", "--model", model, flag, value, "--out", str(out), "--quiet"])
    user_error(rc, capsys, flag, f"--model {owner}", f"drop {flag}")
    assert_nothing_built(out)


@pytest.mark.parametrize("argv", [["--threads", "-1"], ["--threads", "0"], ["--threads", "1000"]])
def test_run_threads_out_of_range(artifact, tmp_path, capsys, argv):
    image = write_image(tmp_path / "in.png")
    before = snapshot(tmp_path)
    user_error(main(["run", str(artifact), str(image), "-o", str(tmp_path / "o.png"), *argv]), capsys,
               f"--threads {argv[1]}", "use 1 to")
    user_error(main(["bench", str(artifact), *argv]), capsys, f"--threads {argv[1]}", "use 1 to")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("case", ["calib-empty", "out-is-a-file", "tile-too-large"])
def test_build_flags_checked_before_any_export(tmp_path, capsys, case):
    import time

    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("keep")
    argv, words, out = {
        "calib-empty": (["--precision", "int8", "--calib", str(tmp_path / "empty")], ("--calib", "holds no images"),
                        tmp_path / "art"),
        "out-is-a-file": (["--force"], ("exists and is not a folder",), tmp_path / "file"),
        "tile-too-large": (["--tile", "65536"], ("--tile 65536", "at most 2048"), tmp_path / "art"),
    }[case]
    before = snapshot(tmp_path)
    t = time.perf_counter()
    user_error(main(["build", "--out", str(out), "--quiet", *argv]), capsys, *words)
    assert time.perf_counter() - t < 5  # refused before the model loads and exports (that takes 20 s and more)
    assert snapshot(tmp_path) == before
    if out.name == "art":
        assert_nothing_built(out)


def test_vae_batch_is_bounded_by_the_denoiser_batch():
    from srexport.artifact.tile_settings import TilingSettings

    assert TilingSettings(tile=2048, batch=4, vae_tile=64, vae_overlap=16).validate().vae_batch == 4  # not 4096
    assert TilingSettings().vae_batch == 1


def test_outputs_follow_the_umask(artifact, tmp_path, capsys):
    import os

    old = os.umask(0o022)
    try:
        image = write_image(tmp_path / "in.png")
        assert main(["run", str(artifact), str(image), "-o", str(tmp_path / "out.png")]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "out.png").stat().st_mode & 0o777 == 0o644


def test_build_steps_print_their_own_durations(capsys):
    from srexport.export.build import Progress

    progress = Progress(2)
    progress("first")
    progress("second")
    progress.done()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "[1/2] first" and lines[2] == "[2/2] second"  # no time on a step's first line
    assert lines[1].startswith("      step 1 took ") and lines[3].startswith("      step 2 took ")
    assert lines[4].startswith("      done in ")


def test_inspect_says_dynamic_for_estimated_degradation(artifact):
    from srexport.describe import describe_manifest
    from srexport.artifact.manifest import load_artifact

    art = load_artifact(artifact)
    art.manifest["model"] = dict(art.manifest["model"], kind="s3diff",
                                 settings={"degradation": None, "cfg_scale": 1.07, "color_fix": "wavelet", "scale": 4})
    text = describe_manifest(art)
    assert "degradation=dynamic" in text and "None" not in text.split("settings")[1].splitlines()[0]


def test_compare_image_help_says_one_picture(capsys):
    with pytest.raises(SystemExit):
        main(["check", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "write one side-by-side picture with a row per checked image" in help_text


# --- the manifest's format versions -------------------------------------------------------------


@pytest.mark.parametrize("name", ["manifest_v1_pisa_demo.json", "manifest_v1_s3diff_demo.json"])
def test_a_v1_manifest_loads_through_the_migration(tmp_path, name):
    """Manifests written by the demo builds of format version 1 (committed as they were)."""
    from srexport.artifact.manifest import FORMAT_VERSION, read_manifest
    from srexport.artifact.tile_settings import TilingSettings

    v1_text = (Path(__file__).parent / "data" / name).read_text()
    v1 = json.loads(v1_text)
    assert v1["format_version"] == 1 and "reasoning" in v1["tiling"]
    (tmp_path / "manifest.json").write_text(v1_text)
    manifest = read_manifest(tmp_path)  # schema-validated as the current version
    assert manifest["format_version"] == FORMAT_VERSION == 2
    assert (tmp_path / "manifest.json").read_text() == v1_text  # the folder is not touched
    tiling = manifest["tiling"]
    for prose in ("unit", "origins", "short_sides", "per_image_inputs", "reasoning"):
        assert prose not in tiling and v1["tiling"][prose] in tiling["description"]
    assert "formula" not in tiling["blend"] and "norm_method" not in tiling["vae"]
    assert TilingSettings.from_manifest(tiling) == TilingSettings(  # what the v1 demo ran with
        tile=512, overlap=128, batch=4, vae_tile=1024, vae_overlap=256, vae_norm="per-tile", plan="fixed",
        unet_norm="per-tile", untiled_max_megapixels=2.1)
    assert tiling["plan"] == "fixed"  # the only layout before --tile-plan
    assert manifest["export"]["cleanup"] == "onnxslim" and "2 GB" in manifest["export"]["description"]
    if "schedule" in v1:
        assert "step" not in manifest["schedule"] and v1["schedule"]["step"] in manifest["schedule"]["description"]
        assert "form" not in manifest["model"]["lora"]
    stages = {name: c["spec"]["stage"] for name, c in manifest["components"].items()}
    assert stages == {**({"degradation": "degradation"} if "degradation" in stages else {}),
                      "vae_encoder": "encode", "unet": "denoise", "vae_decoder": "decode"}
    for name, component in manifest["components"].items():  # the spec otherwise as it was
        assert {k: v for k, v in component["spec"].items() if k != "stage"} == v1["components"][name]["spec"]
    if v1["model"]["kind"] == "s3diff":  # its cfg was a constant in the UNet graph
        assert manifest["guidance"] == dict(v1["guidance"], cfg_input=None)
    else:  # a PiSA-SR artifact runs the scales it was built with; exact ones any
        settings = v1["model"]["settings"]
        assert manifest["guidance"]["built"] == settings["guidance"]
        assert (manifest["guidance"]["lambda_pix"], manifest["guidance"]["lambda_sem"]) == (
            settings["lambda_pix"], settings["lambda_sem"])
        assert manifest["guidance"]["per_call_scales"] == (settings["guidance"] == "exact")
    machine = {k: v for k, v in v1.items()
               if k not in ("format_version", "tiling", "export", "schedule", "model", "components", "guidance")}
    assert {k: manifest[k] for k in machine} == machine  # everything else as it was


def test_a_v1_manifest_from_before_bounds_precision_and_pad_gets_the_values_it_ran_with(tmp_path):
    """The first artifacts had no checks.bounds, export.precision, tiling.pad, untiled limit or
    VAE tiling section: the migration fills in what srexport then did, and readers find them."""
    from srexport.artifact.manifest import read_manifest
    from srexport.artifact.tile_settings import TilingSettings

    v1 = json.loads((Path(__file__).parent / "data" / "manifest_v1_pisa_demo.json").read_text())
    del v1["checks"]["bounds"], v1["export"]["precision"], v1["export"]["io_dtype"]
    for key in ("pad", "untiled_max_megapixels", "vae"):
        del v1["tiling"][key]
    (tmp_path / "manifest.json").write_text(json.dumps(v1))
    manifest = read_manifest(tmp_path)
    assert manifest["export"]["precision"] == "fp32" and manifest["checks"]["bounds"] == {
        "component_max_abs": 1e-3, "component_rel_l2": None, "end_to_end_min_psnr": 50.0, "precision": "fp32"}
    settings = TilingSettings.from_manifest(manifest["tiling"])
    assert (settings.vae_tile, settings.vae_overlap, settings.pad, settings.vae_norm,
            settings.untiled_max_megapixels) == (512, 128, False, "per-tile", 2.1)


def test_the_schema_names_the_registries_choices():
    from srexport.artifact.manifest import manifest_schema
    from srexport.artifact.precisions import GRAPH_PRECISIONS
    from srexport.artifact.specs import STAGES
    from srexport.artifact.tile_settings import VAE_NORMS

    schema = manifest_schema()
    assert schema["properties"]["tiling"]["properties"]["vae"]["properties"]["norm"]["enum"] == list(VAE_NORMS)
    assert schema["properties"]["checks"]["properties"]["bounds"]["properties"]["precision"]["enum"] == list(
        GRAPH_PRECISIONS)
    assert schema["$defs"]["component_spec"]["properties"]["stage"]["enum"] == list(STAGES)


def test_current_builds_write_the_current_version(artifact):
    from srexport.artifact.manifest import FORMAT_VERSION

    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    assert "reasoning" not in manifest["tiling"] and "description" in manifest["tiling"]


@pytest.mark.parametrize("version", [0, 3, "2", True, None])
def test_unknown_format_version_is_refused(artifact_copy, capsys, version):
    edit_manifest(artifact_copy, lambda m: m.update(format_version=version))
    user_error(main(["inspect", str(artifact_copy)]), capsys, f"format_version {version!r}", "reads 1, 2", "rebuild")


def test_inspect_schema_prints_the_schema_it_validates_with(capsys):
    from srexport.artifact.manifest import manifest_schema

    assert main(["inspect", "--schema"]) == 0
    assert json.loads(capsys.readouterr().out) == manifest_schema()
