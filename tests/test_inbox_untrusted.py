"""A shared inbox is untrusted input: what another local user drops there must not stop or slow
everyone's intake, nor fill the disk.

A real watcher loop (inotify events, rescans) over a migrated SQLite database; the attacker is
uid 65534 (through `setpriv`), writing into an inbox every user may write (mode 1777, like /tmp).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.migrate import upgrade
from db.schema import Image
from db.session import make_session_factory
from melanoscreen.settings import BatchSettings, Settings
from scheduler.watcher import Watcher
from tests.conftest import synthetic_jpeg

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
#: A second local user, who drops real images into the same shared inbox.
COLLEAGUE = ["setpriv", "--reuid=65533", "--regid=65533", "--clear-groups"]
pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="acting as another local user needs root and setpriv")


def as_nobody(code: str, *args: str, timeout: float = 120, user: Sequence[str] = NOBODY) -> None:
    """Run Python code as uid 65534 (or `user`; standard library only), from a folder anyone
    reads."""
    done = subprocess.run([*user, sys.executable, "-I", "-S", "-c", code, *args], cwd="/",
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr


DEEP_FOLDERS = """
import os, sys
os.chdir(sys.argv[1])
for _ in range(int(sys.argv[2])):
    os.mkdir("d")
    os.chdir("d")
open("deep.jpg", "wb").write(b"not reached")
"""
DROP = """
import os, sys
path = sys.argv[1]
os.makedirs(os.path.dirname(path), exist_ok=True)
with open(path + ".part", "wb") as out:
    out.write(bytes.fromhex(sys.argv[2]))
    if len(sys.argv) > 3:
        out.truncate(int(sys.argv[3]))  # a sparse tail: no disk used, any size claimed
os.rename(path + ".part", path)
"""


#: Empty files, made as fast as a script can: each is created, opened and closed (three events).
EMPTY_FILES = """
import os, sys
os.makedirs(sys.argv[1], exist_ok=True)
os.chdir(sys.argv[1])
for i in range(int(sys.argv[2])):
    os.close(os.open("%d.jpg" % i, os.O_WRONLY | os.O_CREAT, 0o644))
