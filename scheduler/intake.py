"""Intake of one complete inbox file: hash, record (new or duplicate), move into the data folder.

The inbox may be shared with other users, so a file over `MELANOSCREEN_MAX_FILE_BYTES` is never
read (it stays in the inbox: moving another user's file would mean copying it), and a file left
in the inbox (too large, empty) is remembered (`scheduler.leftovers`): looked at again only when
it changes, and counted in one line per scan, never logged one by one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from datetime import datetime
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from db import dicom, images
from db.schema import utcnow
from melanoscreen.settings import Settings
from scheduler.files import (
    InboxFile,
    TooLarge,
    is_ignored,
    open_inbox_file,
    recorded_name,
    sha256_of,
    store_suffix,
    unique_path,
)
from scheduler.leftovers import EMPTY, NOT_REGULAR, TOO_LARGE, LeftInInbox
from service.dicom import DicomFacts, pseudonym_key, pseudonymised, read_facts, starts_like_dicom

logger = logging.getLogger(__name__)


class Intake:
    """Takes one complete file: hash, record (new or duplicate), move into the data folder."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        self.sessions = sessions
        self.inbox = settings.inbox_dir.resolve()
        #: Files left in the inbox (empty, too large), as they were when seen.
        self.left = LeftInInbox()

    def left_reason(self, info: os.stat_result) -> str | None:
        """Why a file with this lstat stays in the inbox without being read (not a regular file,
        empty, too large); None when it is to be taken."""
        if not stat.S_ISREG(info.st_mode):
            return NOT_REGULAR
        if info.st_size == 0:
            return EMPTY
        return TOO_LARGE if info.st_size > self.settings.max_file_bytes else None

    def leave(self, path: Path, info: os.stat_result, reason: str) -> None:
        """Leave a file in the inbox, unread, remembered as it is now (counted in the next
        scan's line)."""
        text = os.fspath(path)
        shown = text[len(os.fspath(self.settings.inbox_dir)) + 1:] or text
        self.left.note(text, shown, info, reason)

    def relative_name(self, path: Path) -> Path | None:
        """The inbox-relative name, or None for anything we must not read."""
        try:
            info = path.lstat()
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(info.st_mode) or not stat.S_ISREG(info.st_mode):
            return None
        if self.left.unchanged(os.fspath(path), info):
            return None  # left in the inbox as it is, until it changes
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
        info = path.lstat()
        limit = self.settings.max_file_bytes
        if info.st_size > limit:
            self.leave(path, info, TOO_LARGE)
            return None
        try:
            opened = open_inbox_file(self.inbox, relative, self.settings.staging_dir, limit)
        except TooLarge:
            self.leave(path, info, TOO_LARGE)  # it grew past the limit while it was read
            return None
        if opened is None:
            return None
        with opened:
            if opened.size == 0:
                # A failed or unfinished write (a full disk makes many): not content, and
                # never a duplicate of another empty file. It waits in the inbox; a write to
                # it (close event) or the rescan's recheck brings it back.
                self.leave(path, opened.info, EMPTY)
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
        facts = self.dicom_facts(opened)
        try:
            with self.sessions.begin() as session:
                known = images.find_image_by_sha256(session, opened.sha256)
                if known is None and facts is not None and facts.sop_instance_uid:
                    # One DICOM object (its SOP instance UID) is one image, whatever transfer
                    # syntax a resend chose: a retry in another encoding is a duplicate too.
                    known = dicom.image_of_sop_instance(session, facts.sop_instance_uid)
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
                                              received_at=received)  # flushed: it has its id
                    if facts is not None:
                        dicom.add_instance(session, image.id, **facts.columns())
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

    def dicom_facts(self, opened: InboxFile) -> DicomFacts | None:
        """The patient and study of a DICOM file (pseudonymised when the settings say so);
        None for any other file, or a DICOM header that cannot be read."""
        head = os.pread(opened.fd, 132, 0)
        if not starts_like_dicom(head):
            return None
        if opened.staged is not None:
            with open(opened.staged, "rb") as handle:
                facts = read_facts(handle)
        else:
            with os.fdopen(os.dup(opened.fd), "rb") as handle:
                facts = read_facts(handle)
        return self._as_settings_say(facts)

    def _stored_facts(self, path: Path) -> DicomFacts | None:
        """The facts of a file already in the store (recovered after a kill), if DICOM."""
        with open(path, "rb") as handle:
            if not starts_like_dicom(handle.read(132)):
                return None
            return self._as_settings_say(read_facts(handle))

    def _as_settings_say(self, facts: DicomFacts | None) -> DicomFacts | None:
        """Pseudonymised when MELANOSCREEN_DICOM_PSEUDONYMISE says so."""
        if facts is not None and self.settings.dicom.pseudonymise:
            facts = pseudonymised(facts, pseudonym_key(self.settings.dicom_key_file))
        return facts

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
                    session.flush()
                    facts = self._stored_facts(path)
                    if facts is not None:
                        dicom.add_instance(session, image.id, **facts.columns())
                    recovered.append(image.id)
                    logger.warning("recovered %s from the store as image %d", source, image.id)
        if notes.is_dir():
            for note in notes.glob("*.name"):
                note.unlink(missing_ok=True)
        return recovered


def _stamped(when: datetime, name: str) -> str:
    return f"{when:%Y%m%dT%H%M%S%f}-{name}"
