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
    return _keep(data, target, f"the thumbnail of {location}")


def store_dicom_preview(location: Path, target: Path) -> bool:
    """For a DICOM image, its picture as JPEG at `target` (0600; the review app shows it:
    browsers cannot show DICOM); nothing for any other file. Whether one was written."""
    from model.dicom import is_dicom, read_head
    from model.imaging import DecodeError, load_rgb

    try:
        if not is_dicom(read_head(location)):
            return False
        picture = load_rgb(location)
    except (OSError, DecodeError) as exc:
        logger.warning("no preview of %s: %s", location.name, getattr(exc, "reason", exc))
        return False
    with picture:
        # JPEG (quality 92): a fraction of PNG's cost per image, in the screening path.
        out = io.BytesIO()
        picture.save(out, "JPEG", quality=92)
    return _keep(out.getvalue(), target, f"the preview of {location.name}") is not None


def _keep(data: bytes, target: Path, what: str) -> Path | None:
    """`data` at `target` (0600, its folder made 0700), written under a partial name and renamed
    in, never through a link; `target`, or None (logged) when it cannot be written."""
    partial = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(partial, target)
    except OSError as exc:
        logger.warning("cannot keep %s: %s", what, exc)
        partial.unlink(missing_ok=True)
        return None
    return target
