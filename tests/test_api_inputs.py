"""The Python API's input contract (``SRPipeline.__call__`` / ``upscale`` / ``run_stages``), the
greyscale output rule, and no ``assert`` used as a check anywhere in src/.

Bad inputs are refused before any network runs, so those cases cost nothing; the
rest run the session's fp32 demo artifact through onnxruntime at small sizes.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from srexport.cli import main
from srexport.errors import UserError

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def pipeline(demo_artifact):
    from srexport.runtime.loading import load_pipeline

    return load_pipeline(demo_artifact, "ort")


@pytest.fixture(scope="module")
def grey_lr():
    """A 24x32 greyscale crop of the sample (Pillow's L of it), replicated as images.py reads L."""
    from srexport.runtime.images import pil_to_tensor, tensor_to_pil
    from srexport.samples import sample_image

    grey = tensor_to_pil(sample_image()[..., 8:32, 4:36]).convert("L")
    return grey, pil_to_tensor(grey)


def _rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


# --- no assert as a check ------------------------------------------------------------


def test_no_assert_statements_in_src():
    """``python -O`` strips asserts: every check in the package must be an explicit raise."""
    found = [f"{path.relative_to(SRC)}:{node.lineno}"
             for path in sorted(SRC.rglob("*.py"))
             for node in ast.walk(ast.parse(path.read_text(), filename=str(path)))
             if isinstance(node, ast.Assert)]
    assert found == [], "assert statements in src/: " + ", ".join(found)


def test_input_checks_hold_under_python_O(demo_artifact):
    code = ("import json, sys, torch\n"
            "from srexport.processing import Processing\n"
            "from srexport.runtime.pipeline import as_lr_tensor\n"
            "p = Processing.from_dict(json.load(open(sys.argv[1]))['processing'])\n"
            "try:\n"
            "    as_lr_tensor(torch.rand(3, 32, 32), p)\n"
            "except ValueError as e:\n"
            "    print('refused:', e)\n")
    run = subprocess.run([sys.executable, "-O", "-c", code, str(demo_artifact / "manifest.json")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("refused: the image tensor has shape (3, 32, 32)"), run.stdout


# --- the input contract ------------------------------------------------------------------


def _nan():
    x = torch.rand(1, 3, 32, 32)
    x[0, 1, 5, 7] = float("nan")
    return x


def _inf():
    x = torch.rand(1, 3, 32, 32)
    x[0, 0, 0, 0] = float("inf")
    return x


# (input, the builtin class the error also is, words the one line must hold)
BAD_CALL_INPUTS = {
    "path string": ("x.png", TypeError, ["builtins.str", "pipeline.upscale", "load_image"]),
    "PIL image": (Image.new("RGB", (32, 32)), TypeError, ["PIL.Image.Image", "pipeline.upscale"]),
    "list": ([[0.5]], TypeError, ["builtins.list", "(1,3,h,w) float tensor in [0,1]"]),
    "3-D tensor": (torch.rand(3, 32, 32), ValueError, ["shape (3, 32, 32)", "lr[None]"]),
    "HxWx3 tensor": (torch.rand(32, 32, 3), ValueError, ["shape (32, 32, 3)", "lr.permute(2, 0, 1)[None]"]),
    "uint8 tensor": (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), TypeError, ["torch.uint8", "lr.float() / 255"]),
    "int64 tensor": (torch.zeros(1, 3, 32, 32, dtype=torch.int64), TypeError, ["torch.int64", "float tensor"]),
    "one channel": (torch.rand(1, 1, 32, 32), ValueError, ["shape (1, 1, 32, 32)", "lr.expand(-1, 3, -1, -1)"]),
    "four channels": (torch.rand(1, 4, 32, 32), ValueError, ["shape (1, 4, 32, 32)", "lr[:, :3]"]),
    "channels last": (torch.rand(1, 32, 32, 3), ValueError, ["shape (1, 32, 32, 3)", "lr.permute(0, 3, 1, 2)"]),
    "batch of two": (torch.rand(2, 3, 32, 32), ValueError, ["shape (2, 3, 32, 32)", "one image per call"]),
    "empty": (torch.zeros(1, 3, 0, 0), ValueError, ["0x0 pixels", "at least 2 pixels, this model's smallest"]),
    "one pixel tall": (torch.rand(1, 3, 1, 40), ValueError, ["40x1 pixels", "at least 2 pixels"]),
    "NaN": (_nan(), ValueError, ["NaN or Inf", "torch.nan_to_num"]),
    "Inf": (_inf(), ValueError, ["NaN or Inf"]),
    "0..255 floats": (torch.rand(1, 3, 32, 32) * 255, ValueError, ["looks like 0..255", "divide by 255"]),
    "-1..1 floats": (torch.rand(1, 3, 32, 32) * 2 - 1, ValueError, ["looks like [-1,1]", "lr * 0.5 + 0.5"]),
    "far out of range": (torch.full((1, 3, 32, 32), -300.0), ValueError, ["[-300, -300]", "rescale it to [0,1]"]),
    "overshoot": (torch.rand(1, 3, 32, 32) * 1.02, ValueError, ["span [", "overshoot with lr.clamp(0, 1)"]),
    "grey HxW array": (np.zeros((32, 32), np.uint8), ValueError, ["shape (32, 32)", "np.repeat(a[..., None], 3"]),
    "RGBA array": (np.zeros((32, 32, 4), np.uint8), ValueError, ["shape (32, 32, 4)", "a[..., :3]"]),
    "CHW array": (np.zeros((3, 32, 32), np.uint8), ValueError, ["shape (3, 32, 32)", "a.transpose(1, 2, 0)"]),
    "float array": (np.zeros((32, 32, 3), np.float32), TypeError, ["float32 numpy array", "torch.from_numpy(a)"]),
    "uint16 array": (np.zeros((32, 32, 3), np.uint16), TypeError, ["uint16 numpy array", "astype(np.uint8)"]),
}


@pytest.mark.parametrize("case", list(BAD_CALL_INPUTS))
def test_bad_inputs_are_refused_in_one_line(pipeline, case):
    value, builtin, words = BAD_CALL_INPUTS[case]
    with pytest.raises(UserError) as caught:
        pipeline(value)
    error = caught.value
    assert isinstance(error, builtin), type(error)
    text = str(error)
    assert "\n" not in text and "(1,3,h,w) float tensor in [0,1] or an HxWx3 uint8 numpy array" in text, text
    for word in words:
        assert word in text, (word, text)


def test_run_stages_and_upscale_check_too(pipeline, tmp_path):
    with pytest.raises(ValueError, match="channels-last"):
        pipeline.run_stages(torch.rand(1, 32, 32, 3))
    with pytest.raises(TypeError, match=r"upscale takes a PIL image or an image file's path.*pipeline\(lr\)"):
        pipeline.upscale(torch.rand(1, 3, 32, 32))
    with pytest.raises(UserError, match="does not exist"):
        pipeline.upscale(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="grey_output 'grey' is not one of auto, color"):
        pipeline.grey_output = "grey"
    with pytest.raises(ValueError, match="grey_output 'off' is not one of auto, color"):
        pipeline(torch.rand(1, 3, 32, 32), grey_output="off")
    assert pipeline.grey_output == "auto"


def test_accepted_inputs_and_conversions(pipeline, small_lr):
    """float64/float16 tensors are converted to float32; an HxWx3 uint8 array is divided by 255,
    strided views included; all of them give exactly what the float32 tensor gives."""
    base = pipeline(small_lr)
    assert base.dtype == torch.float32 and base.shape == (1, 3, 96, 128)
    assert torch.equal(pipeline(small_lr.double()), base)
    half = small_lr.half()
    assert torch.equal(pipeline(half), pipeline(half.float()))
    array = (small_lr[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    as_tensor = torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255
    assert torch.equal(pipeline(array), pipeline(as_tensor))
    flipped = array[:, ::-1]  # a negative-stride view, which torch.from_numpy alone refuses
    assert torch.equal(pipeline(flipped), pipeline(as_tensor.flip(-1)))


# --- greyscale in, greyscale out ---------------------------------------------------------


def test_grey_png_through_cli_gives_grey_output(demo_artifact, grey_lr, pipeline, tmp_path, capsys):
    grey, _ = grey_lr
    src = tmp_path / "grey.png"
    grey.save(src)
    auto, color = tmp_path / "auto.png", tmp_path / "color.png"
    assert main(["run", str(demo_artifact), str(src), "-o", str(auto)]) == 0
    assert main(["run", str(demo_artifact), str(src), "-o", str(color), "--grey-output", "color"]) == 0
    capsys.readouterr()
    a, c = _rgb(auto), _rgb(color)
    assert a.shape == c.shape == (96, 128, 3)
    assert np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2])
    # what the rule removes: the networks' colour cast on a grey photo
    assert np.abs(c[..., 0] - c[..., 1]).max() >= 3
    # the grey is the colour result's BT.601 luma (Pillow's "L"); rounding apart, within one level
    with Image.open(color) as image:
        luma = np.asarray(image.convert("L")).astype(np.int16)
    assert np.abs(a[..., 0] - luma).max() <= 1
    # the Python API, given the file's path, gives the CLI's pixels
    assert np.array_equal(np.asarray(pipeline.upscale(src)).astype(np.int16), a)


def test_rgb_output_is_unchanged_by_the_grey_rule(demo_artifact, small_lr, tmp_path, capsys):
    from srexport.runtime.images import save_image

    src = tmp_path / "rgb.png"
    save_image(small_lr, src)
    auto, color = tmp_path / "auto.png", tmp_path / "color.png"
    assert main(["run", str(demo_artifact), str(src), "-o", str(auto)]) == 0
    assert main(["run", str(demo_artifact), str(src), "-o", str(color), "--grey-output", "color"]) == 0
    capsys.readouterr()
    assert auto.read_bytes() == color.read_bytes()
    assert np.abs(_rgb(auto)[..., 0] - _rgb(auto)[..., 1]).max() > 10  # colour stays colour


def test_tiled_grey_input_gives_grey_output(retiled_demo, grey_lr, tmp_path):
    """The rule holds where the output is made tile by tile (runtime/regions.finish_in_place)."""
    from srexport.kernels import resize
    from srexport.runtime.loading import load_pipeline

    tiled = retiled_demo(tile=128, overlap=32, batch=2, vae_tile=128, vae_overlap=32, vae_norm="per-tile",
                         unet_norm="per-tile")
    pipeline = load_pipeline(tiled, "ort")
    lr = resize(grey_lr[1], (48, 48), "bicubic").clamp(0, 1)  # channels stay identical
    assert pipeline.will_tile(48, 48)
    out = pipeline(lr)
    assert out.shape == (1, 3, 192, 192)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])
    color = pipeline(lr, grey_output="color")
    assert (color[:, 0] - color[:, 1]).abs().max() > 2 / 255
    r, g, b = color[0]
    assert torch.allclose(out[0, 0], (0.299 * r + 0.587 * g + 0.114 * b).clamp(0, 1), atol=1e-6)
    # run_stages is the networks' output, for parity: no grey rule there
    assert torch.equal(pipeline.run_stages(lr).tensors["output"], color)
