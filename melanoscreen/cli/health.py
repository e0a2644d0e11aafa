"""`melanoscreen healthcheck ROLE`: whether one service of a deployment can do its job.

For container health checks (docker compose runs it inside each service's container). Exit 0
when healthy; otherwise one line saying why, exit 1. Every check reads the same settings as the
service itself, so no secret is ever on a command line. It never loads TensorFlow.
"""

from __future__ import annotations

import base64
import os
import socket
import time
import urllib.error
import urllib.request
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated

import typer

from melanoscreen.cli._common import broker_or_fail, fail, load_settings, ping_broker

if TYPE_CHECKING:
    from melanoscreen.settings import Settings

#: A heartbeat older than this (seconds; the watcher touches it every 5 s) means a stuck watcher.
HEARTBEAT_MAX_AGE = 60.0
#: Seconds each probe may take (the container runtime's own timeout is longer).
PROBE_TIMEOUT = 5.0


class Role(StrEnum):
    """The services a health check knows."""

    WORKER = "worker"
    WATCH = "watch"
    BEAT = "beat"
    WEB = "web"
    FLOWER = "flower"
    DICOM = "dicom"


def _check_worker(settings: Settings) -> None:
    """A worker on this host answers a Celery ping through the broker."""
    from scheduler.queue import make_producer

    broker = broker_or_fail(settings)
    host = socket.gethostname()
    try:
        replies = make_producer(broker).control.ping(timeout=PROBE_TIMEOUT)
    except Exception as exc:  # the transport's errors vary
        fail(f"MELANOSCREEN_BROKER_URL: the broker does not answer: {exc}")
    names = [name for reply in replies for name in reply]
    if not any(name.endswith(f"@{host}") for name in names):
        fail(f"no worker on {host} answered a ping within {PROBE_TIMEOUT:.0f} s")


def _check_watch(settings: Settings) -> None:
    """The watcher's heartbeat file was touched within HEARTBEAT_MAX_AGE."""
    path = settings.heartbeat_file
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        fail(f"no heartbeat at {path}: the watcher has not started its loop")
    if age > HEARTBEAT_MAX_AGE:
        fail(f"the watcher's heartbeat is {age:.0f} s old (more than {HEARTBEAT_MAX_AGE:.0f} s)")


def _check_beat(settings: Settings) -> None:
    """What beat needs answers: the broker (it sends there) and the database (its jobs read it)."""
    from sqlalchemy import text

    from db.session import make_session_factory

    ping_broker(broker_or_fail(settings), PROBE_TIMEOUT)
    try:
        with make_session_factory(settings.database).begin() as session:
            session.execute(text("SELECT 1"))
    except Exception as exc:  # the driver's errors vary
        fail(f"MELANOSCREEN_DATABASE_URL: the database does not answer: {str(exc).splitlines()[0]}")


def _check_web(settings: Settings) -> None:
    """The review app answers /healthz (it queries the database) on its own port."""
    _get(f"http://127.0.0.1:{settings.web.port}/healthz", "the review app")


def _check_flower(settings: Settings) -> None:
    """Flower answers its own /healthcheck (with the dashboard's login)."""
    from melanoscreen.cli._common import flower_password

    password, _ = flower_password(settings)
    login = base64.b64encode(f"{settings.flower.login}:{password}".encode()).decode()
    _get(f"http://127.0.0.1:{settings.flower.port}/healthcheck", "Flower",
         {"Authorization": f"Basic {login}"})


def _check_dicom(settings: Settings) -> None:
    """The DICOM listener answers an association request on its port (a refusal is an answer:
    the probe's AE title is not a peer, and it sends nothing)."""
    from scheduler.listener import HEALTH_PROBE_AE_TITLE, probe

    dicom = settings.dicom
    if dicom.port is None:
        fail("MELANOSCREEN_DICOM_PORT: not set; there is no DICOM listener to check")
    host = "127.0.0.1" if dicom.address in ("0.0.0.0", "::") else dicom.address
    if not probe(host, dicom.port, dicom.ae_title, timeout=PROBE_TIMEOUT):
        fail(f"the DICOM listener does not answer at {host}:{dicom.port} "
             f"(probed as {HEALTH_PROBE_AE_TITLE})")


def _get(url: str, what: str, headers: dict[str, str] | None = None) -> None:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT) as answer:
            answer.read()
    except urllib.error.HTTPError as exc:
        fail(f"{what} answered {exc.code} at {url}")
    except (urllib.error.URLError, OSError) as exc:
        fail(f"{what} does not answer at {url}: {getattr(exc, 'reason', exc)}")


_CHECKS = {Role.WORKER: _check_worker, Role.WATCH: _check_watch, Role.BEAT: _check_beat,
           Role.WEB: _check_web, Role.FLOWER: _check_flower, Role.DICOM: _check_dicom}


def healthcheck(role: Annotated[Role, typer.Argument(help="The service to check.")]) -> None:
    """Exit 0 if this host's ROLE service can work (worker: answers a ping; watch: heartbeat
    fresh; beat: broker and database answer; web: /healthz; flower: /healthcheck; dicom: the
    listener answers an association request)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _CHECKS[role](load_settings())


def register(app: typer.Typer) -> None:
    """Add `healthcheck` to the `melanoscreen` app."""
    app.command()(healthcheck)
