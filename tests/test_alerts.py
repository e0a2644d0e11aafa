"""Melanoma alerts end to end: images dropped into a running pipeline (real Redis, worker and
watcher processes) and the email that a real SMTP server (aiosmtpd on loopback) receives."""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from email.message import EmailMessage
from typing import Any

import pytest
from mail_fixtures import (
    LOOPBACK,
    Received,
    RecordingHandler,
    decoded_images,
    free_port,
    image_parts,
    smtp_server,
)

from tests.conftest import (
    RedisServer,
    Service,
    children_of,
    start_service,
    synthetic_jpeg,
    wait_until,
)

pytestmark = pytest.mark.slow

DOCTORS = ("dr.a@clinic.example", "dr.b@clinic.example")
CLASSES = ("actinic keratosis", "basal cell carcinoma", "dermatofibroma", "melanoma", "nevus",
           "pigmented benign keratosis", "seborrheic keratosis", "squamous cell carcinoma",
           "vascular lesion")


class MailServer:
    """An aiosmtpd server on a fixed loopback port that a test can take down and bring back."""

    def __init__(self) -> None:
        self.handler = RecordingHandler()
        self.port = free_port()
        self._running: contextlib.ExitStack | None = None

    def start(self) -> None:
        self._running = contextlib.ExitStack()
        self._running.enter_context(smtp_server(self.handler, port=self.port))

    def stop(self) -> None:
        if self._running is not None:
            self._running.close()
            self._running = None

    def about(self, source: str) -> list[Received]:
        """Messages whose subject names `source`."""
        with self.handler.lock:
            return [m for m in self.handler.messages if str(m.message["Subject"]).endswith(source)]

    def wait_about(self, source: str, count: int, timeout: float = 120.0) -> list[Received]:
        return wait_until(lambda: (lambda found: found if len(found) >= count else None)(
            self.about(source)), timeout=timeout, message=f"{count} message(s) about {source}")


@pytest.fixture(scope="module")
def mail() -> Iterator[MailServer]:
    server = MailServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def alert_service(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer,
                  tiny_model: object, mail: MailServer) -> Iterator[Service]:
    """Worker and watcher with two recipients, threshold 0.0 (every image is flagged) and fast
    retries; their own Redis database, so no other test's worker takes their tasks."""
    broker = redis_server.url.rsplit("/", 1)[0] + "/4"
    running = start_service(
        tmp_path_factory.mktemp("alerts"), broker, tiny_model,  # type: ignore[arg-type]
        names=("worker", "watch"),
        extra_env={
            "MELANOSCREEN_ALERT_RECIPIENTS": ",".join(DOCTORS),
            "MELANOSCREEN_ALERT_THRESHOLD": "0.0",
            "MELANOSCREEN_SMTP_HOST": LOOPBACK,
            "MELANOSCREEN_SMTP_PORT": str(mail.port),
            "MELANOSCREEN_SMTP_SECURITY": "none",
            "MELANOSCREEN_SMTP_SENDER": "melanoscreen@clinic.example",
            "MELANOSCREEN_SMTP_TIMEOUT": "5",
            "MELANOSCREEN_ALERT_RETRY_BASE": "0.5",
            "MELANOSCREEN_ALERT_MAX_ATTEMPTS": "20",
            "MELANOSCREEN_TIMEZONE": "Europe/Berlin",
            # A JPEG with a 1 GB tail is let in, to show what the worker reads of it.
            "MELANOSCREEN_MAX_FILE_BYTES": str(2 << 30),
            # Housekeeping's lines (the digest job's runs) are what a test here counts.
            "MELANOSCREEN_LOG_LEVEL": "DEBUG",
        })
    yield running
    running.stop_all()


def outbox_rows(service: Service, source: str) -> list[Any]:
    return service.rows(
        "SELECT o.id, o.recipient, o.status, o.attempts, o.last_error, o.message_id FROM outbox o "
        "JOIN alert_images a ON a.outbox_id = o.id JOIN images i ON i.id = a.image_id "
        "WHERE i.source = :s ORDER BY o.recipient", s=source)


def attempts(service: Service, outbox_id: int) -> list[Any]:
    return service.rows("SELECT outcome, detail FROM delivery_attempts WHERE outbox_id = :o "
                        "ORDER BY id", o=outbox_id)


def cli(service: Service, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "melanoscreen", *args], env=service.env,
                          cwd=service.data_dir, capture_output=True, text=True, timeout=120)


