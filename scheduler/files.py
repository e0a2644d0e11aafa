"""File-system steps of intake: which names to ignore, reading a file safely, atomic moves.

Nothing is deleted: a file leaves the inbox only once its content is safe in the data folder.
The inbox may be writable by others, so a name is never trusted between two steps: a file is
opened once without following links, checked, hashed from that open file, and what is moved is
checked to be the very file that was hashed.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import stat
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePath

#: Names that are still being written or are not meant for us.
PARTIAL_SUFFIXES = (".part", ".tmp", ".crdownload")
#: The longest name (bytes) most file systems take; names we make stay within it.
MAX_NAME_BYTES = 255
#: A suffix kept on store names: a dot and up to ten letters or digits (`.jpg`, `.tiff`).
_STORE_SUFFIX = re.compile(r"\.[a-z0-9]{1,10}")
_CHUNK = 1 << 20


#: Folders below the inbox that are watched and scanned; deeper ones are skipped (a shared inbox
#: may hold a folder thousands deep: it must cost nothing, nor stop the intake).
MAX_DEPTH = 16


class ReplacedWhileReading(OSError):
    """The inbox name was swapped for another file (or a link) while we read it."""


class TooLarge(OSError):
    """The file is over the size limit (MELANOSCREEN_MAX_FILE_BYTES): it is not read further."""


def inbox_folders(root: Path, max_depth: int = MAX_DEPTH,
                  too_deep: Callable[[Path], None] | None = None) -> Iterator[tuple[Path, int, list[str]]]:
    """(folder, depth, names of its files) for `root` (depth 0) and every folder below it down to
    `max_depth`, without following links or entering hidden folders; iterative, so a deep tree
    costs no stack. A folder deeper than that is not entered: `too_deep(folder)` is called."""
    stack = [(root, 0)]
    while stack:
        folder, depth = stack.pop()
        files: list[str] = []
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            if entry.name.startswith("."):
                                continue
                            if depth >= max_depth:
                                if too_deep is not None:
                                    too_deep(Path(entry.path))
                                continue
                            stack.append((Path(entry.path), depth + 1))
                        else:
                            files.append(entry.name)
                    except OSError:
                        continue
        except OSError:
            continue  # gone, or not ours to read
        yield folder, depth, files


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
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
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


def capped_name(name: str, limit: int = MAX_NAME_BYTES) -> str:
    """`name` cut to at most `limit` bytes (in the file system's encoding, whole characters),
    keeping a short suffix: an over-long name from the inbox must not make our moves fail."""
    if len(os.fsencode(name)) <= limit:
        return name
    path = PurePath(name)
    suffix = path.suffix if len(os.fsencode(path.suffix)) <= 16 else ""
    stem = name[: len(name) - len(suffix)] if suffix else name
    room = limit - len(os.fsencode(suffix))
    while len(os.fsencode(stem)) > room:
        stem = stem[:-1]
    return stem + suffix


def recorded_name(relative: PurePath) -> str:
    """The inbox-relative name as text for the database: bytes that are not UTF-8 (a name
    may hold any byte but `/` and NUL) are written as `\\xff` escapes instead of failing."""
    return os.fsencode(relative.as_posix()).decode("utf-8", "backslashreplace")


def store_suffix(name: str) -> str:
    """The suffix a store name keeps: lower case, short, letters and digits only; else none."""
    suffix = PurePath(name).suffix.lower()
    return suffix if _STORE_SUFFIX.fullmatch(suffix) else ""


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unique_path(target: Path) -> Path:
    """`target`, or `name-1.ext`, `name-2.ext`... when it exists already (within 255 bytes)."""
    target = target.with_name(capped_name(target.name, MAX_NAME_BYTES - 8))
    candidate, counter = target, 1
    while candidate.exists() or candidate.is_symlink():
        candidate = target.with_name(f"{target.stem}-{counter}{target.suffix}")
        counter += 1
    return candidate


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


@dataclass
class InboxFile:
    """One inbox file, opened without following links and known to be a regular file.

    The file is hashed from the open descriptor. A file with other hard links, or owned by
    another user, is copied (while hashing) into a private staging file, so the store never
    shares an inode with a file outside the data folder and every stored file is ours, 0600.
    """

    path: Path  # for messages; every step goes through `folder_fd` and `name`
    folder_fd: int  # the inbox folder that holds it, opened without following links
    name: str
    fd: int
    info: os.stat_result  # fstat of the open file
    sha256: str = ""
    staged: Path | None = None  # the private copy, when the file itself is not moved
    read_bytes: int = 0  # how much was read (hashed, copied) so far
    moved: bool = field(default=False, init=False)

    @property
    def size(self) -> int:
        """Bytes of content."""
        return self.info.st_size

    def close(self) -> None:
        """Close the file; a staging copy that was not moved goes (the original is still there)."""
        os.close(self.fd)
        os.close(self.folder_fd)
        if self.staged is not None and not self.moved:
            self.staged.unlink(missing_ok=True)

    def __enter__(self) -> InboxFile:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def move_to(self, target: Path) -> Path:
        """Move the content that was hashed to `target` (a new name in the data folder), 0600."""
        target.parent.mkdir(parents=True, exist_ok=True)
        if self.staged is None:
            os.fchmod(self.fd, 0o600)
            try:
                os.rename(self.name, target, src_dir_fd=self.folder_fd)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                # Another file system: copy from the open file, then drop the inbox name.
                self._copy_to(target)
                self._remove_inbox_name()
            else:
                self._check_moved(target)
        else:
            os.rename(self.staged, target)
            self._remove_inbox_name()
        _fsync_dir(target.parent)
        self.moved = True
        return target

    def move_back(self, target: Path) -> None:
        """Undo `move_to` (its record could not be committed): the content goes back into the
        inbox under its name (or `name-1.ext` if that is taken meanwhile)."""
        back, counter = self.name, 0
        while _exists_in(self.folder_fd, back):
            counter += 1
            back = f"{PurePath(self.name).stem}-{counter}{PurePath(self.name).suffix}"
        os.rename(target, back, dst_dir_fd=self.folder_fd)
        self.moved = False
        self.staged = None  # it is the inbox file again, whichever way it came

    def _check_moved(self, target: Path) -> None:
        """What the rename moved must be the file we hashed; a swapped-in name goes back."""
        moved = os.lstat(target)
        if _same_file(moved, self.info):
            return
        back, counter = self.name, 0
        while _exists_in(self.folder_fd, back):
            counter += 1
            back = f"{PurePath(self.name).stem}-{counter}{PurePath(self.name).suffix}"
        os.rename(target, back, dst_dir_fd=self.folder_fd)
        raise ReplacedWhileReading(errno.ESTALE, f"{self.path} was replaced while it was read; "
                                   f"left in the inbox as {back}")

    def _copy_to(self, target: Path) -> None:
        partial = target.with_name(f".{target.name[:200]}.{os.getpid()}.part")
        os.lseek(self.fd, 0, os.SEEK_SET)
        with open(partial, "xb") as dst:
            os.fchmod(dst.fileno(), 0o600)
            with os.fdopen(os.dup(self.fd), "rb") as src:
                shutil.copyfileobj(src, dst, _CHUNK)
            dst.flush()
            os.fsync(dst.fileno())
        os.rename(partial, target)

    def _remove_inbox_name(self) -> None:
        """The content is safe in the data folder: the inbox name goes, if it is still ours."""
        try:
            if _same_file(os.stat(self.name, dir_fd=self.folder_fd, follow_symlinks=False),
                          self.info):
                os.unlink(self.name, dir_fd=self.folder_fd)
        except FileNotFoundError:
            pass


def _exists_in(folder_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _open_folder(inbox: Path, parts: tuple[str, ...]) -> int | None:
    """The inbox subfolder `parts`, walked one name at a time without following a link (a
    folder swapped for a link to elsewhere is not entered); None if it is not there."""
    folder = os.open(inbox, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    for part in parts:
        try:
            inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                            dir_fd=folder)
        except OSError as exc:
            os.close(folder)
            if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                return None
            raise
        os.close(folder)
        folder = inner
    return folder


def open_inbox_file(inbox: Path, relative: PurePath, staging_dir: Path,
                    max_bytes: int | None = None) -> InboxFile | None:
    """Open and hash the inbox file `relative`; None when it is gone, a link or not a regular file.

    A regular file of ours with one link is hashed in place and later renamed; anything else
    (other hard links, another owner) is copied into `staging_dir` while it is hashed. A file
    over `max_bytes` (by fstat, or while it is read: it may grow) raises TooLarge, with
    nothing copied beyond the limit.
    """
    folder = _open_folder(inbox, relative.parts[:-1])
    if folder is None:
        return None
    try:
        fd = os.open(relative.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=folder)
    except OSError as exc:
        os.close(folder)
        if exc.errno in (errno.ENOENT, errno.ELOOP):  # gone, or a symlink: never followed
            return None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        os.close(folder)
        return None
    opened = InboxFile(inbox / relative, folder, relative.name, fd, info)
    limit = max_bytes if max_bytes is not None else -1
    try:
        if limit >= 0 and info.st_size > limit:
            raise TooLarge(errno.EFBIG, f"{info.st_size} bytes, over the limit of {limit}")
        digest = hashlib.sha256()
        if info.st_nlink == 1 and info.st_uid == os.geteuid():
            while chunk := os.read(fd, _CHUNK):
                digest.update(chunk)
                _check_limit(opened, limit, len(chunk))
        else:
            staging_dir.mkdir(parents=True, exist_ok=True)
            staged = staging_dir / f"{os.getpid()}-{info.st_ino}.part"
            staged.unlink(missing_ok=True)
            out = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            opened.staged = staged
            try:
                while chunk := os.read(fd, _CHUNK):
                    _check_limit(opened, limit, len(chunk))
                    digest.update(chunk)
                    os.write(out, chunk)
                os.fsync(out)
            finally:
                os.close(out)
        opened.sha256 = digest.hexdigest()
        if opened.staged is None:
            opened.info = os.fstat(fd)  # the size as hashed
    except BaseException:
        os.close(fd)
        os.close(folder)
        if opened.staged is not None:
            opened.staged.unlink(missing_ok=True)
        raise
    return opened


def _check_limit(opened: InboxFile, limit: int, more: int) -> None:
    """Count bytes read; TooLarge as soon as they pass the limit (a file that grew meanwhile)."""
    opened.read_bytes += more
    if 0 <= limit < opened.read_bytes:
        raise TooLarge(errno.EFBIG, f"grew past the limit of {limit} bytes while it was read")
