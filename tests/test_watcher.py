"""The watcher's readiness rules and batching, in process: real files and a migrated SQLite
database; file-system events and the clock are handed in by the test, so nothing waits."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session, sessionmaker
from watchdog.events import (
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileOpenedEvent,
)

from db.images import add_image
from db.migrate import upgrade
from db.schema import Duplicate, Image, ImageStatus, utcnow
from db.session import make_session_factory
from melanoscreen.settings import BatchSettings, Settings
from scheduler.watcher import Watcher
from tests.conftest import synthetic_jpeg


class Queue:
    """What the watcher hands to the broker: batches of image ids (or a broker that is down)."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.down = False

    def send(self, ids: Sequence[int]) -> None:
        if self.down:
            raise ConnectionError("broker down")
        self.batches.append(list(ids))


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(  # type: ignore[call-arg]
        _env_file=None, data_dir=tmp_path / "data", inbox=tmp_path / "inbox",
        database_url=f"sqlite:///{tmp_path / 'watcher.db'}", stable_seconds=2.0,
        batch=BatchSettings(size=3, delay=0.5))


@pytest.fixture
def sessions(settings: Settings) -> Iterator[sessionmaker[Session]]:
    upgrade(settings.database)
    factory = make_session_factory(settings.database)
    yield factory
    factory.kw["bind"].dispose()


@pytest.fixture
def queue() -> Queue:
    return Queue()


@pytest.fixture
def watcher(settings: Settings, sessions: sessionmaker[Session], queue: Queue) -> Watcher:
    settings.inbox_dir.mkdir(parents=True)
    watcher = Watcher(settings, sessions, queue.send)
    watcher.fast = True  # close-after-write events, as inotify gives them
    return watcher


def images(sessions: sessionmaker[Session]) -> list[Image]:
    with sessions.begin() as session:
        return list(session.scalars(select(Image).order_by(Image.id)))