def wait_all_sent(service: Service, source: str, count: int) -> list[Any]:
    """Wait until the `count` outbox rows about `source` are final and `sent`: after that no
    delivery can send anything more for them (a `sent` row is never claimed again)."""
    return wait_until(lambda: (lambda rows: rows if len(rows) == count and all(
        r.status == "sent" for r in rows) else None)(outbox_rows(service, source)),
        timeout=120, message=f"{count} sent outbox rows about {source}")


def body(message: EmailMessage, kind: str) -> str:
    part = message.get_body(preferencelist=(kind,))
    assert part is not None, f"no {kind} part"
    return str(part.get_content())


def test_a_flagged_drop_sends_one_message_per_recipient_with_both_parts_and_images(
        alert_service: Service, mail: MailServer) -> None:
    source = "clinic-a/patient-17/lesion2.jpg"
    alert_service.drop(source, synthetic_jpeg(4001, (120, 120)))
    mail.wait_about(source, 2)
    rows = wait_all_sent(alert_service, source, 2)
    received = mail.about(source)
    assert sorted(r.rcpt_tos[0] for r in received) == sorted(DOCTORS)
    for item in received:
        message = item.message
        assert re.fullmatch(r"Melanoma suspected \(p=[01]\.\d\d\): clinic-a/patient-17/lesion2\.jpg",
                            str(message["Subject"]))
        assert message["To"] == item.rcpt_tos[0]  # one recipient per message: no one else's address
        text = body(message, "plain")
        for name in CLASSES:
            assert name in text
        assert "Model version: tiny-test-1" in text and "Alert threshold: 0.00" in text
        # How this model's alerts turned out, from the reviews: none yet, so no share is given.
        assert "Too few alerts of model tiny-test-1 have been reviewed yet (0; 20 are needed)" in text
        assert "Received:" in text and "CET" in text  # arrival time in the configured zone
        assert "cid:" in body(message, "html")
        pictures = decoded_images(image_parts(message))
        assert len(pictures) == 2  # the lesion and its Grad-CAM overlay
    assert {r.message_id for r in rows} == {str(r.message["Message-ID"]).strip() for r in received}
    for row in rows:
        assert [a.outcome for a in attempts(alert_service, row.id)] == ["sent"]
    # Threshold 0: the image is flagged, and `results --flagged` lists it.
    flagged = json.loads(cli(alert_service, "results", "--flagged", "--format", "json").stdout)
    assert source in {r["source"] for r in flagged} and all(r["flagged"] for r in flagged)
    # The overlay the alert carries is kept for the review app's case page.
    sha = next(r["sha256"] for r in flagged if r["source"] == source)
    kept = alert_service.data_dir / "overlays" / f"{sha}.png"
    assert kept.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _bytes_read(pids: list[int]) -> int:
    """What these processes have read so far (rchar: every read(2), cached or not)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in open(f"/proc/{pid}/io").read().splitlines():  # noqa: SIM115
                if line.startswith("rchar:"):
                    total += int(line.split()[1])
    return total


def test_a_jpeg_with_a_1gb_tail_gets_a_small_thumbnail_and_attachment_without_its_tail_read(
        alert_service: Service, mail: MailServer) -> None:
    source = "clinic-a/patient-9/tail.jpg"
    worker = alert_service.processes["worker"].pid
    pids = [worker, *children_of(worker)]
    before = _bytes_read(pids)
    partial = alert_service.inbox / "clinic-a" / "patient-9" / ".tail.jpg.part"
    partial.parent.mkdir(parents=True, exist_ok=True)
    with open(partial, "wb") as out:
        out.write(synthetic_jpeg(4100, (1024, 768)))
        out.truncate(1 << 30)  # a sparse tail: no disk used
    os.rename(partial, partial.with_name("tail.jpg"))
    [received] = mail.wait_about(source, 2)[:1]
    read = _bytes_read(pids) - before
    assert read < 100 << 20, f"the worker read {read >> 20} MiB"  # the tail is 1024 MiB
    pictures = image_parts(received.message)
    assert all(len(part.get_content()) < 300_000 for part in pictures)
    assert all(max(picture.size) <= 512 for picture in decoded_images(pictures))
    [row] = alert_service.rows("SELECT sha256 FROM images WHERE source = :s", s=source)
    thumbnail = alert_service.data_dir / "thumbnails" / f"{row.sha256}.jpg"
    assert stat.S_IMODE(thumbnail.stat().st_mode) == 0o600 and thumbnail.stat().st_size < 20_000
    assert max(decoded_images([_as_part(thumbnail.read_bytes())])[0].size) <= 96


def _as_part(data: bytes) -> EmailMessage:
    part = EmailMessage()
    part.set_content(data, maintype="image", subtype="jpeg")
    return part


def test_a_redelivered_or_rerun_delivery_task_sends_nothing_for_a_sent_alert(
        alert_service: Service, mail: MailServer) -> None:
    from melanoscreen.settings import Settings, SmtpSettings
    from scheduler.queue import make_producer, send_deliver_message
    from service.delivery import deliver_outbox

    source = "redeliver/lesion.jpg"
    alert_service.drop(source, synthetic_jpeg(4002, (120, 120)))
    mail.wait_about(source, 2)
    # The rows are marked sent once the server has answered: wait for that, not for the mail.
    rows = wait_all_sent(alert_service, source, 2)
    # The same task again through the broker, twice (a redelivery and a re-run) ...
    producer = make_producer(alert_service.env["MELANOSCREEN_BROKER_URL"])
    for row in rows:
        send_deliver_message(producer, row.id)
        send_deliver_message(producer, row.id)
    producer.close()
    # ... and the delivery function called directly, with a fresh token.
    from db.session import make_session_factory

    settings = Settings(_env_file=None, data_dir=alert_service.data_dir,  # type: ignore[call-arg]
                        smtp=SmtpSettings(host=LOOPBACK, port=mail.port, security="none",
                                          timeout=5))
    sessions = make_session_factory(alert_service.database_url)
    for row in rows:
        outcome = deliver_outbox(sessions, row.id, token="re-run", settings=settings)
        assert outcome.status == "skipped"
    wait_until(lambda: alert_service.log("worker").count("not pending") >= 4, timeout=60,
               message="the four redelivered tasks to finish")
    assert len(mail.about(source)) == 2
    for row in rows:
        assert [a.outcome for a in attempts(alert_service, row.id)] == ["sent"]


def test_the_smtp_server_down_then_up_delivers_each_alert_once_after_a_retry(
        alert_service: Service, mail: MailServer) -> None:
    source = "server-down/lesion.jpg"
    mail.stop()
    try:
        alert_service.drop(source, synthetic_jpeg(4003, (120, 120)))
        wait_until(lambda: (lambda rows: len(rows) == 2 and all(
            any(a.outcome == "deferred" for a in attempts(alert_service, r.id)) for r in rows))(
            outbox_rows(alert_service, source)), timeout=120, message="a failed first attempt")
    finally:
        mail.start()
    mail.wait_about(source, 2, timeout=90)
    wait_all_sent(alert_service, source, 2)
    received = mail.about(source)
    assert sorted(r.rcpt_tos[0] for r in received) == sorted(DOCTORS)
    for row in outbox_rows(alert_service, source):
        outcomes = [a.outcome for a in attempts(alert_service, row.id)]
        assert row.status == "sent" and row.attempts == len(outcomes) >= 2
        assert outcomes[-1] == "sent" and set(outcomes[:-1]) == {"deferred"}
        assert "cannot reach SMTP server" in attempts(alert_service, row.id)[0].detail


def test_a_refused_address_fails_alone_and_alerts_retry_sends_it_later(
        alert_service: Service, mail: MailServer) -> None:
    source = "refused/lesion.jpg"
    mail.handler.reject[DOCTORS[1]] = "550 5.1.1 no such mailbox"
    try:
        alert_service.drop(source, synthetic_jpeg(4004, (120, 120)))
        mail.wait_about(source, 1)
        rows = wait_until(lambda: (lambda rows: rows if {r.status for r in rows} == {"sent", "failed"}
                                   else None)(outbox_rows(alert_service, source)),
                          timeout=60, message="one sent and one failed row")
    finally:
        mail.handler.reject.clear()
    failed = next(r for r in rows if r.status == "failed")
    assert failed.recipient == DOCTORS[1] and "550" in failed.last_error
    status = json.loads(cli(alert_service, "status", "--json").stdout)
    assert status["alerts"]["failed"] >= 1

    retried = cli(alert_service, "alerts", "retry")
    assert retried.returncode == 0, retried.stderr
    received = mail.wait_about(source, 2)
    assert sorted(r.rcpt_tos[0] for r in received) == sorted(DOCTORS)
    assert len({str(r.message["Message-ID"]).strip() for r in received}) == 2
    status = json.loads(cli(alert_service, "status", "--json").stdout)
    assert status["alerts"]["failed"] == 0 and status["alerts"]["sent"] >= 2


def test_beat_sends_the_owed_digest_at_start_and_a_restart_does_not_repeat_it(
        alert_service: Service, mail: MailServer) -> None:
    def digests() -> list[Received]:
        with mail.handler.lock:
            return [m for m in mail.handler.messages
                    if str(m.message["Subject"]).startswith("MelanoScreen digest")]

    # A service that has run for days (a new install owes no digest of the day before it).
    (alert_service.data_dir / "first-start").write_text("2020-01-01T00:00:00+00:00\n")
    alert_service.start("beat")
    try:
        wait_until(lambda: len(digests()) >= 2, timeout=90, message="the digest")
        ticks = alert_service.log("worker").count("worker.tasks.queue_digests")
        alert_service.start("beat")  # stop and start again: sends the digest job at once
        wait_until(lambda: alert_service.log("worker").count("worker.tasks.queue_digests")
                   > ticks + 1, timeout=60, message="the digest job to run again")
    finally:
        alert_service.stop("beat")
    assert sorted(m.rcpt_tos[0] for m in digests()) == sorted(DOCTORS)
    assert len({str(m.message["Subject"]) for m in digests()}) == 1  # one digest date
    assert alert_service.rows("SELECT count(*) AS n FROM digests")[0].n == 1


def test_an_out_of_scope_drop_at_the_threshold_is_alerted_as_an_unusual_picture_with_the_caveat(
        alert_service: Service, mail: MailServer, tiny_scoped_model: object) -> None:
    # The worker restarts with a model whose card marks every picture out of scope; the
    # threshold is 0, so the image reaches it: never silence a melanoma, it is alerted all the
    # same, and the alert says why its score may be unreliable instead of "melanoma suspected".
    original = alert_service.env["MELANOSCREEN_MODEL"]
    alert_service.env["MELANOSCREEN_MODEL"] = str(tiny_scoped_model)
    try:
        alert_service.start("worker")
        source = "scope/scanned-letter.jpg"
        alert_service.drop(source, synthetic_jpeg(4006, (120, 120)))
        [row] = alert_service.wait_finished("scope/", 1)
        received = mail.wait_about(source, 2)
    finally:
        alert_service.env["MELANOSCREEN_MODEL"] = original
    assert row.status == "screened"
    [prediction] = alert_service.rows(
        "SELECT p.flagged, p.out_of_scope, p.scope_distance, p.model_version, "
        "p.melanoma_probability FROM predictions p JOIN images i ON i.id = p.image_id "
        "WHERE i.source = :s", s=source)
    assert bool(prediction.out_of_scope) and bool(prediction.flagged)
    assert prediction.scope_distance > 0 and prediction.model_version == "tiny-scoped-1"
    assert sorted(r.rcpt_tos[0] for r in received) == sorted(DOCTORS)
    for item in received:
        subject = str(item.message["Subject"])
        assert subject.startswith("Unusual picture: needs a look (p="), subject
        text, html = body(item.message, "plain"), body(item.message, "html")
        for part in (subject, text, html):
            assert "melanoma suspected" not in part.lower()
        for part in (text, html):
            assert "unlike the images the model learnt from" in part
            assert "may be unreliable" in part
    [shown] = [r for r in json.loads(cli(alert_service, "results", "--format", "json").stdout)
               if r["source"] == source]
    assert shown["out_of_scope"] is True and shown["flagged"] is True


def test_an_image_below_the_threshold_sends_nothing(
        alert_service: Service, mail: MailServer) -> None:
    # Last in this module: the worker restarts with a threshold no probability reaches.
    alert_service.env["MELANOSCREEN_ALERT_THRESHOLD"] = "1.0"
    alert_service.start("worker")
    source = "below/lesion.jpg"
    alert_service.drop(source, synthetic_jpeg(4005, (120, 120)))
    [row] = alert_service.wait_finished("below/", 1)
    assert row.status == "screened"
    # An alert's outbox rows are written in the transaction that stores the prediction: with the
    # image screened and no row, nothing can ever be sent about it.
    assert outbox_rows(alert_service, source) == []
    assert mail.about(source) == []
    flagged = json.loads(cli(alert_service, "results", "--flagged", "--format", "json").stdout)
    assert source not in {r["source"] for r in flagged}
    flagged = alert_service.rows("SELECT p.flagged FROM predictions p JOIN images i "
                                 "ON i.id = p.image_id WHERE i.source = :s", s=source)
    assert [bool(f.flagged) for f in flagged] == [False]
