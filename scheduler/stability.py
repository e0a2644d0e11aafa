"""The readiness rule of the inbox: when a file is complete, from events and from its stat.

On Linux a file is complete as soon as its writer closes it (IN_CLOSE_WRITE) or it is renamed
into the inbox; elsewhere, or without events, once its size and mtime have stayed unchanged for
`stable_seconds` and no process holds it open for writing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
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

from scheduler.files import open_for_writing

#: With close-after-write events, a created file that nobody holds open (a rename from outside
#: the inbox) is taken once it has been quiet this long (seconds).
MOVED_IN_SETTLE = 0.3


@dataclass
class Pending:
    """What is known of one inbox file that is not taken yet."""

    opens: int = 0
    quiet: float = 2.0  # seconds unchanged before it is taken without a close event
    size: int = -1
    mtime_ns: int = -1
    changed_at: float = 0.0
    ready: bool = False
    #: Its lstat when the rule last looked (owner, size: read by the watcher's triage).
    info: os.stat_result | None = None


class Readiness:
    """The files under observation and the rule that says when each is complete."""

    def __init__(self, stable_seconds: float, *, fast: bool) -> None:
        self.stable_seconds = stable_seconds
        #: Close-after-write events arrive (inotify): a close means complete.
        self.fast = fast
        self.pending: dict[Path, Pending] = {}

    def observe(self, path: Path, now: float) -> None:
        """Put a file a scan found under observation (taken once stable), unless it is already."""
        if path not in self.pending:
            self.pending[path] = Pending(quiet=self.stable_seconds, changed_at=now)

    def on_event(self, event: FileSystemEvent, now: float) -> None:
        """Update a file's readiness from one event (`now`: monotonic seconds)."""
        if isinstance(event, FileMovedEvent):
            self.pending.pop(Path(os.fsdecode(event.src_path)), None)
            if event.dest_path:
                # A rename inside the inbox (x.part -> x.jpg): the content is complete.
                self.pending[Path(os.fsdecode(event.dest_path))] = Pending(ready=True)
            return
        path = Path(os.fsdecode(event.src_path))
        entry = self.pending.get(path)
        if isinstance(event, FileCreatedEvent):
            quiet = MOVED_IN_SETTLE if self.fast else self.stable_seconds
            self.pending[path] = Pending(quiet=quiet, changed_at=now,
                                         opens=entry.opens if entry else 0)
        elif isinstance(event, FileOpenedEvent):
            # Opening changes nothing (and our own checks open files): no clock reset here.
            entry = self.pending.setdefault(path, Pending(quiet=self.stable_seconds, changed_at=now))
            entry.opens += 1
        elif isinstance(event, FileClosedNoWriteEvent):
            if entry is not None:
                entry.opens = max(0, entry.opens - 1)
        elif isinstance(event, FileClosedEvent):
            entry = self.pending.setdefault(path, Pending())
            entry.opens = max(0, entry.opens - 1)
            if entry.opens == 0:
                entry.ready = True  # the writer closed it: complete, take it now
        elif isinstance(event, FileModifiedEvent):
            entry = self.pending.setdefault(path, Pending(quiet=self.stable_seconds))
            entry.changed_at = now
            entry.ready = False

    def events_lost(self, now: float) -> None:
        """The kernel dropped events (its queue overflowed): a close may be among them, so the
        open counts are no longer known. Each file still counted open falls back to the stable
        rule (unchanged for `stable_seconds`, then the kernel asked whether anyone writes it),
        instead of waiting forever for a close that will never come."""
        for entry in self.pending.values():
            if entry.opens > 0 and not entry.ready:
                entry.opens = 0
                entry.quiet = self.stable_seconds
                entry.changed_at = now

    def is_ready(self, path: Path, entry: Pending, now: float) -> bool | None:
        """True: take it; False: wait; None: gone, forget it."""
        try:
            info = entry.info = path.lstat()
        except FileNotFoundError:
            return None
        if entry.ready:
            return True
        if entry.opens > 0:
            return False
        if (info.st_size, info.st_mtime_ns) != (entry.size, entry.mtime_ns):
            entry.size, entry.mtime_ns, entry.changed_at = info.st_size, info.st_mtime_ns, now
            if entry.quiet > 0:
                return False
        elif now - entry.changed_at < entry.quiet:
            return False
        # Quiet long enough; but a writer that started before its folder was watched, or before
        # the watcher ran, sent us no open event: ask the kernel whether anyone still writes.
        writing = open_for_writing(path)
        if writing:
            entry.changed_at = now
            return False
        if writing is None and entry.quiet < self.stable_seconds:
            entry.quiet = self.stable_seconds  # cannot tell: fall back to the stable rule
            return False
        return True
