"""Where the worker keeps the pictures it makes for people, so that the review app (which never
decodes an image for a list) finds them by the image's content. A leaf: imports nothing of ours."""

from __future__ import annotations

from pathlib import Path


def thumbnail_path(thumbnails_dir: Path, sha256: str) -> Path:
    """thumbnails/<sha256>.jpg: the one thumbnail of this content (a small JPEG)."""
    return thumbnails_dir / f"{sha256}.jpg"
