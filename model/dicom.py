"""DICOM images: one DICOM object's pixels as an 8-bit RGB picture (pydicom and NumPy only).

What is screened: single-frame colour or grey images (VL Photographic, VL Microscopic,
Secondary Capture and any other image object with one frame), uncompressed or compressed with a
transfer syntax an installed pydicom decoder reads (pylibjpeg's plugins: JPEG baseline, JPEG-LS,
JPEG 2000; RLE and deflate are pydicom's own).

What is not, with a reason: objects without pixel data (structured reports, waveforms,
presentation states, key-object notes), and multi-frame objects. A dermoscopic or clinical
photograph is one frame; a multi-frame object is a video, a stack of focal planes or a
whole-slide tiling, none of which the model was trained on, and one object would become many
scores under one identity. It is rejected, saying how many frames it holds, so the sender can
send the views it means as single-frame images.

Rows × columns × frames is checked against the pixel limit from the header alone, before any
pixel is decoded or the pixel data is even read from the file.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

#: The DICOM file preamble (128 bytes) is followed by these four bytes (PS3.10 7.1).
MAGIC = b"DICM"
MAGIC_OFFSET = 128
#: Elements larger than this are read from the file only when used (the pixel data, mostly).
_DEFER_BYTES = 64 * 1024
#: Where a DICOM object's pixels may be (PS3.5 A.1): integer, float and double float data.
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_COLOUR_SPACES = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT",
                            "YBR_PARTIAL_420"})


class DicomRejected(ValueError):
    """A DICOM object that cannot be screened; `reason` is one line fit for an operator."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def is_dicom(head: bytes) -> bool:
    """Whether a file starting with `head` (at least 132 bytes of it) is a DICOM file."""
    return head[MAGIC_OFFSET:MAGIC_OFFSET + len(MAGIC)] == MAGIC


def read_head(path: Path) -> bytes:
    """The first 132 bytes of a file (fewer if it is shorter)."""
    with open(path, "rb") as handle:
        return handle.read(MAGIC_OFFSET + len(MAGIC))


def _kind(dataset: object) -> str:
    """'VL Photographic Image Storage' (or the SOP class UID, or 'unknown SOP class')."""
    from pydicom.uid import UID

    uid = getattr(dataset, "SOPClassUID", None)
    if uid is None:
        meta = getattr(dataset, "file_meta", None)
        uid = getattr(meta, "MediaStorageSOPClassUID", None)
    if not uid:
        return "unknown SOP class"
    name = UID(str(uid)).name
    return name if name else str(uid)


def _int(dataset: object, keyword: str, default: int | None = None) -> int | None:
    value = getattr(dataset, keyword, default)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DicomRejected(f"DICOM header: {keyword} is not a number ({str(value)[:40]!r})") from None


def check_header(dataset: object, max_pixels: int) -> tuple[int, int]:
    """(rows, columns) of a screenable single-frame image, from the header only; else
    `DicomRejected` with the reason."""
    kind = _kind(dataset)
    if not any(keyword in dataset for keyword in _PIXEL_KEYWORDS):  # type: ignore[operator]
        raise DicomRejected(f"DICOM object without pixel data ({kind}): nothing to screen")
    rows = _int(dataset, "Rows")
    columns = _int(dataset, "Columns")
    frames = _int(dataset, "NumberOfFrames", 1) or 1
    if not rows or not columns or rows < 0 or columns < 0 or frames < 0:
        raise DicomRejected(f"DICOM image has no pixels ({kind}: Rows {rows}, Columns {columns})")
    if rows * columns * frames > max_pixels:
        raise DicomRejected(
            f"too many pixels: DICOM {columns}x{rows}x{frames} frame(s) exceeds the limit of "
            f"{max_pixels:,} (decompression bomb guard)")
    if frames > 1:
        raise DicomRejected(
            f"multi-frame DICOM object ({kind}, {frames} frames): only single-frame images are "
            "screened; send each view as its own image")
    samples = _int(dataset, "SamplesPerPixel", 1)
    photometric = str(getattr(dataset, "PhotometricInterpretation", "") or "").strip().upper()
    if samples not in (1, 3):
        raise DicomRejected(f"DICOM image with {samples} samples per pixel: not a colour or grey "
                            "picture")
    if samples == 3 and photometric not in _COLOUR_SPACES:
        raise DicomRejected(f"DICOM colour image in an unsupported colour space ({photometric})")
    if samples == 1 and photometric not in ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR"):
        raise DicomRejected(f"DICOM grey image with an unsupported interpretation ({photometric})")
    return rows, columns


def _to_uint8(pixels: np.ndarray, bits_stored: int) -> np.ndarray:
    """Any integer or float pixel array to uint8 over its type's range (or its own, for floats)."""
    if pixels.dtype == np.uint8:
        return pixels
    values = pixels.astype(np.float32)
    if np.issubdtype(pixels.dtype, np.floating) or np.issubdtype(pixels.dtype, np.signedinteger):
        values = values - float(values.min())
        top = max(float(values.max()), 1e-6)
    else:
        top = float((1 << max(1, min(bits_stored, 32))) - 1)
    return np.clip(values * (255.0 / top), 0, 255).astype(np.uint8)


