"""The inbox watcher: takes complete files into the store, records them, enqueues them in batches.

When a file is complete is `scheduler.stability`'s rule: on Linux from close-after-write events
(`scheduler.inotify`), elsewhere or with `polling` from frequent scans. A scan at start and a
periodic rescan catch what arrived while it was down. The inbox may be shared with other users,
so it is read as untrusted input: folders below `scheduler.files.MAX_DEPTH` are skipped, a file
over `MELANOSCREEN_MAX_FILE_BYTES` is never read, and a file left in the inbox (too large, empty)
is looked at once, then passed by until it changes (`scheduler.leftovers`), with one log line
per scan for all of them. One user's many files cannot hold up another's: the files that are
ready are taken in turns, one per owner, for at most TAKE_BUDGET seconds per tick.
It never imports TensorFlow: work is enqueued by task name.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker
from watchdog.events import FileClosedNoWriteEvent, FileOpenedEvent, FileSystemEvent

from db import images
from db.schema import utcnow
from melanoscreen.settings import Settings
from scheduler.files import MAX_DEPTH, inbox_folders, is_ignored
from scheduler.inotify import InboxEvents
from scheduler.intake import Intake
from scheduler.queue import chunks
from scheduler.stability import Pending, Readiness
from service.dicom import preload as preload_dicom_reader

logger = logging.getLogger(__name__)

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

#: Seconds of taking files per tick: the rest waits for the next tick (events, the batch timer and
#: the heartbeat are not held up behind a long line of files).
TAKE_BUDGET = 0.5
#: Seconds after the kernel dropped inotify events (its queue overflowed) before a rescan.
OVERFLOW_RESCAN_DELAY = 0.5

#: At most this many too-deep folders are remembered as logged.
TOO_DEEP_MAX = 10_000
#: Hands committed image ids to the queue (`scheduler.queue.send_screen_batch` on a producer).
SendBatch = Callable[[Sequence[int]], None]


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
        # Close-after-write events exist only with inotify.
        self.readiness = Readiness(settings.stable_seconds,
                                   fast=sys.platform.startswith("linux") and not polling)
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
        #: Folders found too deep, already logged (each is logged once).
        self.too_deep_logged: set[Path] = set()
        #: Times the kernel dropped events since the last scan (set from the inotify thread).
        self.overflows = 0
        #: Scans done (each logs at most one line about files left in the inbox).
        self.scans = 0

    @property
    def pending(self) -> dict[Path, Pending]:
        """The files under observation, not taken yet."""
        return self.readiness.pending

    @property
    def fast(self) -> bool:
        """Whether close-after-write events arrive (inotify); else the inbox is polled."""
        return self.readiness.fast

    @fast.setter
    def fast(self, value: bool) -> None:
        self.readiness.fast = value

    def too_deep(self, folder: Path) -> None:
        """A folder below MAX_DEPTH: skipped, with one log line (per folder)."""
        if folder in self.too_deep_logged or len(self.too_deep_logged) >= TOO_DEEP_MAX:
            return
        self.too_deep_logged.add(folder)
        logger.warning("%s is more than %d folders below the inbox: skipped, nothing in it is taken",
                       folder, MAX_DEPTH)

    def run(self, stop: threading.Event) -> None:
        """Scan, then follow events and rescan periodically; flushes the last batch on stop.

        A database or disk error pauses the intake (files stay in the inbox) with a growing
        backoff; nothing here ends the loop but `stop`.
        """
        self.stop = stop
        self.inbox.mkdir(parents=True, exist_ok=True)
        preload_dicom_reader()
        watching = InboxEvents(self.inbox, self.events, self.too_deep,
                               overflowed=self.overflowed) if self.fast else None
        if watching is not None:
            watching.start()
        # Without events, a scan this often sees files appear and settle.
        poll = max(0.2, min(1.0, self.settings.stable_seconds / 2))
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
                if self.overflows:
                    next_rescan = min(next_rescan, time.monotonic() + OVERFLOW_RESCAN_DELAY)
                if time.monotonic() >= next_rescan:
                    self.rescan()
                    next_rescan = time.monotonic() + (
                        self.settings.rescan_interval if watching is not None else poll)
        finally:
            if watching is not None:
                watching.stop()
            self.flush()

    def overflowed(self) -> None:
        """The kernel dropped events (its queue overflowed): rescan soon (inotify thread)."""
        self.overflows += 1

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
        """Put every candidate file in the inbox under observation (taken once stable); folders
        deeper than MAX_DEPTH are skipped. Files left in the inbox as they were are passed by
        without a stat; a bounded number of them is checked for changes in turn. After the
        kernel dropped events, a file still counted open falls back to the stable rule (its close
        may be among them). Ends with at most one line about the files left in the inbox since
        the last scan."""
        now = time.monotonic()
        overflows, self.overflows = self.overflows, 0
        if overflows:
            self.readiness.events_lost(now)
        left = self.intake.left
        present: set[str] = set()
        for folder, _depth, names in inbox_folders(self.inbox, MAX_DEPTH, self.too_deep):
            base = os.fspath(folder) + "/"
            for name in names:
                path = base + name
                if path in left:
                    present.add(path)  # left as it was: no stat (the recheck below takes turns)
                else:
                    self.readiness.observe(Path(path), now)
        left.keep_only(present)
        for path in left.changed():
            self.readiness.observe(Path(path), now)
        self.scans += 1
        if overflows:
            logger.warning("the kernel dropped inotify events %d time(s) (a burst of files); "
                           "rescanned the inbox", overflows)
        said = left.summary(self.settings.max_file_bytes)
        if said is not None:
            line, serious = said
            logger.log(logging.WARNING if serious else logging.INFO, "%s", line)

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
        """Update a file's readiness from one event (`now`: monotonic seconds). Opening and
        closing without a write (our own look at it included) bring no file left in the inbox
        back: only a change does."""
        if isinstance(event, FileOpenedEvent | FileClosedNoWriteEvent) \
                and os.fsdecode(event.src_path) in self.intake.left:
            return
        self.readiness.on_event(event, time.monotonic() if now is None else now)

    def take_ready(self, now: float | None = None) -> None:
        """Take the files that are complete (`now`: monotonic seconds); forget vanished ones.

        A file that is empty or too large (by its lstat) is left in the inbox unread, without
        being opened. The others are taken in turns, one per owner (the owner with the fewest
        waiting first), for at most TAKE_BUDGET seconds; the rest stay ready for the next tick.
        """
        now = time.monotonic() if now is None else now
        by_owner: dict[int, list[Path]] = {}
        for path, entry in list(self.pending.items()):
            if self.stop.is_set():
                return  # stopping: what is left stays in the inbox for the next start
            ready = self.readiness.is_ready(path, entry, now)
            if ready is None:
                del self.pending[path]
            elif ready:
                info = entry.info
                assert info is not None  # is_ready took it
                if self.intake.left.unchanged(os.fspath(path), info) or self._ignored(path):
                    del self.pending[path]  # left in the inbox as it is, or not ours to take
                    continue
                reason = self.intake.left_reason(info)
                if reason is not None:
                    del self.pending[path]
                    self.intake.leave(path, info, reason)
                    continue
                entry.ready = True
                by_owner.setdefault(info.st_uid, []).append(path)
        deadline = time.monotonic() + TAKE_BUDGET
        for path in _in_turns(by_owner):
            if self.stop.is_set() or time.monotonic() > deadline:
                return  # the rest stay ready: taken at the next tick
            if not self.take_one(path, now):
                return

    def _ignored(self, path: Path) -> bool:
        """Hidden, partial or temporary names (`scheduler.files.is_ignored`), or outside the inbox."""
        try:
            return is_ignored(path.relative_to(self.inbox))
        except ValueError:
            return True

    def take_one(self, path: Path, now: float) -> bool:
        """Take one complete file; False after a database or disk error (paused: back off)."""
        entry = self.pending.pop(path)
        try:
            image_id = self.intake.take(path)
        except DBAPIError as exc:
            entry.ready = True  # complete: taken first when the database answers
            self.pending[path] = entry
            self._back_off(f"database error taking {path}: {exc.orig or exc}")
            return False
        except OSError as exc:
            if exc.errno in _DISK_ERRNOS:
                entry.ready = True
                self.pending[path] = entry
                self._back_off(f"disk error taking {path}: {exc}")
                return False
            logger.error("cannot take %s: %s", path, exc)
            return True
        except Exception:
            # One file must never stop the intake of all the others.
            logger.exception("cannot take %s", path)
            return True
        self.backoff = 0.0
        if image_id is not None:
            if not self.batch:
                self.batch_started = now
            self.batch.append(image_id)
            if len(self.batch) >= self.settings.batch.size:
                self.flush()
        return True

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


def _in_turns(by_owner: dict[int, list[Path]]) -> Iterator[Path]:
    """One file of each owner in turn, the owner with the fewest first, each owner's in the
    order they were seen: a user's thousand files hold up another's one file by one take."""
    queues = sorted(by_owner.values(), key=len)
    index = 0
    while queues:
        queues = [q for q in queues if index < len(q)]
        for waiting in queues:
            yield waiting[index]
        index += 1
