"""Pictures of a stored image for people, each made from the decoded, size-bounded image (a
DICOM object's pixels too, never the object itself): the thumbnail the worker stores once, at
screening time, for the review app's lists, the picture an alert or a digest carries, and a
DICOM image's preview for the case page (a JPEG-baseline object's own JPEG frame, checked
against the pixel limit, else its decoded pixels as JPEG).

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

from PIL import Image

from service.stored_pictures import thumbnail_path

logger = logging.getLogger(__name__)

#: The stored thumbnail's longest side (the worklist shows it at 64 px; 96 keeps it sharp).
THUMBNAIL_PX = 96


def shrunk_jpeg(location: Path | str | bytes, max_px: int, quality: int = 85) -> bytes | None:
    """The image (a file, or an image file's bytes) at most `max_px` a side, as JPEG bytes;
    None when it cannot be decoded."""
    from model.imaging import DecodeError, load_rgb

    try:
        picture = load_rgb(location if isinstance(location, bytes) else Path(location),
                           draft_size=(max_px, max_px))
    except DecodeError as exc:
        logger.warning("no picture of %s: %s", "an image" if isinstance(location, bytes)
                       else location, exc.reason)
        return None
    with picture:
        return _shrunk(picture, max_px, quality)


def _shrunk(picture: Image.Image, max_px: int, quality: int) -> bytes:
    """`picture` at most `max_px` a side, as JPEG bytes (`picture` itself is left as it is)."""
    small = picture.copy() if max(picture.size) > max_px else picture
    small.thumbnail((max_px, max_px))
    out = io.BytesIO()
    small.save(out, "JPEG", quality=quality)
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


#: A JPEG-baseline DICOM object up to this size has its frame kept in memory for its batch
#: (screened and pictured from it; a batch of the default 16 images holds at most 16 MiB of
#: them); a larger one is parsed again where needed, a cost its decoding dwarfs.
FRAME_KEPT_BYTES = 1 << 20


def jpeg_frames(work: list[tuple[int, Path]]) -> dict[int, bytes]:
    """image id -> the JPEG frame of each JPEG-baseline DICOM object among `work` (up to
    FRAME_KEPT_BYTES): such an object holds a JPEG file, which the worker then screens and
    pictures as that file, parsing the object once instead of twice."""
    from model.dicom import is_dicom, jpeg_frame, read_head
    from model.imaging import MAX_PIXELS

    frames: dict[int, bytes] = {}
    for image_id, path in work:
        try:
            if path.stat().st_size > FRAME_KEPT_BYTES or not is_dicom(read_head(path)):
                continue
        except OSError:
            continue  # the decode says why it cannot be read
        frame = jpeg_frame(path, max_pixels=MAX_PIXELS)
        if frame is not None:
            frames[image_id] = frame
    return frames


def store_pictures(location: Path, sha256: str, thumbnails_dir: Path,
                   preview: Path | None, frame: bytes | None = None) -> None:
    """What the worker keeps of a screened image for people: its thumbnail and, for a DICOM
    file, when `preview` is given, its picture as JPEG there (browsers cannot show DICOM).

    A JPEG-baseline DICOM object holds a JPEG file (`frame`, when `jpeg_frames` took it out
    already), which is the preview as it stands (after the header's pixel limit) and is shrunk
    for the thumbnail like any JPEG; any other DICOM object is decoded once for both. Any
    other image keeps its thumbnail only, made by `store_thumbnail` (a JPEG decoded at
    reduced scale).
    """
    from model.dicom import is_dicom, jpeg_frame, read_head
    from model.imaging import MAX_PIXELS, DecodeError, load_rgb

    thumbnail = thumbnail_path(thumbnails_dir, sha256)
    try:
        # A frame comes only out of a DICOM file: its header need not be read again.
        dicom = preview is not None and (frame is not None or is_dicom(read_head(location)))
    except OSError as exc:
        logger.warning("no pictures of %s: %s", location.name, exc.strerror or exc)
        return
    if not dicom:
        store_thumbnail(location, sha256, thumbnails_dir)
        return
    assert preview is not None
    if thumbnail.is_file() and preview.is_file():
        return  # a re-screen: the pixels have not changed
    if frame is None:
        frame = jpeg_frame(location, max_pixels=MAX_PIXELS)
    if frame is not None:
        # A JPEG-baseline object holds a JPEG file: shown as it is, and shrunk like one.
        if not thumbnail.is_file() and (small := shrunk_jpeg(frame, THUMBNAIL_PX)) is not None:
            _keep(small, thumbnail, f"the thumbnail of {location}")
        _keep(frame, preview, f"the preview of {location.name}")
        return
    try:
        picture = load_rgb(location)
    except (OSError, DecodeError) as exc:
        logger.warning("no preview of %s: %s", location.name, getattr(exc, "reason", exc))
        return
    with picture:
        if not thumbnail.is_file():
            _keep(_shrunk(picture, THUMBNAIL_PX, 85), thumbnail, f"the thumbnail of {location}")
        # JPEG (quality 92): a fraction of PNG's cost per image, in the screening path.
        out = io.BytesIO()
        picture.save(out, "JPEG", quality=92)
    _keep(out.getvalue(), preview, f"the preview of {location.name}")


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
