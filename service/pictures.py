"""Pictures of a stored image for people, each made from the decoded, size-bounded image (a
DICOM object's pixels too, never the object itself): the thumbnail the worker stores once, at
screening time, for the review app's lists, and the picture an alert or a digest carries.

Decoding goes through `model.imaging.load_rgb` (Pillow, or pydicom for a DICOM file): only what
the format needs is read (a JPEG stops at its end-of-image marker, whatever follows it), within
its pixel limit, and a JPEG is decoded at 1/2 to 1/8 scale when that still gives the size asked
for. No file is ever read whole into memory. TensorFlow-free.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

from service.stored_pictures import thumbnail_path

logger = logging.getLogger(__name__)

#: The stored thumbnail's longest side (the worklist shows it at 64 px; 96 keeps it sharp).
THUMBNAIL_PX = 96


def shrunk_jpeg(location: Path | str, max_px: int, quality: int = 85) -> bytes | None:
    """The image at most `max_px` a side, as JPEG bytes; None when it cannot be decoded."""
    from model.imaging import DecodeError, load_rgb

    try:
        picture = load_rgb(Path(location), draft_size=(max_px, max_px))
    except DecodeError as exc:
        logger.warning("no picture of %s: %s", location, exc.reason)
        return None
    with picture:
        picture.thumbnail((max_px, max_px))
        out = io.BytesIO()
        picture.save(out, "JPEG", quality=quality)
        return out.getvalue()


def store_thumbnail(location: Path | str, sha256: str, thumbnails_dir: Path) -> Path | None:
    """Make this image's thumbnail once (thumbnails/<sha256>.jpg, 0600) unless it is there;
    its path, or None when the image cannot be decoded or the folder cannot be written."""
    target = thumbnail_path(thumbnails_dir, sha256)
    if target.is_file():
        return target
    data = shrunk_jpeg(location, THUMBNAIL_PX)
    if data is None:
        return None
    partial = thumbnails_dir / f".{sha256}.{os.getpid()}.part"
    try:
        thumbnails_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(partial, target)
    except OSError as exc:
        logger.warning("cannot keep the thumbnail of %s: %s", location, exc)
        partial.unlink(missing_ok=True)
        return None
    return target
