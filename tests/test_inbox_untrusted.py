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
pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="acting as another local user needs root and setpriv")


def as_nobody(code: str, *args: str, timeout: float = 120) -> None:
    """Run Python code as uid 65534 (standard library only), from a folder anyone reads."""
    done = subprocess.run([*NOBODY, sys.executable, "-I", "-S", "-c", code, *args], cwd="/",
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
    wait_for(lambda: len(lines(caplog, "too large")) >= 2)
    # More rescans (by hand, the loop stopped): still one line each, and no byte of them copied.
    running.halt()
    for _ in range(3):
        watcher.rescan()
        watcher.take_ready(time.monotonic() + 60)
    too_large = lines(caplog, "too large")
    assert sorted(m.split(" ")[0] for m in too_large) == ["sparse.jpg", "tail.jpg"], too_large
    assert (shared_inbox / "sparse.jpg").stat().st_size == 5 << 30
    assert (shared_inbox / "tail.jpg").stat().st_size == 1 << 30
    assert sources(sessions) == {"good.jpg"}
    used = sum(p.stat().st_size for p in watcher.settings.data_path.rglob("*") if p.is_file())
    assert used < 50 << 20, used
