"""Decoding what clinics send: every readable case gives a correct tensor, every bad one a typed error."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.imaging import DecodeError, decode_image

SIZE = (24, 32)  # (height, width)


def _encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


def _solid(mode: str, color: object, size: tuple[int, int] = (64, 48)) -> Image.Image:
    return Image.new(mode, size, color)  # type: ignore[arg-type]


def _assert_tensor(array: np.ndarray, rgb: tuple[int, int, int], tol: float = 6.0) -> None:
    assert array.dtype == np.float32
    assert array.shape == (*SIZE, 3)
    assert array.min() >= 0.0 and array.max() <= 255.0
    np.testing.assert_allclose(array.reshape(-1, 3).mean(axis=0), rgb, atol=tol)


@pytest.mark.parametrize(
    ("name", "data", "expected"),
    [
        ("jpeg", lambda: _encode(_solid("RGB", (200, 40, 60)), "JPEG", quality=95), (200, 40, 60)),
        ("png", lambda: _encode(_solid("RGB", (10, 200, 30)), "PNG"), (10, 200, 30)),
        ("png with alpha composited on white",
         lambda: _encode(_solid("RGBA", (0, 0, 0, 0)), "PNG"), (255, 255, 255)),
        ("grayscale", lambda: _encode(_solid("L", 90), "PNG"), (90, 90, 90)),
        ("palette", lambda: _encode(_solid("RGB", (30, 60, 220)).convert("P"), "PNG"),
         (30, 60, 220)),
        ("cmyk jpeg", lambda: _encode(_solid("CMYK", (0, 255, 255, 0)), "JPEG", quality=95),
         (255, 0, 0)),
        ("16-bit grayscale", lambda: _encode(_solid("I;16", 32768), "PNG"), (127.5, 127.5, 127.5)),
        ("tiff", lambda: _encode(_solid("RGB", (120, 130, 140)), "TIFF"), (120, 130, 140)),
        ("bmp", lambda: _encode(_solid("RGB", (250, 5, 5)), "BMP"), (250, 5, 5)),
        ("webp", lambda: _encode(_solid("RGB", (60, 160, 90)), "WEBP", lossless=True),
         (60, 160, 90)),
    ],
)
def test_every_supported_format_decodes_to_a_correct_float_tensor(
        name: str, data: object, expected: tuple[int, int, int]) -> None:
    payload = data()  # type: ignore[operator]
    _assert_tensor(decode_image(payload, SIZE), expected)


def test_large_jpeg_decodes_at_reduced_scale_to_the_same_picture(tmp_path: Path) -> None:
    gradient = np.tile(np.linspace(0, 255, 2000, dtype=np.uint8), (1500, 1))
    big = Image.fromarray(np.stack([gradient, gradient[:, ::-1], gradient // 2], -1))
    path = tmp_path / "camera.jpg"
    big.save(path, quality=90)
    array = decode_image(path, SIZE)
    assert array.shape == (*SIZE, 3)
    # left edge dark in red, bright in green; right edge the reverse
    assert array[:, 0, 0].mean() < 30 and array[:, -1, 0].mean() > 225
    assert array[:, 0, 1].mean() > 225 and array[:, -1, 1].mean() < 30


def test_exif_rotation_is_applied() -> None:
    # left half red, right half blue, stored with "rotate 90 CW to display" (orientation 6)
    pixels = np.zeros((40, 80, 3), np.uint8)
    pixels[:, :40] = (255, 0, 0)
    pixels[:, 40:] = (0, 0, 255)
    image = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = 6
    array = decode_image(_encode(image, "JPEG", quality=95, exif=exif.tobytes()), (80, 40))
    # displayed upright it is 40 wide and 80 tall, red on top, blue at the bottom
    assert array[:30, :, 0].mean() > 200 and array[:30, :, 2].mean() < 50
    assert array[-30:, :, 2].mean() > 200 and array[-30:, :, 0].mean() < 50


def _bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming a huge canvas, with a tiny compressed body."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + chunk(b"IEND", b""))


@pytest.mark.parametrize(
    ("name", "payload", "reason"),
    [
        ("zero bytes", b"", "empty"),
        ("not an image", b"%PDF-1.4 this is a letter, not a lesion", "not an image"),
        ("truncated jpeg",
         _encode(Image.effect_noise((256, 256), 64).convert("RGB"), "JPEG")[:600], "truncated"),
        ("decompression bomb", _bomb_png(20_000, 20_000), "too many pixels"),
    ],
)
def test_unreadable_input_raises_the_typed_error_with_a_reason(
        name: str, payload: bytes, reason: str, tmp_path: Path) -> None:
    with pytest.raises(DecodeError) as from_bytes:
        decode_image(payload, SIZE)
    assert reason in from_bytes.value.reason
    path = tmp_path / "file.jpg"
    path.write_bytes(payload)
    with pytest.raises(DecodeError) as from_file:
        decode_image(path, SIZE)
    assert reason in from_file.value.reason


def test_a_missing_file_raises_the_typed_error(tmp_path: Path) -> None:
    with pytest.raises(DecodeError, match="cannot read"):
        decode_image(tmp_path / "gone.jpg", SIZE)
