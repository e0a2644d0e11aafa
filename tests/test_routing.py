"""Alerts routed per clinic (MELANOSCREEN_ALERT_ROUTES): the longest prefix of an image's source
picks its recipients, the digest is split per route, and a bad route stops a command naming the
variable. Alerts go through a real pipeline (Redis, worker and watcher processes) and every
message through a real SMTP server (aiosmtpd on loopback)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mail_fixtures import LOOPBACK, Received, RecordingHandler, smtp_server
from sqlalchemy.orm import Session, sessionmaker

from db.session import make_session_factory
from melanoscreen.settings import AlertSettings, Settings, SmtpSettings
from service.digests import queue_due_digests
from tests.conftest import RedisServer, Service, start_service, synthetic_jpeg, wait_until
from tests.test_digest_job import DAY, berlin, body, deliver_all, job_settings, seed_day
from tests.test_settings_and_commands import _clean_env

EVERYONE = "oncall@hospital.example"
CLINIC_A = ("derm-a@clinic-a.example", "derm-b@clinic-a.example")
CLINIC_A_SPECIAL = "special@clinic-a.example"
CLINIC_B = "derm-c@clinic-b.example"
ROUTES = (f"clinic-a/={','.join(CLINIC_A)};clinic-a/special/={CLINIC_A_SPECIAL};"
          f"clinic-b/={CLINIC_B}")


def test_the_longest_matching_prefix_picks_the_recipients() -> None:
    alert = AlertSettings(recipients=[EVERYONE], routes=ROUTES)  # type: ignore[arg-type]
    assert alert.recipients_for("clinic-a/p1/x.jpg") == list(CLINIC_A)
    assert alert.recipients_for("clinic-a/special/x.jpg") == [CLINIC_A_SPECIAL]
    assert alert.recipients_for("clinic-b/x.jpg") == [CLINIC_B]
    assert alert.recipients_for("clinic-c/x.jpg") == [EVERYONE]
    assert alert.recipients_for("clinic-ab/x.jpg") == [EVERYONE]


@pytest.mark.parametrize("routes", ["clinic-a/derm@x.org", "clinic-a/=not-an-address",
                                    "clinic-a/=", "=derm@x.org", "a/=d@x.org;a/=e@x.org"])
def test_a_bad_route_stops_a_command_naming_the_variable(tmp_path: Path, routes: str) -> None:
    result = subprocess.run([sys.executable, "-m", "melanoscreen", "status"], cwd=tmp_path,
                            env=_clean_env(MELANOSCREEN_ALERT_ROUTES=routes),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith("error: MELANOSCREEN_ALERT_ROUTES: "), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.fixture
def sessions(database_url: str) -> Iterator[sessionmaker[Session]]:
    factory = make_session_factory(database_url)
    yield factory
    factory.kw["bind"].dispose()


def _routed_settings(database: str, tmp_path: Path, smtp: SmtpSettings | None = None) -> Settings:
    settings = job_settings(database, tmp_path, smtp)
    settings.alert = AlertSettings(recipients=[EVERYONE], retry_base=0.1,
                                   routes="clinic-a/=derm-a@clinic-a.example;"  # type: ignore[arg-type]
                                          "clinic-b/=derm-c@clinic-b.example")
    return settings


def test_each_route_gets_a_digest_of_its_own_images_and_the_global_recipients_get_all(
        sessions: sessionmaker[Session], database_url: str, tmp_path: Path) -> None:
    seed_day(sessions, tmp_path)
    enqueued: list[int] = []
    settings = _routed_settings(database_url, tmp_path)
    assert queue_due_digests(sessions, settings, berlin(20, 7, 1), enqueued.append) == [DAY]
    assert len(enqueued) == 3

    handler = RecordingHandler()
    with smtp_server(handler) as controller:
        smtp = SmtpSettings(host=LOOPBACK, port=controller.port, security="none",
                            sender="melanoscreen@clinic.example", timeout=5)
        deliver_all(sessions, enqueued, _routed_settings(database_url, tmp_path, smtp))
        received = {r.rcpt_tos[0]: r for r in handler.wait_for(3)}
    assert sorted(received) == sorted([EVERYONE, "derm-a@clinic-a.example", CLINIC_B])
    everything = body(received[EVERYONE].message, "plain")
    assert "clinic-a/second.jpg" in everything and "clinic-b/first.jpg" in everything
    assert "Screened: 3   Flagged: 2   Rejected: 1   Failed: 1" in everything

    a = body(received["derm-a@clinic-a.example"].message, "plain")
    assert "clinic-a/second.jpg" in a and "clinic-b/" not in a
    assert "Screened: 2   Flagged: 1   Rejected: 0   Failed: 0" in a
    assert "550 mailbox unavailable" not in a  # an undelivered alert to dr.a@ is not theirs
    b = body(received[CLINIC_B].message, "plain")
    assert "clinic-b/first.jpg" in b and "clinic-b/broken.jpg" in b and "clinic-a/" not in b
    assert "Screened: 1   Flagged: 1   Rejected: 1   Failed: 1" in b
    assert len({r.message["Message-ID"] for r in received.values()}) == 3


@pytest.fixture(scope="module")
def mail() -> Iterator[tuple[RecordingHandler, int]]:
    handler = RecordingHandler()
    with smtp_server(handler) as controller:
        yield handler, controller.port


@pytest.fixture(scope="module")
def routed_service(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer,
                   tiny_model: object, mail: tuple[RecordingHandler, int]) -> Iterator[Service]:
    """Worker and watcher with three routes and a global recipient, threshold 0 (every image is
    flagged); their own Redis database."""
    broker = redis_server.url.rsplit("/", 1)[0] + "/6"
    running = start_service(
        tmp_path_factory.mktemp("routing"), broker, tiny_model,  # type: ignore[arg-type]
        names=("worker", "watch"),
        extra_env={
            "MELANOSCREEN_ALERT_RECIPIENTS": EVERYONE,
            "MELANOSCREEN_ALERT_ROUTES": ROUTES,
            "MELANOSCREEN_ALERT_THRESHOLD": "0.0",
            "MELANOSCREEN_SMTP_HOST": LOOPBACK,
            "MELANOSCREEN_SMTP_PORT": str(mail[1]),
            "MELANOSCREEN_SMTP_SECURITY": "none",
            "MELANOSCREEN_SMTP_TIMEOUT": "5",
        })
    yield running
    running.stop_all()


@pytest.mark.slow
def test_each_clinics_dermatologists_get_only_their_images(
        routed_service: Service, mail: tuple[RecordingHandler, int]) -> None:
    handler, _port = mail
    sources = {"clinic-a/p1/lesion.jpg": set(CLINIC_A),
               "clinic-a/special/lesion.jpg": {CLINIC_A_SPECIAL},
               "clinic-b/p2/lesion.jpg": {CLINIC_B},
               "elsewhere/lesion.jpg": {EVERYONE}}
    for seed, source in enumerate(sources):
        routed_service.drop(source, synthetic_jpeg(5100 + seed, (120, 120)))

    def about(source: str) -> list[Received]:
        with handler.lock:
            return [m for m in handler.messages if str(m.message["Subject"]).endswith(source)]

    def arrived(source: str, count: int) -> list[Received] | None:
        found = about(source)
        return found if len(found) >= count else None

    for source, expected in sources.items():
        count = len(expected)
        got = wait_until(lambda s=source, n=count: arrived(s, n), timeout=120,  # type: ignore[misc]
                         message=f"alerts about {source}")
        assert {r.rcpt_tos[0] for r in got} == expected, source
    # Nobody got an alert about another clinic's image.
    for item in list(handler.messages):
        subject = str(item.message["Subject"])
        source = next(s for s in sources if subject.endswith(s))
        assert item.rcpt_tos[0] in sources[source]
