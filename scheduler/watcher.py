"""The inbox watcher: takes complete files into the store, records them, enqueues them in batches.

On Linux a file is taken as soon as its writer closes it (IN_CLOSE_WRITE) or it is renamed into
the inbox; elsewhere, or with `polling`, once its size and mtime have stayed unchanged for
`stable_seconds`. A scan at start and a periodic rescan catch what arrived while it was down.
It never imports TensorFlow: work is enqueued by task name.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import stat
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker
from watchdog.events import (
    FileClosedEvent,
    FileClosedNoWriteEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileOpenedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver

from db import images
from db.schema import utcnow
from melanoscreen.settings import Settings
from scheduler.files import (
    InboxFile,
    is_ignored,
    open_for_writing,
    open_inbox_file,
    recorded_name,
    sha256_of,
    store_suffix,
    unique_path,
)
from scheduler.queue import chunks

logger = logging.getLogger(__name__)

#: With close-after-write events, a created file that nobody holds open (a rename from outside
#: the inbox) is taken once it has been quiet this long (seconds).
MOVED_IN_SETTLE = 0.3
#: How often (seconds) the loop checks pending files and the batch timer.
TICK = 0.05

#: Longest pause (seconds) after a database or disk error before files are taken again.
MAX_BACKOFF = 30.0
#: Errors of the disk under the data folder: wait for space (or a remount), then go on.
_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})

#: Seconds between attempts to send what the broker refused.
RESEND_INTERVAL = 2.0
#: Seconds between touches of the heartbeat file while the loop runs (a health check reads it).
HEARTBEAT_INTERVAL = 5.0

#: Hands committed image ids to the queue (`scheduler.queue.send_screen_batch` on a producer).
SendBatch = Callable[[Sequence[int]], None]


@dataclass
class _Pending:
    opens: int = 0
    quiet: float = 2.0  # seconds unchanged before it is taken without a close event
    size: int = -1
    mtime_ns: int = -1
    changed_at: float = 0.0
    ready: bool = False


class Intake:
    """Takes one complete file: hash, record (new or duplicate), move into the data folder."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        self.sessions = sessions
        self.inbox = settings.inbox_dir.resolve()

    def relative_name(self, path: Path) -> Path | None:
        """The inbox-relative name, or None for anything we must not read."""
        try:
            info = path.lstat()
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(info.st_mode) or not stat.S_ISREG(info.st_mode):
            return None
        try:
            relative = Path(os.path.abspath(path)).relative_to(self.inbox)
            # A symlinked folder could lead outside: the real path must stay inside too.
            path.resolve().relative_to(self.inbox)
        except ValueError:
            return None
        return None if is_ignored(relative) else relative

    def take(self, path: Path) -> int | None:
        """Take `path`; returns the new image id to enqueue, or None (duplicate, ignored, gone).

        The file is opened once without following links; what is hashed is what is moved
        (scheduler.files.InboxFile), so a name swapped for a link meanwhile is never taken.
        """
        relative = self.relative_name(path)
        if relative is None:
            return None
        opened = open_inbox_file(self.inbox, relative, self.settings.staging_dir)
        if opened is None:
            return None
        with opened:
            if opened.size == 0:
                # A failed or unfinished write (a full disk makes many): not content, and
                # never a duplicate of another empty file. It waits in the inbox; a write to
                # it (close event) or a rescan brings it back.
                logger.info("%s is empty; left in the inbox until it has content", relative)
                return None
            self._make_folders_private(relative)
            return self._record_and_move(opened, relative, path.name)

    def _record_and_move(self, opened: InboxFile, relative: Path, name: str) -> int | None:
        """Write the row, then move, then commit; if the commit fails the file goes back.

        The store move is preceded by a name note (staging/<sha256>.name, fsynced) that is
        removed after the commit: a kill between the move and the commit leaves the note, and
        `recover_store` restores the real name from it.
        """
        source = recorded_name(relative)
        received = utcnow()
        target: Path | None = None
        note: Path | None = None
        try:
            with self.sessions.begin() as session:
                known = images.find_image_by_sha256(session, opened.sha256)
                if known is not None:
                    target = unique_path(self.settings.duplicates_dir / _stamped(received, name))
                    images.add_duplicate(session, image_id=known.id, source=source,
                                          location=str(target), received_at=received)
                    session.flush()  # a locked or full database fails here, before the move
                    opened.move_to(target)
                    logger.info("%s is a duplicate of image %d (%s); kept in %s", relative,
                                known.id, known.source, target)
                    image_id = None
                else:
                    target = self.store_path(opened.sha256, name)
                    image = images.add_image(session, sha256=opened.sha256, source=source,
                                              size_bytes=opened.size, location=str(target),
                                              received_at=received)
                    session.flush()
                    note = self.write_name_note(opened.sha256, source)
                    opened.move_to(target)
                    image_id = image.id
        except BaseException:
            if target is not None and opened.moved:
                with contextlib.suppress(OSError):
                    opened.move_back(target)
            if note is not None:
                note.unlink(missing_ok=True)
            raise
        if note is not None:
            note.unlink(missing_ok=True)
        if image_id is not None:
            logger.info("%s received as image %d", relative, image_id)
        return image_id

    def write_name_note(self, sha256: str, source: str) -> Path:
        """staging/<sha256>.name holding `source`, on disk before the store move."""
        self.settings.staging_dir.mkdir(parents=True, exist_ok=True)
        note = self.settings.staging_dir / f"{sha256}.name"
        fd = os.open(note, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            os.write(fd, source.encode("utf-8", "surrogateescape"))
            os.fsync(fd)
        finally:
            os.close(fd)
        return note

    def _make_folders_private(self, relative: Path) -> None:
        """An inbox inside the data folder is private like the rest of it: subfolders that a
        dropping tool made with its own umask are closed to other users (ours only)."""
        if not self.inbox.is_relative_to(self.settings.data_path.resolve()):
            return
        folder = self.inbox
        for part in relative.parent.parts:
            folder = folder / part
            with contextlib.suppress(OSError):
                info = folder.lstat()
                if stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid() \
                        and stat.S_IMODE(info.st_mode) & 0o077:
                    folder.chmod(stat.S_IMODE(info.st_mode) & 0o700)

    def store_path(self, sha256: str, name: str) -> Path:
        """store/ab/abcdef...<suffix>: one file per content; a short, plain suffix or none."""
        return self.settings.store_dir / sha256[:2] / f"{sha256}{store_suffix(name)}"

    def clear_staging(self) -> None:
        """Private copies left by a crash go: their originals are still in the inbox."""
        staging = self.settings.staging_dir
        if staging.is_dir():
            for leftover in staging.glob("*.part"):
                leftover.unlink(missing_ok=True)

    def recover_store(self) -> list[int]:
        """Record files that reached the store without their row (a kill between move and
        commit), under the name their note kept; then drop the notes."""
        store = self.settings.store_dir
        notes = self.settings.staging_dir
        recovered = []
        if store.is_dir():
            with self.sessions.begin() as session:
                for path in sorted(store.glob("??/*")):
                    sha256 = path.stem
                    if len(sha256) != 64 or images.find_image_by_sha256(session, sha256):
                        continue
                    note = notes / f"{sha256}.name"
                    try:
                        source = note.read_bytes().decode("utf-8", "backslashreplace")
                    except FileNotFoundError:  # moved by a version without notes
                        source = f"(recovered)/{path.name}"
                    image = images.add_image(session, sha256=sha256_of(path), source=source,
                                              size_bytes=path.stat().st_size, location=str(path),
                                              received_at=utcnow())
                    recovered.append(image.id)
                    logger.warning("recovered %s from the store as image %d", source, image.id)
        if notes.is_dir():
            for note in notes.glob("*.name"):
                note.unlink(missing_ok=True)
        return recovered


def _stamped(when: datetime, name: str) -> str:
    return f"{when:%Y%m%dT%H%M%S%f}-{name}"


class _Forward(FileSystemEventHandler):
    """Hands watchdog's events to the watcher loop (one thread does all the work)."""

    def __init__(self, events: queue.Queue[FileSystemEvent]) -> None:
        self.events = events

    def on_any_event(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self.events.put(event)


class Watcher:
    """Watches the inbox and feeds the pipeline until `stop` is set."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], send_batch: SendBatch,
                 *, polling: bool = False) -> None:
        self.settings = settings
        self.inbox = settings.inbox_dir
        self.intake = Intake(settings, sessions)
        self.sessions = sessions
        self.send_batch = send_batch
        self.events: queue.Queue[FileSystemEvent] = queue.Queue()
        self.pending: dict[Path, _Pending] = {}
        self.batch: list[int] = []
        self.batch_started = 0.0
        self.stop = threading.Event()
        #: After a database or disk error no file is taken before `resume_at` (monotonic).
        self.backoff = 0.0
        self.resume_at = 0.0
        #: When to look for committed rows that never reached the queue (broker was down).
        self.resend_at: float | None = None
        #: When the heartbeat file is touched next (monotonic).
        self.heartbeat_at = 0.0
        # Close-after-write events exist only with inotify.
        self.fast = sys.platform.startswith("linux") and not polling

    def _observer(self) -> BaseObserver:
        if self.fast:
            from watchdog.observers.inotify import InotifyObserver

            return InotifyObserver()
        from watchdog.observers.polling import PollingObserver

        return PollingObserver(timeout=max(0.2, min(1.0, self.settings.stable_seconds / 2)))

    def run(self, stop: threading.Event) -> None:
        """Scan, then follow events and rescan periodically; flushes the last batch on stop.

        A database or disk error pauses the intake (files stay in the inbox) with a growing
        backoff; nothing here ends the loop but `stop`.
        """
        self.stop = stop
        self.inbox.mkdir(parents=True, exist_ok=True)
        observer = self._observer()
        observer.schedule(_Forward(self.events), str(self.inbox), recursive=True)
        observer.start()
        logger.info("watching %s (%s)", self.inbox,
                    "close-after-write events" if self.fast else "polling for stable files")
        try:
            while not stop.is_set() and not self.start_up():
                stop.wait(self.backoff)
            self.rescan()
            next_rescan = time.monotonic() + self.settings.rescan_interval
            while not stop.is_set():
                self.touch_heartbeat()
                self.drain_events(timeout=TICK)
                if time.monotonic() >= self.resume_at:
                    self.take_ready()
                self.flush_if_due()
                if self.resend_at is not None and time.monotonic() >= self.resend_at:
                    self.resend_unenqueued()
                if time.monotonic() >= next_rescan:
                    self.rescan()
                    next_rescan = time.monotonic() + self.settings.rescan_interval
        finally:
            observer.stop()
            observer.join(timeout=5)
            self.flush()

    def touch_heartbeat(self) -> None:
        """Every HEARTBEAT_INTERVAL, set the heartbeat file's mtime to now: the loop is alive
        (`melanoscreen healthcheck watch` reads it). Not during the start's backoff: a watcher
        that cannot reach its database is not healthy."""
        now = time.monotonic()
        if now < self.heartbeat_at:
            return
        self.heartbeat_at = now + HEARTBEAT_INTERVAL
        try:
            self.settings.heartbeat_file.touch()  # 0600 under the service's umask
        except OSError as exc:
            logger.warning("cannot touch the heartbeat file %s: %s", self.settings.heartbeat_file,
                           exc.strerror or exc)

    def start_up(self) -> bool:
        """Recover the store, then enqueue every committed row that never reached the queue
        (a watcher killed between commit and send); False after a database or disk error."""
        try:
            self.intake.clear_staging()
            recovered = self.intake.recover_store()
        except (DBAPIError, OSError) as exc:
            self._back_off(f"cannot recover the store: {exc}")
            return False
        self._enqueue_now(recovered)
        self.resend_unenqueued()
        return True

    def resend_unenqueued(self) -> None:
        """Enqueue the `queued` rows never handed to the queue (at start, and once the broker
        answers again after a failed send), instead of waiting for the sweep."""
        self.resend_at = None
        try:
            with self.sessions.begin() as session:
                ids = images.unenqueued_image_ids(session)
        except DBAPIError as exc:
            logger.warning("cannot look for images not yet enqueued: %s", exc)
            self.resend_at = time.monotonic() + max(self.backoff, 2.0)
            return
        ids = [i for i in ids if i not in self.batch]
        if ids:
            logger.info("enqueueing %d image(s) recorded but never enqueued", len(ids))
            self._enqueue_now(ids)

    def _back_off(self, why: str) -> None:
        self.backoff = min(MAX_BACKOFF, max(0.5, self.backoff * 2))
        self.resume_at = time.monotonic() + self.backoff
        logger.warning("%s; files stay in the inbox, trying again in %.1f s", why, self.backoff)

    def rescan(self) -> None:
        """Put every candidate file in the inbox under observation (taken once stable)."""
        for root, dirs, files in os.walk(self.inbox, followlinks=False):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in files:
                path = Path(root) / name
                if path not in self.pending:
                    self.pending[path] = _Pending(quiet=self.settings.stable_seconds,
                                                  changed_at=time.monotonic())

    def drain_events(self, timeout: float) -> None:
        """Apply the file-system events that arrived, waiting up to `timeout` for the first."""
        try:
            event = self.events.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            self.on_event(event)
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return

    def on_event(self, event: FileSystemEvent, now: float | None = None) -> None:
        """Update a file's readiness from one event (`now`: monotonic seconds)."""
        now = time.monotonic() if now is None else now
        if isinstance(event, FileMovedEvent):
            self.pending.pop(Path(os.fsdecode(event.src_path)), None)
            if event.dest_path:
                # A rename inside the inbox (x.part -> x.jpg): the content is complete.
                self.pending[Path(os.fsdecode(event.dest_path))] = _Pending(ready=True)
            return
        path = Path(os.fsdecode(event.src_path))
        entry = self.pending.get(path)
        if isinstance(event, FileCreatedEvent):
            quiet = MOVED_IN_SETTLE if self.fast else self.settings.stable_seconds
            self.pending[path] = _Pending(quiet=quiet, changed_at=now,
                                          opens=entry.opens if entry else 0)
        elif isinstance(event, FileOpenedEvent):
            # Opening changes nothing (and our own checks open files): no clock reset here.
            entry = self.pending.setdefault(path, _Pending(quiet=self.settings.stable_seconds,
                                                           changed_at=now))
            entry.opens += 1
        elif isinstance(event, FileClosedNoWriteEvent):
            if entry is not None:
                entry.opens = max(0, entry.opens - 1)
        elif isinstance(event, FileClosedEvent):
            entry = self.pending.setdefault(path, _Pending())
            entry.opens = max(0, entry.opens - 1)
            if entry.opens == 0:
                entry.ready = True  # the writer closed it: complete, take it now
        elif isinstance(event, FileModifiedEvent):
            entry = self.pending.setdefault(path, _Pending(quiet=self.settings.stable_seconds))
            entry.changed_at = now
            entry.ready = False

    def _is_ready(self, path: Path, entry: _Pending, now: float) -> bool | None:
        """True: take it; False: wait; None: gone, forget it."""
        try:
            info = path.lstat()
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
        if writing is None and entry.quiet < self.settings.stable_seconds:
            entry.quiet = self.settings.stable_seconds  # cannot tell: fall back to the stable rule
            return False
        return True

    def take_ready(self, now: float | None = None) -> None:
        """Take every file that is complete (`now`: monotonic seconds); forget vanished ones."""
        now = time.monotonic() if now is None else now
        for path, entry in list(self.pending.items()):
            if self.stop.is_set():
                return  # stopping: what is left stays in the inbox for the next start
            ready = self._is_ready(path, entry, now)
            if ready is None:
                del self.pending[path]
            elif ready:
                del self.pending[path]
                try:
                    image_id = self.intake.take(path)
                except DBAPIError as exc:
                    entry.ready = True  # complete: taken first when the database answers
                    self.pending[path] = entry
                    self._back_off(f"database error taking {path}: {exc.orig or exc}")
                    return
                except OSError as exc:
                    if exc.errno in _DISK_ERRNOS:
                        entry.ready = True
                        self.pending[path] = entry
                        self._back_off(f"disk error taking {path}: {exc}")
                        return

                    logger.error("cannot take %s: %s", path, exc)
                    continue
                except Exception:
                    # One file must never stop the intake of all the others.
                    logger.exception("cannot take %s", path)
                    continue
                self.backoff = 0.0
                if image_id is not None:
                    if not self.batch:
                        self.batch_started = now
                    self.batch.append(image_id)
                    if len(self.batch) >= self.settings.batch.size:
                        self.flush()

    def flush_if_due(self, now: float | None = None) -> None:
        """Enqueue the batch once its first image has waited `MELANOSCREEN_BATCH_DELAY`."""
        now = time.monotonic() if now is None else now
        if self.batch and now - self.batch_started >= self.settings.batch.delay:
            self.flush()

    def flush(self) -> None:
        """Enqueue the batch being filled, now."""
        if self.batch:
            ids, self.batch = self.batch, []
            self._enqueue_now(ids)

    def _enqueue_now(self, image_ids: list[int]) -> None:
        """Send committed ids; if the broker is down they are sent again once it answers."""
        for batch in chunks(image_ids, self.settings.batch.size):
            try:
                self.send_batch(batch)
            except Exception as exc:  # the broker's errors vary by transport
                logger.error("could not enqueue images %s (retrying in a few seconds): %s",
                             batch, exc)
                self.resend_at = time.monotonic() + RESEND_INTERVAL
                continue
            try:
                with self.sessions.begin() as session:
                    images.mark_enqueued(session, batch, utcnow())
            except DBAPIError as exc:  # sent: at worst the sweep sends it once more
                logger.warning("could not note images %s as enqueued: %s", batch, exc)