def load_dicom_rgb(source: Path | bytes, *, max_pixels: int) -> Image.Image:
    """A DICOM file (path or bytes) as an 8-bit RGB Pillow image, or raise `DicomRejected`."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    stream: Path | io.BytesIO = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        dataset = pydicom.dcmread(stream, defer_size=_DEFER_BYTES)
    except InvalidDicomError as exc:
        raise DicomRejected(f"not a readable DICOM file: {_line(exc)}") from exc
    except Exception as exc:  # a hostile header can fail the parser in any way
        raise DicomRejected(f"malformed DICOM file ({type(exc).__name__}: {_line(exc)})") from exc
    rows, columns = check_header(dataset, max_pixels)
    syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
    fast = _baseline_jpeg(dataset, syntax, rows, columns)
    if fast is not None:
        return fast
    try:
        pixels = dataset.pixel_array
    except Exception as exc:
        name = getattr(syntax, "name", None) or str(syntax or "unknown transfer syntax")
        raise DicomRejected(f"DICOM pixel data cannot be decoded ({name}: {_line(exc)})") from exc
    photometric = str(dataset.PhotometricInterpretation).strip().upper()
    bits = _int(dataset, "BitsStored", 8) or 8
    try:
        if photometric == "PALETTE COLOR":
            from pydicom.pixels import apply_color_lut

            pixels = apply_color_lut(pixels, dataset)
            bits = 16 if pixels.dtype != np.uint8 else 8
        pixels = _to_uint8(np.asarray(pixels), bits)
        if photometric == "MONOCHROME1":
            pixels = 255 - pixels  # MONOCHROME1: the lowest value is white
        if pixels.ndim == 2:
            return Image.fromarray(pixels, "L").convert("RGB")
        if pixels.ndim == 3 and pixels.shape[-1] == 3:
            return Image.fromarray(np.ascontiguousarray(pixels), "RGB")
    except Exception as exc:
        raise DicomRejected(f"DICOM pixel data cannot be decoded ({_line(exc)})") from exc
    raise DicomRejected(f"DICOM pixel data of an unexpected shape {pixels.shape}")


def jpeg_frame(path: Path, *, max_pixels: int) -> bytes | None:
    """The frame of a single-frame JPEG-baseline DICOM file as the JPEG file it is (what a
    browser shows as it stands, and Pillow decodes at reduced scale), after the header's checks;
    None for any other DICOM file (its pixels must be decoded) or one that cannot be read."""
    import pydicom
    from pydicom import uid
    from pydicom.encaps import generate_frames

    try:
        dataset = pydicom.dcmread(path, defer_size=_DEFER_BYTES)
        rows, columns = check_header(dataset, max_pixels)
        photometric = str(getattr(dataset, "PhotometricInterpretation", "")).strip().upper()
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
        if syntax != uid.JPEGBaseline8Bit or photometric in ("MONOCHROME1", "PALETTE COLOR"):
            return None
        frame = next(generate_frames(dataset.PixelData, number_of_frames=1))
        with Image.open(io.BytesIO(frame)) as picture:  # the header only
            if picture.format != "JPEG" or picture.size != (columns, rows):
                return None
    except Exception:  # the worker's decode says why, where it matters
        return None
    return bytes(frame)


def _baseline_jpeg(dataset: object, syntax: object, rows: int,
                   columns: int) -> Image.Image | None:
    """A JPEG-baseline frame decoded by Pillow, as a JPEG picture file is (its YCbCr to RGB in C,
    several times faster than pydicom's); None where the general path must decode it."""
    from pydicom import uid
    from pydicom.encaps import generate_frames

    photometric = str(getattr(dataset, "PhotometricInterpretation", "")).strip().upper()
    if syntax != uid.JPEGBaseline8Bit or photometric in ("MONOCHROME1", "PALETTE COLOR"):
        return None
    try:
        frame = next(generate_frames(dataset.PixelData, number_of_frames=1))  # type: ignore[attr-defined]
        picture = Image.open(io.BytesIO(frame))
        if picture.format != "JPEG":
            return None
        # The codestream's own size must be the header's, which the pixel limit checked.
        if picture.size != (columns, rows):
            raise DicomRejected(f"DICOM pixel data does not match its header: a "
                                f"{picture.size[0]}x{picture.size[1]} JPEG in a "
                                f"{columns}x{rows} image")
        picture.load()
        return picture.convert("RGB") if picture.mode != "RGB" else picture
    except DicomRejected:
        raise
    except Exception:
        return None  # the general path decodes it, or says why it cannot


def _line(exc: BaseException) -> str:
    """One line of at most 200 characters."""
    return " ".join(str(exc).split())[:200]
