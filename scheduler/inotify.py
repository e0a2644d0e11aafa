"""Close-after-write events for the inbox tree from Linux inotify, down to a bounded depth.

Watchdog's recursive inotify walks a tree with `os.walk`, which recurses once per level: a
folder a thousand deep in a shared inbox raised RecursionError at every start. Here every
folder down to `scheduler.files.MAX_DEPTH` gets one watch, added by an iterative walk; deeper
folders are skipped (`too_deep` is told once); running out of watches leaves the rest to the
periodic rescan. Events are handed on as watchdog's event objects (the readiness rule's input).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import queue
import select
import struct
import threading
from collections.abc import Callable
from pathlib import Path

from watchdog.events import (
    FileClosedEvent,
    FileClosedNoWriteEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileOpenedEvent,
    FileSystemEvent,
)

from scheduler.files import MAX_DEPTH, inbox_folders

logger = logging.getLogger(__name__)

IN_MODIFY, IN_CLOSE_WRITE, IN_CLOSE_NOWRITE, IN_OPEN = 0x2, 0x8, 0x10, 0x20
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE = 0x40, 0x80, 0x100
IN_Q_OVERFLOW, IN_IGNORED, IN_ISDIR = 0x4000, 0x8000, 0x40000000
IN_ONLYDIR, IN_DONT_FOLLOW = 0x01000000, 0x02000000
_MASK = (IN_MODIFY | IN_CLOSE_WRITE | IN_CLOSE_NOWRITE | IN_OPEN | IN_MOVED_FROM | IN_MOVED_TO
         | IN_CREATE | IN_ONLYDIR | IN_DONT_FOLLOW)
_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len (struct inotify_event)
_FILE_EVENTS: dict[int, Callable[[str], FileSystemEvent]] = {
    IN_CREATE: FileCreatedEvent, IN_OPEN: FileOpenedEvent, IN_CLOSE_WRITE: FileClosedEvent,
    IN_CLOSE_NOWRITE: FileClosedNoWriteEvent, IN_MODIFY: FileModifiedEvent,
}


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.inotify_init1.argtypes = [ctypes.c_int]
    libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
    return libc



def _file_names(folder: Path) -> list[str]:
    """The names of what is in `folder` that is not a folder (nothing when it cannot be read)."""
    names = []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                try:
                    if not entry.is_dir(follow_symlinks=False):
                        names.append(entry.name)
                except OSError:
                    continue
    except OSError:
        return []
    return names

class InboxEvents:
    """A thread that watches `root` and its folders (depth-bounded) and puts events on `events`."""

    def __init__(self, root: Path, events: queue.Queue[FileSystemEvent],
                 too_deep: Callable[[Path], None], max_depth: int = MAX_DEPTH,
                 overflowed: Callable[[], None] | None = None) -> None:
        self.root = root
        #: Told when the kernel dropped events (its queue overflowed): time for a rescan.
        self.overflowed = overflowed
        self.events = events
        self.too_deep = too_deep
        self.max_depth = max_depth
        self._libc = _libc()
        self._fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self._folders: dict[int, tuple[bytes, int]] = {}  # wd -> (folder, depth)
        self._out_of_watches = False
        self._thread = threading.Thread(target=self._loop, name="inbox-inotify", daemon=True)

    def start(self) -> None:
        """Watch the tree as it is now, then follow it in a thread."""
        self._add_tree(self.root, 0, announce=False)
        self._thread.start()

    def stop(self) -> None:
        """End the thread and release the watches."""
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=5)
        for fd in (self._fd, self._wake_r, self._wake_w):
            os.close(fd)

    def _add_tree(self, top: Path, depth: int, *, announce: bool) -> None:
        """Watch `top` (at `depth`) and its folders; `announce`: files already there are
        reported as created (a folder moved or made in after the watch started)."""
        if depth > self.max_depth:
            self.too_deep(top)
            return
        for folder, below, _files in inbox_folders(top, self.max_depth - depth, self.too_deep):
            wd = self._libc.inotify_add_watch(self._fd, os.fsencode(folder), _MASK)
            if wd < 0:
                code = ctypes.get_errno()
                if code in (errno.ENOSPC, errno.ENOMEM) and not self._out_of_watches:
                    self._out_of_watches = True
                    logger.warning("out of inotify watches at %s: folders not watched are "
                                   "found by the periodic rescan", folder)
                continue
            self._folders[wd] = (os.fsencode(folder), depth + below)
            if announce:
                # Listed once the watch stands, not from the walk's earlier listing: a file
                # moved in between (a tool that makes a folder and drops a batch into it at
                # once) has no event of its own and would wait for the periodic rescan.
                for name in _file_names(folder):
                    self.events.put(FileCreatedEvent(os.fspath(folder / name)))

    def _forget_tree(self, top: bytes) -> None:
        """A folder moved away: its watches (and those below it) no longer name it."""
        prefix = top + b"/"
        for wd, (folder, _depth) in list(self._folders.items()):
            if folder == top or folder.startswith(prefix):
                self._libc.inotify_rm_watch(self._fd, wd)
                self._folders.pop(wd, None)

    def _loop(self) -> None:
        while True:
            ready, _, _ = select.select([self._fd, self._wake_r], [], [])
            if self._wake_r in ready:
                return
            try:
                data = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                continue
            try:
                self._dispatch(data)
            except Exception:  # one odd event must not end the watching
                logger.exception("cannot handle an inotify event")

    def _dispatch(self, data: bytes) -> None:
        offset = 0
        while offset + _HEADER.size <= len(data):
            wd, mask, _cookie, length = _HEADER.unpack_from(data, offset)
            name = data[offset + _HEADER.size: offset + _HEADER.size + length].rstrip(b"\0")
            offset += _HEADER.size + length
            if mask & IN_Q_OVERFLOW:
                if self.overflowed is not None:
                    self.overflowed()
                continue
            if mask & IN_IGNORED:
                self._folders.pop(wd, None)
                continue
            known = self._folders.get(wd)
            if known is None or not name:
                continue
            folder, depth = known
            path = folder + b"/" + name
            if mask & IN_ISDIR:
                if mask & IN_MOVED_FROM:
                    self._forget_tree(path)
                elif mask & (IN_CREATE | IN_MOVED_TO) and not name.startswith(b"."):
                    self._add_tree(Path(os.fsdecode(path)), depth + 1, announce=True)
                continue
            if name.startswith(b"."):
                # A hidden file is never taken (a writer's partial file, such as the DICOM
                # listener's): its create, open, write and close are four events a received
                # object would cost for nothing. Renamed in, it arrives as a visible name.
                continue
            text = os.fsdecode(path)
            if mask & IN_MOVED_FROM:
                self.events.put(FileMovedEvent(text, ""))
            elif mask & IN_MOVED_TO:
                self.events.put(FileMovedEvent("", text))
            else:
                for bit, event in _FILE_EVENTS.items():
                    if mask & bit:
                        self.events.put(event(text))
