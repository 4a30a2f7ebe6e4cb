"""Image reading and writing (runtime/images.py): the stated conversion rule
for every mode, unreadable files as UserError, atomic writes."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from srexport.errors import UserError
from srexport.runtime.images import check_output_path, list_images, load_image, save_image


def _check_tensor(t: torch.Tensor, h: int, w: int) -> None:
    assert isinstance(t, torch.Tensor)
    assert t.dtype == torch.float32
    assert tuple(t.shape) == (1, 3, h, w)
    assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0


def _same_in_all_channels(t: torch.Tensor) -> None:
    assert torch.equal(t[0, 0], t[0, 1]) and torch.equal(t[0, 0], t[0, 2])


# --- the conversion rule, mode by mode ---------------------------------------------


def test_rgb_as_is(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "rgb.png")
    t = load_image(tmp_path / "rgb.png")
    _check_tensor(t, 5, 7)
    expected = torch.from_numpy(array.astype(np.float32) / 255.0).permute(2, 0, 1)
    assert torch.allclose(t[0], expected, atol=1e-7)


def test_greyscale_L_replicated_to_three_channels(tmp_path):
    array = np.array([[0, 128, 255], [1, 64, 200]], dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "grey.png")
    t = load_image(tmp_path / "grey.png")
    _check_tensor(t, 2, 3)
    _same_in_all_channels(t)
    assert torch.allclose(t[0, 0], torch.from_numpy(array.astype(np.float32) / 255.0), atol=1e-7)
    assert t[0, 1, 0, 1].item() == pytest.approx(128 / 255)


def test_LA_alpha_discarded(tmp_path):
    Image.new("LA", (4, 3), (128, 0)).save(tmp_path / "la.png")
    t = load_image(tmp_path / "la.png")
    _check_tensor(t, 3, 4)
    assert torch.allclose(t, torch.full_like(t, 128 / 255))


def test_RGBA_alpha_discarded_rgb_unchanged(tmp_path):
    array = np.zeros((3, 4, 4), dtype=np.uint8)
    array[..., 0], array[..., 1], array[..., 2] = 10, 20, 200
    array[..., 3] = [[0, 50, 128, 255]] * 3  # fully transparent to opaque: no premultiplication
    Image.fromarray(array, "RGBA").save(tmp_path / "rgba.png")
    t = load_image(tmp_path / "rgba.png")
    _check_tensor(t, 3, 4)
    for c, v in enumerate((10, 20, 200)):
        assert torch.allclose(t[0, c], torch.full((3, 4), v / 255.0))


def test_palette_through_its_palette(tmp_path):
    p = Image.new("P", (4, 2), 0)
    p.putpalette([10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6))
    p.putpixel((1, 0), 1)
    p.info["transparency"] = 1  # a transparent palette entry keeps its colour
    p.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    t = load_image(tmp_path / "p.png")
    _check_tensor(t, 2, 4)
    assert torch.allclose(t[0, :, 0, 0] * 255, torch.tensor([10.0, 20.0, 30.0]), atol=1e-4)
    assert torch.allclose(t[0, :, 0, 1] * 255, torch.tensor([200.0, 100.0, 50.0]), atol=1e-4)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_grey_scaled_by_1_over_65535(tmp_path, suffix):
    array = np.array([[0, 65535, 32768, 1000]] * 2, dtype=np.uint16)
    path = tmp_path / f"grey16{suffix}"
    Image.fromarray(array).save(path)
    assert Image.open(path).mode in ("I;16", "I;16B", "I;16L", "I")
    t = load_image(path)
    _check_tensor(t, 2, 4)
    _same_in_all_channels(t)
    assert t[0, 0, 0, 1].item() == 1.0
    assert t[0, 0, 0, 0].item() == 0.0
    assert torch.allclose(t[0, 0, 0], torch.tensor([0.0, 1.0, 32768 / 65535, 1000 / 65535]), atol=1e-7)


def test_32bit_integer_grey_scaled_and_clipped(tmp_path):
    array = np.array([[0, 32768, 131070]], dtype=np.int32)
    Image.fromarray(array).save(tmp_path / "i32.tif")
    assert Image.open(tmp_path / "i32.tif").mode == "I"
    t = load_image(tmp_path / "i32.tif")
    _check_tensor(t, 1, 3)
    assert torch.allclose(t[0, 1, 0], torch.tensor([0.0, 32768 / 65535, 1.0]), atol=1e-7)


def test_float_grey_clipped(tmp_path):
    Image.fromarray(np.array([[-1.0, 0.25, 2.0]], dtype=np.float32)).save(tmp_path / "f.tif")
    t = load_image(tmp_path / "f.tif")
    _check_tensor(t, 1, 3)
    assert torch.allclose(t[0, 2, 0], torch.tensor([0.0, 0.25, 1.0]))


def test_16bit_rgb_png_read_as_8bit(tmp_path):
    # Pillow has no 16-bit RGB mode: write the PNG by hand (bit depth 16, colour type 2).
    raw = np.array([[[65535, 0, 32896]] * 3] * 2, dtype=">u2")
    h, w = raw.shape[:2]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    scanlines = b"".join(b"\x00" + raw[y].tobytes() for y in range(h))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(scanlines)) + chunk(b"IEND", b""))
    (tmp_path / "rgb16.png").write_bytes(png)
    t = load_image(tmp_path / "rgb16.png")
    _check_tensor(t, 2, 3)
    assert torch.allclose(t[0, :, 0, 0] * 255, torch.tensor([255.0, 0.0, 128.0]), atol=1e-4)


def test_1bit(tmp_path):
    img = Image.new("1", (4, 2), 0)
    img.putpixel((2, 1), 1)
    img.save(tmp_path / "b.png")
    t = load_image(tmp_path / "b.png")
    _check_tensor(t, 2, 4)
    _same_in_all_channels(t)
    assert t[0, 0, 1, 2].item() == 1.0
    assert float(t.sum()) == 3.0  # one white pixel, three channels


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    t = load_image(tmp_path / "cmyk.jpg")
    _check_tensor(t, 8, 8)
    assert torch.allclose(t[0, :, 4, 4], torch.tensor([1.0, 0.0, 0.0]), atol=3 / 255)  # red


@pytest.mark.parametrize("suffix", [".jpg", ".bmp", ".webp"])
def test_other_formats(tmp_path, suffix):
    Image.new("RGB", (6, 4), (200, 100, 50)).save(tmp_path / f"x{suffix}", **({"lossless": True} if suffix == ".webp" else {}))
    t = load_image(tmp_path / f"x{suffix}")
    _check_tensor(t, 4, 6)
    assert torch.allclose(t[0, :, 2, 3] * 255, torch.tensor([200.0, 100.0, 50.0]), atol=3)


# --- unreadable inputs ----------------------------------------------------------------


def _one_line(e: UserError) -> str:
    message = str(e)
    assert message and "\n" not in message
    return message


def test_truncated_png(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as e:
        load_image(tmp_path / "cut.png")
    assert "cut.png" in _one_line(e.value) and "truncated" in str(e.value)


def test_truncated_jpeg(tmp_path):
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as e:
        load_image(tmp_path / "cut.jpg")
    assert "cut.jpg" in _one_line(e.value)


@pytest.mark.parametrize("content", [b"hello, I am text\n", b"", b"\x89PNG\r\n\x1a\n"])
def test_not_an_image(tmp_path, content):
    (tmp_path / "fake.png").write_bytes(content)
    with pytest.raises(UserError) as e:
        load_image(tmp_path / "fake.png")
    assert "fake.png" in _one_line(e.value)


def test_missing_input(tmp_path):
    with pytest.raises(UserError) as e:
        load_image(tmp_path / "nope.png")
    assert "does not exist" in _one_line(e.value)


def test_folder_as_input_is_refused(tmp_path):
    (tmp_path / "d.png").mkdir()
    with pytest.raises(UserError):
        load_image(tmp_path / "d.png")


# --- writing --------------------------------------------------------------------------


def test_save_image_round_trips_and_leaves_no_temp(tmp_path):
    torch.manual_seed(0)
    image = torch.rand(1, 3, 9, 13)
    out = save_image(image, tmp_path / "out.png")
    assert out == tmp_path / "out.png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]
    back = load_image(out)
    assert back.shape == image.shape
    assert float((back - image).abs().max()) <= 0.5 / 255 + 1e-6


def test_save_image_clamps(tmp_path):
    image = torch.tensor([-1.0, 0.5, 2.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2).contiguous()
    back = load_image(save_image(image, tmp_path / "c.png"))
    assert torch.allclose(back[0, :, 0, 0], torch.tensor([0.0, 128 / 255, 1.0]))


def test_save_image_overwrite_is_atomic(tmp_path, monkeypatch):
    """A write that fails half-way leaves the old file intact and no temporary file."""
    target = tmp_path / "out.png"
    target.write_bytes(b"old contents")

    def broken_save(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError):
        save_image(torch.zeros(1, 3, 4, 4), target)
    assert target.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


@pytest.mark.parametrize("suffix", [".jpg", ".JPEG", ".bmp", ".tif", ".webp"])
def test_save_other_formats(tmp_path, suffix):
    save_image(torch.full((1, 3, 4, 4), 0.5), tmp_path / f"o{suffix}")
    assert [p.name for p in tmp_path.iterdir()] == [f"o{suffix}"]
    assert load_image(tmp_path / f"o{suffix}").shape == (1, 3, 4, 4)


@pytest.mark.parametrize("name", ["out.txt", "out", "out.gif", "out.png.tmp"])
def test_unknown_output_extension(tmp_path, name):
    with pytest.raises(UserError) as e:
        check_output_path(tmp_path / name, force=False)
    assert "extension" in _one_line(e.value)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(tmp_path):
    (tmp_path / "o.png").write_bytes(b"keep")
    with pytest.raises(UserError) as e:
        check_output_path(tmp_path / "o.png", force=False)
    assert "--force" in _one_line(e.value)
    assert check_output_path(tmp_path / "o.png", force=True) == tmp_path / "o.png"
    assert (tmp_path / "o.png").read_bytes() == b"keep"


def test_output_that_is_a_folder(tmp_path):
    (tmp_path / "o.png").mkdir()
    for force in (False, True):
        with pytest.raises(UserError):
            check_output_path(tmp_path / "o.png", force=force)


def test_output_folder_missing(tmp_path):
    with pytest.raises(UserError) as e:
        check_output_path(tmp_path / "nope" / "o.png", force=False)
    assert "does not exist" in _one_line(e.value)


def test_list_images(tmp_path):
    for name in ("b.PNG", "a.jpg", "c.txt", "d.webp"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG", "d.webp"]
