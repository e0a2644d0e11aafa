"""The picture an email shows of a stored image: the file as it is, or, for a DICOM object, its
pixels as PNG (the object itself, its patient module with it, is never attached)."""

from __future__ import annotations

import io
import logging
from pathlib import Path

from service.dicom import starts_like_dicom

logger = logging.getLogger(__name__)


def email_picture(location: str | Path) -> bytes | None:
    """Bytes Pillow reads for the stored image at `location`; None when it cannot be read."""
    try:
        data = Path(location).read_bytes()
    except OSError as exc:
        logger.warning("cannot read %s for an email: %s", location, exc)
        return None
    if not starts_like_dicom(data[:132]):
        return data
    from model.imaging import DecodeError, load_rgb

    try:
        picture = load_rgb(data)
    except DecodeError as exc:
        logger.warning("cannot show a DICOM image in an email: %s", exc.reason)
        return None
    with picture:
        out = io.BytesIO()
        picture.save(out, "PNG")
        return out.getvalue()
