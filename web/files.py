"""The image bytes the pages show: the stored image (re-encoded when a browser cannot show its
format), and the thumbnail and the Grad-CAM overlay the worker stored (never made here: a list
of images costs no decoding). Pillow only: never TensorFlow."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image as PILImage

from service.stored_pictures import thumbnail_path

#: Formats every browser shows as they are; anything else (TIFF, BMP, ...) is sent as PNG.
_BROWSER_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp"}


class NotShowable(Exception):
    """The file is gone or Pillow cannot read it."""


def browser_type(location: str) -> str | None:
    """The media type a browser shows this stored image as, or None when it must be converted
    (Pillow reads only the header here)."""
    try:
        with PILImage.open(location) as picture:
            return _BROWSER_FORMATS.get(picture.format or "")
    except (OSError, ValueError, PILImage.DecompressionBombError) as exc:
        raise NotShowable(str(exc)) from exc


def converted_png(location: str) -> bytes:
    """A stored image a browser cannot show (TIFF, BMP, ...) as PNG (Pillow's pixel limit holds)."""
    try:
        with PILImage.open(location) as picture:
            picture.load()
            return _png(picture)
    except (OSError, ValueError, PILImage.DecompressionBombError) as exc:
        raise NotShowable(str(exc)) from exc


def stored_thumbnail(thumbnails_dir: Path | None, sha256: str) -> Path | None:
    """The thumbnail the worker stored for this image at screening time, if there is one."""
    if thumbnails_dir is None:
        return None
    path = thumbnail_path(thumbnails_dir, sha256)
    return path if path.is_file() else None


def _png(picture: PILImage.Image) -> bytes:
    out = io.BytesIO()
    picture.convert("RGBA" if "A" in picture.getbands() else "RGB").save(out, "PNG")
    return out.getvalue()


def shown_location(previews_dir: Path, sha256: str, location: str) -> str:
    """What the pages show of a stored image: the worker's JPEG picture of a DICOM image when
    there is one (browsers cannot show DICOM), else the stored file."""
    preview = previews_dir / f"{sha256}.jpg"
    return str(preview) if preview.is_file() else location


def overlay_path(overlays_dir: Path, sha256: str) -> Path | None:
    """The worker's stored Grad-CAM overlay of this image, if there is one."""
    path = overlays_dir / f"{sha256}.png"
    return path if path.is_file() else None
