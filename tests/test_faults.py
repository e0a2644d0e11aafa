"""Faults and operator mistakes against the real `melanoscreen up` and its commands: one line
naming the setting and a non-zero exit; a second `up` refused with the first untouched; no
child left after kill -9 of `up`; "ready" only once the worker consumes with its model loaded."""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from melanoscreen.cli.supervisor import free_port
from tests.conftest import children_of, is_alive, stop_gracefully, synthetic_jpeg, wait_until
from tests.test_up import _env, _status

pytestmark = pytest.mark.slow

#: What the watcher logs each time a database or disk error pauses its intake.
BACKED_OFF = "files stay in the inbox, trying again in"


def _melanoscreen(env: dict[str, str], cwd: Path, *args: str,
                  timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "melanoscreen", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _one_error_line(result: subprocess.CompletedProcess[str], setting: str) -> str:
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith(f"error: {setting}"), errors[0]
    return errors[0]


def test_each_operator_mistake_is_one_line_naming_the_setting(tmp_path: Path,
                                                               tiny_model: Path) -> None:
    data = tmp_path / "data"
    # A model file that is not there: up refuses before starting anything.
    result = _melanoscreen(_env(data, tmp_path / "missing.keras"), tmp_path, "up")
    assert "missing.keras" in _one_error_line(result, "MELANOSCREEN_MODEL")
    # A data folder on a read-only file system (root writes anywhere else).
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(readonly)],
                             capture_output=True).returncode == 0
    if not mounted:
        readonly.chmod(0o500)
        if os.access(readonly, os.W_OK):
            pytest.skip("cannot mount a read-only tmpfs, and this user writes anywhere")
    try:
        result = _melanoscreen(_env(readonly / "data", tiny_model), tmp_path, "up")
        assert "Read-only" in _one_error_line(result, "MELANOSCREEN_DATA_DIR") or not mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(readonly)], check=True)


def test_a_busy_port_a_public_flower_or_a_dead_broker_is_one_line_too(
        tmp_path: Path, tiny_model: Path) -> None:
    data = tmp_path / "data"
    # Flower's port held by another program: named, and up does not start.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _melanoscreen(_env(data, tiny_model, MELANOSCREEN_FLOWER_PORT=str(port)),
                               tmp_path, "up")
    assert str(port) in _one_error_line(result, "MELANOSCREEN_FLOWER_PORT")
    assert "dashboard:" not in result.stdout  # no address of another program shown as ours
    # Flower on a public address without a password: a mistake at start, not a child that dies.
    result = _melanoscreen(_env(data, tiny_model, MELANOSCREEN_FLOWER_ADDRESS="0.0.0.0"),
                           tmp_path, "up")
    _one_error_line(result, "MELANOSCREEN_FLOWER_ADDRESS")
    # A broker that does not answer.
    dead = f"redis://127.0.0.1:{free_port()}/0"
    result = _melanoscreen(_env(data, tiny_model, MELANOSCREEN_BROKER_URL=dead), tmp_path, "up")
    _one_error_line(result, "MELANOSCREEN_BROKER_URL")
    # A data folder that is a file.
    (tmp_path / "a-file").write_text("")
    result = _melanoscreen(_env(tmp_path / "a-file", tiny_model), tmp_path, "up")
    _one_error_line(result, "MELANOSCREEN_DATA_DIR")


def test_status_and_results_refuse_a_folder_that_is_not_a_data_folder(
        tmp_path: Path, tiny_model: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = _env(tmp_path / "nothing-here", tiny_model)
    for command in (["status"], ["results"]):
        _one_error_line(_melanoscreen(env, elsewhere, *command), "MELANOSCREEN_DATA_DIR")
    assert not (tmp_path / "nothing-here").exists()
    # A database that cannot be opened is blamed on the data folder when no URL was set.
    data = tmp_path / "data"
    (data / "melanoscreen.db").mkdir(parents=True)
    line = _one_error_line(_melanoscreen(_env(data, tiny_model), tmp_path, "status"),
                           "MELANOSCREEN_DATA_DIR")
    assert "MELANOSCREEN_DATABASE_URL" not in line


def _start_up(env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "melanoscreen", "up"], cwd=cwd, env=env,
                                stdout=out, stderr=subprocess.STDOUT)