"""


@pytest.fixture
def shared_inbox() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="melanoscreen-shared-"))
    folder.chmod(0o1777)
    yield folder
    subprocess.run(["rm", "-rf", str(folder)], check=False)  # rmtree recurses once per level


@dataclass
class Running:
    """A watcher loop in a thread, its database, and how to stop it."""

    watcher: Watcher
    sessions: sessionmaker[Session]
    stop: threading.Event
    thread: threading.Thread

    def halt(self) -> None:
        """Stop the loop and wait for it."""
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive()


@pytest.fixture
def running(tmp_path: Path, shared_inbox: Path) -> Iterator[Running]:
    """A watcher loop in a thread over the shared inbox; stopped at the end."""
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, data_dir=tmp_path / "data", inbox=shared_inbox,
        database_url=f"sqlite:///{tmp_path / 'watcher.db'}", stable_seconds=2.0,
        rescan_interval=0.5, batch=BatchSettings(size=10, delay=0.1))
    upgrade(settings.database)
    sessions = make_session_factory(settings.database)
    sent: list[int] = []

    def send(ids: Sequence[int]) -> None:
        sent.extend(ids)

    watcher = Watcher(settings, sessions, send)
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
    thread.start()
    loop = Running(watcher, sessions, stop, thread)
    try:
        yield loop
    finally:
        loop.halt()
        sessions.kw["bind"].dispose()


def sources(sessions: sessionmaker[Session]) -> set[str]:
    with sessions.begin() as session:
        return set(session.scalars(select(Image.source)))


def wait_for(condition: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def lines(caplog: pytest.LogCaptureFixture, words: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if words in r.getMessage()]


def test_a_folder_1500_deep_neither_stops_the_intake_nor_floods_the_log(
        running: Running, shared_inbox: Path, caplog: pytest.LogCaptureFixture) -> None:
    sessions = running.sessions
    caplog.set_level(logging.INFO)
    as_nobody(DEEP_FOLDERS, str(shared_inbox), "1500")
    as_nobody(DROP, str(shared_inbox / "clinic-a" / "mole.jpg"), synthetic_jpeg(1).hex())
    as_nobody(DROP, str(shared_inbox / "top.jpg"), synthetic_jpeg(2).hex())
    wait_for(lambda: {"clinic-a/mole.jpg", "top.jpg"} <= sources(sessions))
    wait_for(lambda: len(lines(caplog, "folders below the inbox")) >= 1)
    as_nobody(DROP, str(shared_inbox / "later.jpg"), synthetic_jpeg(3).hex())
    wait_for(lambda: "later.jpg" in sources(sessions))
    # More rescans, by hand once the loop is stopped: still one line for the one folder skipped.
    running.halt()
    for _ in range(3):
        running.watcher.rescan()
    skipped = lines(caplog, "folders below the inbox")
    assert len(skipped) == 1 and "/d/d/d/" in skipped[0]
    assert not [r for r in caplog.records if r.exc_info or "Recursion" in r.getMessage()]
    assert not any(s.endswith("deep.jpg") for s in sources(sessions))


def test_a_deep_folder_moved_in_while_watching_is_skipped_and_intake_goes_on(
        running: Running, shared_inbox: Path, caplog: pytest.LogCaptureFixture) -> None:
    sessions = running.sessions
    caplog.set_level(logging.INFO)
    as_nobody(DROP, str(shared_inbox / "first.jpg"), synthetic_jpeg(4).hex())
    wait_for(lambda: "first.jpg" in sources(sessions))
    staging = shared_inbox / ".building"
    staging.mkdir(mode=0o777)
    staging.chmod(0o777)
    as_nobody(DEEP_FOLDERS, str(staging), "1200")
    as_nobody("import os, sys; os.rename(sys.argv[1] + '/d', sys.argv[1] + '/../tree')", str(staging))
    as_nobody(DROP, str(shared_inbox / "tree" / "shallow.jpg"), synthetic_jpeg(5).hex())
    as_nobody(DROP, str(shared_inbox / "after.jpg"), synthetic_jpeg(6).hex())
    wait_for(lambda: {"tree/shallow.jpg", "after.jpg"} <= sources(sessions))
    assert not [r for r in caplog.records if r.exc_info or "Recursion" in r.getMessage()]


def test_a_5gb_sparse_file_and_a_jpeg_with_a_1gb_tail_are_left_unread_and_logged_once(
        running: Running, shared_inbox: Path, caplog: pytest.LogCaptureFixture) -> None:
    watcher, sessions = running.watcher, running.sessions
    caplog.set_level(logging.INFO)
    as_nobody(DROP, str(shared_inbox / "sparse.jpg"), "", str(5 << 30))
    as_nobody(DROP, str(shared_inbox / "tail.jpg"), synthetic_jpeg(7).hex(), str(1 << 30))
    started = time.monotonic()
    as_nobody(DROP, str(shared_inbox / "good.jpg"), synthetic_jpeg(8).hex())
    wait_for(lambda: "good.jpg" in sources(sessions))
    assert time.monotonic() - started < 20  # not held up behind gigabytes
    wait_for(lambda: "tail.jpg" in " ".join(lines(caplog, "too large"))
             and "sparse.jpg" in " ".join(lines(caplog, "too large")))
    # More rescans (by hand, the loop stopped): named once in all, and no byte of them copied.
    running.halt()
    for _ in range(3):
        watcher.rescan()
        watcher.take_ready(time.monotonic() + 60)
    said = " ".join(lines(caplog, "too large"))
    assert said.count("sparse.jpg") == 1 and said.count("tail.jpg") == 1, said
    assert (shared_inbox / "sparse.jpg").stat().st_size == 5 << 30
    assert (shared_inbox / "tail.jpg").stat().st_size == 1 << 30
    assert sources(sessions) == {"good.jpg"}
    used = sum(p.stat().st_size for p in watcher.settings.data_path.rglob("*") if p.is_file())
    assert used < 50 << 20, used


def test_15000_empty_files_hold_up_no_one_elses_image_and_add_one_log_line_per_scan(
        running: Running, shared_inbox: Path, caplog: pytest.LogCaptureFixture) -> None:
    watcher, sessions = running.watcher, running.sessions
    caplog.set_level(logging.INFO)
    junk = 15_000
    as_nobody(EMPTY_FILES, str(shared_inbox / "junk"), str(junk))
    # Another user's image, dropped at once after the junk: the watcher is busy with the junk.
    started = time.monotonic()
    as_nobody(DROP, str(shared_inbox / "clinic-b" / "mole.jpg"), synthetic_jpeg(9).hex(),
              user=COLLEAGUE)
    wait_for(lambda: "clinic-b/mole.jpg" in sources(sessions))
    waited = time.monotonic() - started
    assert waited < 10, f"{waited:.1f} s behind {junk} empty files"  # 22 s before the turns
    left = watcher.intake.left
    wait_for(lambda: len(left) == junk)
    scans = watcher.scans
    wait_for(lambda: watcher.scans >= scans + 4)  # more rescans with the junk in place
    running.halt()

    # The log: at most a line or two per scan, never one per file.
    ours = [r for r in caplog.records if r.name.startswith("scheduler")]
    assert len(ours) <= 2 * watcher.scans + 5, (len(ours), watcher.scans)
    said = lines(caplog, "left in the inbox")
    assert said and all(m.count("junk/") <= 3 for m in said), said[:3]
    assert sum(int(m.split(" empty")[0].split()[-1]) for m in said if " empty" in m) == junk

    watcher.stop = threading.Event()  # the loop has ended: what follows is done by hand
    # Rescans pass the junk by: nothing of it is put under observation (stat'ed) again, and
    # nothing more is said while it stays as it is.
    before = len(caplog.records)
    for _ in range(3):
        waiting = set(watcher.pending)
        watcher.rescan()
        assert not [p for p in set(watcher.pending) - waiting if "junk" in p.parts]
        watcher.take_ready(time.monotonic() + 60)
    assert len(caplog.records) == before
    assert len(os.listdir(shared_inbox / "junk")) == junk  # left where they were
    assert sources(sessions) == {"clinic-b/mole.jpg"}

    # A junk file that gets content is seen again (the recheck takes turns) and taken.
    as_nobody("import sys; open(sys.argv[1], 'wb').write(bytes.fromhex(sys.argv[2]))",
              str(shared_inbox / "junk" / "7.jpg"), synthetic_jpeg(10).hex())
    for _ in range(junk // 2_000 + 2):
        watcher.rescan()
    watcher.take_ready(time.monotonic() + 60)  # its size and time noted,
    watcher.take_ready(time.monotonic() + 120)  # then unchanged long enough
    assert "junk/7.jpg" in sources(sessions)
