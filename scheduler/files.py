"""File-system steps of intake: which names to ignore, hashing, atomic moves. Nothing is deleted."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import sys
from pathlib import Path, PurePath

#: Names that are still being written or are not meant for us.
PARTIAL_SUFFIXES = (".part", ".tmp", ".crdownload")


def is_ignored(relative: PurePath) -> bool:
    """Hidden (any part starts with '.'), temporary or partial names."""
    if any(part.startswith(".") for part in relative.parts):
        return True
    name = relative.name.lower()
    return name.endswith("~") or name.endswith(PARTIAL_SUFFIXES)


def open_for_writing(path: Path) -> bool | None:
    """Whether any process holds `path` open for writing; None where this cannot be told.

    Linux refuses a read lease (EAGAIN) on a file that is open for writing anywhere on the host.
    Leases need the file's owner (or CAP_LEASE) and a local file system; otherwise: None.
    """
    if not sys.platform.startswith("linux"):
        return None
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        try:
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        except OSError as exc:
            return True if exc.errno == errno.EAGAIN else None
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False
    finally:
        os.close(fd)


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file's content."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unique_path(target: Path) -> Path:
    """`target`, or `name-1.ext`, `name-2.ext`... when it exists already."""
    candidate, counter = target, 1
    while candidate.exists():
        candidate = target.with_name(f"{target.stem}-{counter}{target.suffix}")
        counter += 1
    return candidate


def move_atomically(source: Path, target: Path) -> Path:
    """Move `source` to `target` so that `target` is never seen half-written.

    A rename within one file system; across file systems a copy, fsync and rename, after which
    the source is removed (the content is safe in the target by then).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        partial = target.with_name(f".{target.name}.{os.getpid()}.part")
        with open(source, "rb") as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
            dst.flush()
            os.fsync(dst.fileno())
        os.rename(partial, target)
        _fsync_dir(target.parent)
        os.unlink(source)
        return target
    _fsync_dir(target.parent)
    return target
