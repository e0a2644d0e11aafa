"""Decoding what clinics send: every readable case gives a correct tensor, every bad one a typed error."""

from __future__ import annotations

import contextlib
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


def _png_with_chunk(kind: bytes, payload: bytes) -> bytes:
    """A valid 64x64 PNG with one extra ancillary chunk before the image data."""
    png = _encode(_solid("RGB", (200, 120, 100), (64, 64)), "PNG")
    signature, rest = png[:8], png[8:]
    header_end = 12 + struct.unpack(">I", rest[:4])[0]
    body = kind + payload
    chunk = struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
    return signature + rest[:header_end] + chunk + rest[header_end:]


@pytest.mark.parametrize("kind", [b"iCCP", b"zTXt"])
def test_a_chunk_that_inflates_to_50_mb_is_a_rejection_with_a_reason(kind: bytes) -> None:
    bomb = zlib.compress(b"\0" * 50_000_000, 9)
    data = _png_with_chunk(kind, (b"icc\0\0" if kind == b"iCCP" else b"Comment\0\0") + bomb)
    with pytest.raises(DecodeError) as error:
        decode_image(data, SIZE)
    assert "too large" in error.value.reason and "\n" not in error.value.reason


def test_mutated_images_never_raise_anything_but_a_decode_error() -> None:
    from model.architectures import build_melanonet
    from model.card import ModelCard, card_path_for
    from model.data import ISIC_CLASSES
    from model.inference import Classifier, Prediction

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)
    originals = [_encode(Image.fromarray(pixels), fmt, **options) for fmt, options in [
        ("JPEG", {"quality": 80}), ("PNG", {}), ("TIFF", {"compression": "tiff_deflate"}),
        ("GIF", {}), ("BMP", {}), ("WEBP", {"quality": 70})]]
    mutants: list[bytes] = []
    for original in originals:
        for _ in range(60):
            data = bytearray(original)
            for _ in range(int(rng.integers(1, 12))):
                position = int(rng.integers(0, len(data)))
                data[position] = int(rng.integers(0, 256))
            cut = int(rng.integers(len(data) // 2, len(data) + 1))
            mutants.append(bytes(data[:cut]))
    for data in mutants:
        with contextlib.suppress(DecodeError):  # the one way a bad input may fail
            decode_image(data, SIZE)

    # And through the classifier, in batches: every input gets an answer in its place.
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "tiny.keras"
        build_melanonet((*SIZE, 3), len(ISIC_CLASSES)).save(path)
        ModelCard(version="tiny", architecture="melanonet", classes=list(ISIC_CLASSES),
                  input_size=list(SIZE), alert_threshold=0.5).write(card_path_for(path))
        answers = Classifier(path).predict(mutants[:120], batch_size=32)
    assert len(answers) == 120
    assert all(isinstance(a, (DecodeError, Prediction)) for a in answers)


def test_mild_augmentation_keeps_shape_range_and_adds_no_colour_cast() -> None:
    """v1's augmentation moves the frame, brightness and contrast, never one channel alone: a
    grey image stays grey, and a tan one keeps red above green above blue."""
    import tensorflow as tf

    from model.augment import mild_augment_batch

    images = np.zeros((8, 48, 48, 3), np.float32)
    images[:4] = 128.0
    images[4:, ..., 0], images[4:, ..., 1], images[4:, ..., 2] = 180.0, 120.0, 90.0
    out = np.asarray(mild_augment_batch(tf.constant(images), tf.constant([1, 2]), (32, 32)))
    assert out.shape == (8, 32, 32, 3)
    assert out.min() >= 0.0 and out.max() <= 255.0
    grey, tan = out[:4, 16, 16, :], out[4:, 16, 16, :]
    np.testing.assert_allclose(grey[:, 0], grey[:, 1], rtol=1e-4)
    np.testing.assert_allclose(grey[:, 1], grey[:, 2], rtol=1e-4)
    assert not np.allclose(grey[:, 0], 128.0)  # brightness and contrast did move
    assert (tan[:, 0] > tan[:, 1]).all() and (tan[:, 1] > tan[:, 2]).all()