def write(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def closed(watcher: Watcher, path: Path, now: float) -> None:
    """The events of a copy into the inbox: created, opened, modified, closed after writing."""
    for event in (FileCreatedEvent(str(path)), FileOpenedEvent(str(path)),
                  FileModifiedEvent(str(path)), FileClosedEvent(str(path))):
        watcher.on_event(event, now)


def test_a_file_is_taken_when_its_writer_closes_it_and_not_before(
        watcher: Watcher, sessions: sessionmaker[Session], settings: Settings) -> None:
    content = synthetic_jpeg(1)
    path = write(settings.inbox_dir / "clinic" / "a.jpg", content)
    now = time.monotonic()
    for event in (FileCreatedEvent(str(path)), FileOpenedEvent(str(path)),
                  FileModifiedEvent(str(path))):
        watcher.on_event(event, now)
    watcher.take_ready(now + 60)  # still open for writing: however long it is quiet
    assert images(sessions) == [] and path.exists()

    watcher.on_event(FileClosedEvent(str(path)), now + 60)
    watcher.take_ready(now + 60)
    [image] = images(sessions)
    assert image.source == "clinic/a.jpg" and image.status is ImageStatus.QUEUED
    assert image.sha256 == hashlib.sha256(content).hexdigest()
    stored = Path(image.location)
    assert stored.parent.parent == settings.store_dir and stored.read_bytes() == content
    assert not path.exists() and watcher.pending == {}


def test_a_file_seen_only_by_a_rescan_is_taken_once_its_size_stays_unchanged(
        watcher: Watcher, sessions: sessionmaker[Session], settings: Settings) -> None:
    content = synthetic_jpeg(2, size=(200, 150))
    path = write(settings.inbox_dir / "share" / "b.jpg", content[:1000])
    start = time.monotonic()
    watcher.rescan()
    watcher.take_ready(start)  # first look: size and mtime recorded
    watcher.take_ready(start + 1.9)  # quiet, but not for stable_seconds (2) yet
    assert images(sessions) == []
    with open(path, "ab") as handle:  # the writer goes on
        handle.write(content[1000:])
    watcher.take_ready(start + 3.0)  # it grew: the quiet time starts again
    watcher.take_ready(start + 4.9)
    assert images(sessions) == []
    watcher.take_ready(start + 5.1)
    [image] = images(sessions)
    assert image.sha256 == hashlib.sha256(content).hexdigest()


def test_after_the_kernel_drops_events_a_file_whose_close_was_lost_is_taken_once_stable(
        watcher: Watcher, sessions: sessionmaker[Session], settings: Settings) -> None:
    done = write(settings.inbox_dir / "burst" / "done.jpg", synthetic_jpeg(4))
    writing = write(settings.inbox_dir / "burst" / "writing.jpg", synthetic_jpeg(5)[:500])
    now = time.monotonic()
    for path in (done, writing):
        for event in (FileCreatedEvent(str(path)), FileOpenedEvent(str(path)),
                      FileModifiedEvent(str(path))):
            watcher.on_event(event, now)
    # Both closes are lost in the overflow; one writer has in fact not finished.
    with open(writing, "ab") as still_open:
        watcher.overflowed()
        watcher.rescan()
        watcher.take_ready(time.monotonic())  # sizes and times noted
        watcher.take_ready(time.monotonic() + 1.9)  # not unchanged for stable_seconds (2) yet
        assert images(sessions) == []
        watcher.take_ready(time.monotonic() + 60)
        assert [i.source for i in images(sessions)] == ["burst/done.jpg"]
        still_open.write(synthetic_jpeg(5)[500:])
    watcher.take_ready(time.monotonic() + 120)  # changed: quiet again from now
    watcher.take_ready(time.monotonic() + 180)
    assert [i.source for i in images(sessions)] == ["burst/done.jpg", "burst/writing.jpg"]
    assert watcher.pending == {}


def test_a_rename_into_place_is_taken_at_once_and_the_partial_name_never(
        watcher: Watcher, sessions: sessionmaker[Session], settings: Settings) -> None:
    partial = write(settings.inbox_dir / "c.jpg.part", synthetic_jpeg(3))
    now = time.monotonic()
    for event in (FileCreatedEvent(str(partial)), FileOpenedEvent(str(partial))):
        watcher.on_event(event, now)
    final = partial.with_name("c.jpg")
    partial.rename(final)
    watcher.on_event(FileMovedEvent(str(partial), str(final)), now)
    watcher.take_ready(now)
    assert [i.source for i in images(sessions)] == ["c.jpg"]
    assert watcher.pending == {}


def test_hidden_partial_and_linked_files_are_left_where_they_are(
        watcher: Watcher, sessions: sessionmaker[Session], settings: Settings,
        queue: Queue, tmp_path: Path) -> None:
    outside = write(tmp_path / "outside.jpg", synthetic_jpeg(4))
    names = [".hidden.jpg", ".cache/x.jpg", "upload.jpg.part", "x.tmp", "backup.jpg~",
             "get.crdownload"]
    left = [write(settings.inbox_dir / name, synthetic_jpeg(10 + n)) for n, name in enumerate(names)]
    link = settings.inbox_dir / "link.jpg"
    link.symlink_to(outside)
    start = time.monotonic()
    for now in (start, start + 10, start + 20):  # a rescan, and looks long after it
        watcher.rescan()
        watcher.take_ready(now)
        watcher.flush_if_due(now)
    assert images(sessions) == [] and queue.batches == []
    assert all(path.exists() for path in left) and link.is_symlink() and outside.exists()


def test_ids_go_out_in_batches_of_batch_size_or_after_the_batch_delay(
        watcher: Watcher, sessions: sessionmaker[Session], settings: Settings,
        queue: Queue) -> None:
    now = time.monotonic()
    for n in range(4):
        closed(watcher, write(settings.inbox_dir / f"{n}.jpg", synthetic_jpeg(20 + n)), now)
    watcher.take_ready(now)
    ids = [image.id for image in images(sessions)]
    assert queue.batches == [ids[:3]]  # full batch: sent at once
    watcher.flush_if_due(now + 0.4)
    assert queue.batches == [ids[:3]]  # the fourth waits for more, up to the batch delay
    watcher.flush_if_due(now + 0.5)
    assert queue.batches == [ids[:3], ids[3:]]
    assert all(image.enqueued_at is not None for image in images(sessions))


def test_a_second_copy_of_known_content_is_kept_as_a_duplicate_and_not_enqueued(
        watcher: Watcher, sessions: sessionmaker[Session], settings: Settings,
        queue: Queue) -> None:
    content = synthetic_jpeg(5)
    now = time.monotonic()
    closed(watcher, write(settings.inbox_dir / "first.jpg", content), now)
    watcher.take_ready(now)
    closed(watcher, write(settings.inbox_dir / "again" / "second.jpg", content), now)
    watcher.take_ready(now)
    watcher.flush()
    [image] = images(sessions)
    assert queue.batches == [[image.id]]
    with sessions.begin() as session:
        [duplicate] = session.scalars(select(Duplicate))
        assert (duplicate.image_id, duplicate.source) == (image.id, "again/second.jpg")
        kept = Path(duplicate.location)
    assert kept.parent == settings.duplicates_dir and kept.read_bytes() == content


def test_when_the_broker_is_down_the_rows_wait_for_the_sweep(
        watcher: Watcher, sessions: sessionmaker[Session], settings: Settings,
        queue: Queue) -> None:
    queue.down = True
    now = time.monotonic()
    closed(watcher, write(settings.inbox_dir / "d.jpg", synthetic_jpeg(6)), now)
    watcher.take_ready(now)
    watcher.flush()  # does not raise: the image is recorded, the sweep re-enqueues it
    [image] = images(sessions)
    assert image.status is ImageStatus.QUEUED and image.enqueued_at is None
    assert watcher.batch == []


def test_empty_and_truncated_files_are_never_duplicates_of_each_other(
        watcher: Watcher, sessions: sessionmaker[Session], settings: Settings) -> None:
    # What a full disk leaves: 100 empty files (failed writes) and 10 cut-off ones.
    now = time.monotonic()
    whole = synthetic_jpeg(11)
    for i in range(100):
        closed(watcher, write(settings.inbox_dir / f"empty-{i}.jpg", b""), now)
    for i in range(10):
        closed(watcher, write(settings.inbox_dir / f"cut-{i}.jpg", whole[: 200 + 50 * i]), now)
    watcher.take_ready(now)
    watcher.flush()
    assert len(images(sessions)) == 10
    with sessions.begin() as session:
        assert list(session.scalars(select(Duplicate))) == []
    assert sorted(p.name for p in settings.inbox_dir.iterdir()) == sorted(
        f"empty-{i}.jpg" for i in range(100))
    # Content written later is taken then.
    path = write(settings.inbox_dir / "empty-0.jpg", whole)
    closed(watcher, path, now + 1)
    watcher.take_ready(now + 1)
    assert [i.source for i in images(sessions)][-1] == "empty-0.jpg"


def test_rows_the_broker_refused_are_sent_once_it_answers_again(
        watcher: Watcher, sessions: sessionmaker[Session], settings: Settings,
        queue: Queue) -> None:
    queue.down = True
    now = time.monotonic()
    closed(watcher, write(settings.inbox_dir / "d.jpg", synthetic_jpeg(6)), now)
    watcher.take_ready(now)
    watcher.flush()
    assert watcher.resend_at is not None
    queue.down = False
    watcher.resend_unenqueued()
    [image] = images(sessions)
    assert queue.batches == [[image.id]] and image.enqueued_at is not None
    assert watcher.resend_at is None


def test_at_start_rows_never_enqueued_are_sent_and_a_store_file_keeps_its_name(
        watcher: Watcher, sessions: sessionmaker[Session], settings: Settings,
        queue: Queue) -> None:
    # A watcher killed between commit and send: the row is there, never enqueued.
    with sessions.begin() as session:
        committed = add_image(session, sha256="a" * 64, source="clinic/x.jpg",
                                      size_bytes=1, location="/nowhere", received_at=utcnow())
    # A watcher killed between the store move and the commit: the note and the file.
    content = synthetic_jpeg(7)
    sha256 = hashlib.sha256(content).hexdigest()
    watcher.intake.write_name_note(sha256, "clinic/patient 12.jpg")
    write(watcher.intake.store_path(sha256, "patient 12.jpg"), content)
    assert watcher.start_up()
    rows = {image.source: image for image in images(sessions)}
    assert set(rows) == {"clinic/x.jpg", "clinic/patient 12.jpg"}
    assert sorted(i for batch in queue.batches for i in batch) == sorted(
        [committed.id, rows["clinic/patient 12.jpg"].id])
    assert not list(settings.staging_dir.glob("*.name"))


def test_a_locked_database_pauses_the_intake_and_the_file_stays_in_the_inbox(
        settings: Settings, sessions: sessionmaker[Session], queue: Queue) -> None:
    # A short busy timeout stands in for the 60 s lock: the error is the same.
    impatient = sessionmaker(create_engine(settings.database, connect_args={"timeout": 0.2}),
                             expire_on_commit=False)
    settings.inbox_dir.mkdir(parents=True)
    watcher = Watcher(settings, impatient, queue.send)
    watcher.fast = True
    path = write(settings.inbox_dir / "locked.jpg", synthetic_jpeg(8))
    locker = sqlite3.connect(settings.database.removeprefix("sqlite:///"))
    locker.execute("BEGIN EXCLUSIVE")
    now = time.monotonic()
    closed(watcher, path, now)
    watcher.take_ready(now)
    assert path.exists() and watcher.resume_at > now and path in watcher.pending
    assert not list(settings.store_dir.glob("??/*"))
    locker.rollback()
    locker.close()
    watcher.take_ready(now + 1)
    watcher.flush()
    [image] = images(sessions)
    assert image.source == "locked.jpg" and not path.exists() and watcher.backoff == 0.0
    impatient.kw["bind"].dispose()


def test_the_loop_touches_the_heartbeat_file_once_per_interval(watcher: Watcher,
                                                               settings: Settings) -> None:
    settings.data_path.mkdir(parents=True, exist_ok=True)
    watcher.touch_heartbeat()
    first = settings.heartbeat_file.stat().st_mtime_ns
    os.utime(settings.heartbeat_file, ns=(first - 10**11, first - 10**11))  # 100 s ago
    watcher.touch_heartbeat()  # within HEARTBEAT_INTERVAL of the first: not again
    assert settings.heartbeat_file.stat().st_mtime_ns == first - 10**11
    watcher.heartbeat_at = time.monotonic()  # the interval is over
    watcher.touch_heartbeat()
    assert settings.heartbeat_file.stat().st_mtime_ns >= first
