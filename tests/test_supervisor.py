"""The `up` supervisor in process, over small real child processes: restart, give up, stop."""

from __future__ import annotations

import signal
import sys
import threading
from collections import deque
from pathlib import Path

from melanoscreen.cli.supervisor import Child, Supervisor
from tests.conftest import wait_until


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


SLEEPER = python("import time; time.sleep(120)")


def run_in_thread(supervisor: Supervisor, stop: threading.Event) -> tuple[threading.Thread, list[int]]:
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(supervisor.run(stop)))
    thread.start()
    return thread, result


def test_a_child_that_dies_is_restarted_and_stop_ends_every_child(tmp_path: Path) -> None:
    marker = tmp_path / "died-once"
    # Exits with 3 the first time, then stays up.
    flaky = Child("flaky", python(
        f"import pathlib, sys, time\nm = pathlib.Path({str(marker)!r})\n"
        "if not m.exists():\n    m.touch(); sys.exit(3)\ntime.sleep(120)"))
    steady = Child("steady", SLEEPER)
    stop = threading.Event()
    thread, result = run_in_thread(Supervisor([steady, flaky]), stop)
    try:
        wait_until(lambda: len(flaky.restarts) == 1 and flaky.process is not None
                   and flaky.process.poll() is None, timeout=30, interval=0.05,
                   message="the flaky child restarted")
        first_steady = steady.process
    finally:
        stop.set()
        thread.join(timeout=60)
    assert result == [0]
    assert steady.process is first_steady and not steady.restarts  # left alone
    for child in (steady, flaky):
        assert child.process is not None and child.process.returncode == -signal.SIGTERM


def test_a_child_that_keeps_dying_is_restarted_ever_more_slowly_and_never_given_up(
        tmp_path: Path) -> None:
    crash = Child("crash", python("raise SystemExit(3)"))
    steady = Child("steady", SLEEPER)
    supervisor = Supervisor([steady, crash], max_restarts=2, window_seconds=60, backoff=0.3)
    stop = threading.Event()
    thread, result = run_in_thread(supervisor, stop)
    try:
        wait_until(lambda: len(crash.restarts) >= 5, timeout=30, interval=0.05,
                   message="five restarts")
        assert thread.is_alive()  # still supervising: a child's trouble never ends the service
    finally:
        stop.set()
        thread.join(timeout=60)
    assert result == [0]
    gaps = [b - a for a, b in zip(list(crash.restarts), list(crash.restarts)[1:], strict=False)]
    assert gaps[-1] > gaps[-2] > 0.25  # backing off: 0.3 s, 0.6 s, ...
    assert steady.process is not None and not steady.restarts
    assert steady.process.returncode == -signal.SIGTERM


def test_a_child_that_ignores_sigterm_is_killed_after_the_stop_timeout(tmp_path: Path) -> None:
    ready = tmp_path / "ignoring"
    stubborn = Child("stubborn", python(
        "import pathlib, signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"pathlib.Path({str(ready)!r}).touch()\ntime.sleep(120)"))
    supervisor = Supervisor([stubborn], stop_timeout=0.5)
    stubborn.start()
    wait_until(ready.exists, timeout=30, interval=0.05, message="the child ignoring SIGTERM")
    supervisor.stop_all()
    assert stubborn.process is not None and stubborn.process.returncode == -signal.SIGKILL


def test_a_running_child_that_fails_its_check_twice_is_restarted_but_not_while_starting() -> None:
    answers = iter([True, False, False])  # healthy once, then stuck (a worker that stopped consuming)
    stuck = Child("stuck", SLEEPER, check=lambda _child: next(answers, True), check_interval=0.1)
    starting = Child("starting", SLEEPER, check=lambda _child: False, check_interval=0.1,
                     check_grace=60)
    stop = threading.Event()
    thread, result = run_in_thread(Supervisor([stuck, starting]), stop)
    try:
        wait_until(lambda: len(stuck.restarts) == 1, timeout=30, interval=0.05,
                   message="the stuck child restarted")
        first = stuck.restarts[0]
    finally:
        stop.set()
        thread.join(timeout=60)
    assert result == [0]
    assert stuck.restarts == deque([first])  # healthy again after its restart
    assert not starting.restarts  # never healthy yet, but within its start-up grace
