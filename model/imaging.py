"""Decoding what clinics really send into the model's input tensor (Pillow, pydicom and NumPy).

Picture files are read with Pillow; DICOM files (`DICM` at byte 128) with `model.dicom`: one
decode path for every entry point (the worker, `predict`, the training data).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from model.dicom import DicomRejected, is_dicom, load_dicom_rgb, read_head

#: Refuse images above this many pixels (a 64-megapixel photo is already far beyond a dermatoscope).
MAX_PIXELS = 64_000_000

# Truncated files must fail, not decode half-grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


class DecodeError(ValueError):
    """An input that cannot be screened; `reason` is one line fit for an operator."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


ImageSource = Path | str | bytes


def _open(source: ImageSource) -> Image.Image:
    if isinstance(source, bytes):
        if not source:
            raise DecodeError("empty file (0 bytes)")
        stream: io.BytesIO | Path = io.BytesIO(source)
    else:
        stream = Path(source)
        try:
            size = stream.stat().st_size
        except OSError as exc:
            raise DecodeError(f"cannot read file: {exc.strerror or exc}") from exc
        if size == 0:
            raise DecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(stream)
    except UnidentifiedImageError as exc:
        raise DecodeError("not an image Pillow can read") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError(f"too many pixels (decompression bomb guard): {exc}") from exc
    except OSError as exc:
        raise DecodeError(f"corrupt or truncated image: {exc}") from exc
    except Exception as exc:
        # A decoder can fail in any way on a hostile file (an iCCP or zTXt chunk that inflates
        # to 50 MB raises ValueError): whatever it is, it is this one image's rejection.
        raise DecodeError(_unreadable(exc)) from exc


def _unreadable(exc: BaseException) -> str:
    """One line for any decoder failure, at most 300 characters."""
    text = " ".join(str(exc).split())[:240]
    return f"unreadable image ({type(exc).__name__}: {text})"


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited onto white."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
        # Pillow's own convert() clips 16-bit values to 255: rescale by the type's range instead.
        values = np.asarray(image, dtype=np.float32)
        top = 65535.0 if image.mode != "F" and values.max() > 255 else max(float(values.max()), 1.0)
        if image.mode == "F":
            values = values - float(values.min())
            top = max(float(values.max()), 1e-6)
        gray = np.clip(values * (255.0 / top), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")
    return image


def _load_dicom(source: ImageSource, max_pixels: int) -> Image.Image | None:
    """The RGB picture of a DICOM file, None for any other file (Pillow's to read)."""
    try:
        head = source[:132] if isinstance(source, bytes) else read_head(Path(source))
    except OSError:
        return None  # `_open` says why it cannot be read
    if not is_dicom(head):
        return None
    try:
        return load_dicom_rgb(source if isinstance(source, bytes) else Path(source),
                              max_pixels=max_pixels)
    except DicomRejected as exc:
        raise DecodeError(exc.reason) from exc


def load_rgb(source: ImageSource, *, max_pixels: int = MAX_PIXELS,
             draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode `source` to an upright 8-bit RGB Pillow image, or raise `DecodeError`.

    `draft_size` (width, height) lets JPEG decode at 1/2, 1/4 or 1/8 scale when the image is
    much larger than needed, which is several times faster for camera-sized files.
    """
    dicom = _load_dicom(source, max_pixels)
    if dicom is not None:
        return dicom
    image = _open(source)
    try:
        width, height = image.size
        if width <= 0 or height <= 0:
            raise DecodeError("image has no pixels")
        if width * height > max_pixels:
            raise DecodeError(
                f"too many pixels: {width}x{height} exceeds the limit of {max_pixels:,}"
                " (decompression bomb guard)"
            )
        if draft_size is not None and image.format == "JPEG":
            # draft() keeps the result >= the requested size, so quality is unaffected.
            image.draft("RGB", draft_size)
        try:
            image.load()
            image = ImageOps.exif_transpose(image) or image
            return _to_rgb(image)
        except DecodeError:
            raise
        except (OSError, SyntaxError, EOFError) as exc:
            raise DecodeError(f"corrupt or truncated image: {exc}") from exc
        except Exception as exc:  # any other decoder failure: see `_open`
            raise DecodeError(_unreadable(exc)) from exc
    except BaseException:
        image.close()
        raise


def decode_image(source: ImageSource, size: tuple[int, int], *,
                 max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode and resize to the model input: float32, shape (height, width, 3), values 0..255.

    The whole image is resized (no crop), as the training images were.
    """
    height, width = size
    image = load_rgb(source, max_pixels=max_pixels, draft_size=(width * 2, height * 2))
    try:
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=2.0)
        return np.asarray(image, dtype=np.float32)
    except Exception as exc:
        raise DecodeError(_unreadable(exc)) from exc
    finally:
        image.close()