def test_a_second_up_is_refused_and_kill_9_of_up_leaves_no_child_taking_files(
        tmp_path: Path, tiny_model: Path) -> None:
    data = tmp_path / "data"
    env = _env(data, tiny_model)
    log = tmp_path / "up.log"
    up = _start_up(env, tmp_path, log)
    try:
        wait_until(lambda: "ready in" in log.read_text(), timeout=180,
                   message=f"ready\n{log.read_text()[-3000:]}")
        started = time.monotonic()
        (data / "inbox" / "first.jpg").write_bytes(synthetic_jpeg(31_000))
        wait_until(lambda: _status(data) == ["screened"], timeout=60, message="first image")
        # The model was warmed before "ready": the first image is not seconds slower.
        assert time.monotonic() - started < 5
        broker_url = (data / "broker.url").read_text()
        family = children_of(up.pid)
        second = _melanoscreen(dict(env, MELANOSCREEN_FLOWER_PORT=str(free_port()),
                                    MELANOSCREEN_WEB_PORT=str(free_port())), tmp_path, "up")
        line = _one_error_line(second, "MELANOSCREEN_DATA_DIR")
        assert f"pid {up.pid}" in line and "in use" in line
        # The first is untouched: same children, its broker file, still screening.
        assert up.poll() is None and (data / "broker.url").read_text() == broker_url
        assert all(is_alive(pid) for pid in family)
        (data / "inbox" / "second.jpg").write_bytes(synthetic_jpeg(31_001))
        wait_until(lambda: _status(data) == ["screened", "screened"], timeout=60,
                   message="second image after the refused start")
        # kill -9 of up: every child goes with it (no orphan watcher keeps taking files).
        up.send_signal(signal.SIGKILL)
        up.wait()
        wait_until(lambda: not [pid for pid in family if is_alive(pid)], timeout=30,
                   message="every child gone after kill -9 of up")
        # The watcher's lock is free: no watcher of this folder lives to take the next file.
        with (data / "watch.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            (data / "inbox" / "third.jpg").write_bytes(synthetic_jpeg(31_002))
            fcntl.flock(lock, fcntl.LOCK_UN)
        assert (data / "inbox" / "third.jpg").exists()
        # A fresh up takes the folder and the file that waited.
        up = _start_up(env, tmp_path, tmp_path / "up2.log")
        wait_until(lambda: sorted(_status(data)) == ["screened"] * 3, timeout=120,
                   message="the waiting file, after a fresh up")
    finally:
        stop_gracefully(up)


def _child(up_pid: int, command: str) -> int:
    """The pid of up's direct child running `melanoscreen <command>`."""
    for pid in children_of(up_pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if parent == up_pid and command.encode() in argv:
            return pid
    raise AssertionError(f"no {command} child")


def _sources(data: Path) -> dict[str, str]:
    import sqlite3

    with sqlite3.connect(data / "melanoscreen.db") as connection:
        return dict(connection.execute("SELECT source, status FROM images").fetchall())


def test_kill_9_of_the_worker_or_the_watcher_mid_burst_loses_no_image_and_no_name(
        tmp_path: Path, tiny_model: Path) -> None:
    data = tmp_path / "data"
    env = _env(data, tiny_model, MELANOSCREEN_BATCH_SIZE="4", MELANOSCREEN_SWEEP_INTERVAL="2",
               MELANOSCREEN_SWEEP_LEASE="10")
    log = tmp_path / "up.log"
    up = _start_up(env, tmp_path, log)
    try:
        wait_until(lambda: "ready in" in log.read_text(), timeout=180, message="ready")
        inbox = data / "inbox"
        for victim, first in (("worker", 0), ("watch", 100)):
            names = [f"{victim}/{n:03d}.jpg" for n in range(first, first + 60)]
            (inbox / victim).mkdir()
            for number, name in enumerate(names):
                (inbox / name).write_bytes(synthetic_jpeg(40_000 + first + number, (256, 256)))
                if number == 20:
                    os.kill(_child(up.pid, victim), signal.SIGKILL)
            killed = time.monotonic()
            wait_until(lambda names=names: all(_sources(data).get(n) == "screened" for n in names),
                       timeout=120, interval=0.5,
                       message=f"every image screened after kill -9 of the {victim}\n"
                               f"{log.read_text()[-3000:]}")
            assert time.monotonic() - killed < 120
        sources = _sources(data)
        assert not [s for s in sources if s.startswith("(recovered)")]
        assert set(sources) == {f"{v}/{n:03d}.jpg" for v, f in (("worker", 0), ("watch", 100))
                                for n in range(f, f + 60)}
        assert set(sources.values()) == {"screened"}
    finally:
        stop_gracefully(up)


def test_a_full_data_folder_pauses_the_service_and_it_resumes_by_itself_when_freed(
        tmp_path: Path, tiny_model: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(data)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    log = tmp_path / "up.log"
    up = _start_up(_env(data, tiny_model), tmp_path, log)
    try:
        wait_until(lambda: "ready in" in log.read_text(), timeout=180, message="ready")
        inbox = data / "inbox"
        # Complete files kept under hidden names (ignored) while there is room.
        ready = {f"full-{n:02d}.jpg": synthetic_jpeg(50_000 + n, (128, 128)) for n in range(10)}
        for name, content in ready.items():
            (inbox / f".{name}").write_bytes(content)
        filler = data / "filler"
        with open(filler, "wb") as out:
            try:
                while True:
                    out.write(b"\0" * (1 << 20))
                    out.flush()
            except OSError:
                pass
        # The disk is full: renamed into place they are complete but cannot be recorded; and
        # drops written now fail and leave empty or cut-off files.
        seen = len(log.read_text())
        for name in ready:
            (inbox / f".{name}").rename(inbox / name)
        failed = []
        for n in range(20):
            try:
                (inbox / f"late-{n:02d}.jpg").write_bytes(synthetic_jpeg(60_000 + n, (128, 128)))
            except OSError:
                failed.append(f"late-{n:02d}.jpg")
        # The intake tried, failed and backed off, then tried again after its pause and failed
        # again: what happens while the disk stays full has been seen.
        wait_until(lambda: log.read_text()[seen:].count(BACKED_OFF) >= 2, timeout=60,
                   interval=0.2, message=f"the intake backing off twice on the full disk\n"
                                         f"{log.read_text()[-3000:]}")
        assert up.poll() is None
        assert all((inbox / name).exists() for name in ready)  # left in the inbox
        # Space comes back; nothing is restarted by hand.
        filler.unlink()
        for name in failed:
            (inbox / name).write_bytes(synthetic_jpeg(60_000 + int(name[5:7]), (128, 128)))
        expected = set(ready) | {f"late-{n:02d}.jpg" for n in range(20)}
        wait_until(lambda: {s for s, st in _sources(data).items() if st == "screened"} == expected,
                   timeout=120, interval=0.5,
                   message=f"every complete file screened after space came back\n"
                           f"{log.read_text()[-3000:]}")
        assert up.poll() is None  # nothing given up: up and its children carried on
        import sqlite3

        with sqlite3.connect(data / "melanoscreen.db") as connection:
            assert connection.execute("SELECT count(*) FROM duplicates").fetchone()[0] == 0
    finally:
        stop_gracefully(up)
        subprocess.run(["umount", "-l", str(data)], check=False)
