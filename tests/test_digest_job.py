"""The digest job on a migrated SQLite database: counts and rows of a seeded day, exactly once
under a race, missed days caught up, the `digest` command, and delivery over a real SMTP server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from mail_fixtures import (
    LOOPBACK,
    RecordingHandler,
    decoded_images,
    image_parts,
    make_certificate,
    password_authenticator,
    smtp_server,
    synthetic_lesion,
)
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from db.accounts import add_user
from db.reviews import add_review
from db.schema import (
    Digest,
    Image,
    ImageStatus,
    OutboxKind,
    OutboxMessage,
    OutboxStatus,
    Prediction,
    Role,
    Verdict,
)
from db.session import make_session_factory
from melanoscreen.settings import AlertSettings, DigestSettings, Settings, SmtpSettings
from service.delivery import deliver_outbox
from service.digest_message import render_digest_html, render_digest_text
from service.digests import build_digest_content, queue_due_digests

REPO = Path(__file__).resolve().parent.parent
BERLIN = ZoneInfo("Europe/Berlin")
DOCTORS = ("dr.a@clinic.example", "dr.b@clinic.example")
DAY = date(2026, 11, 20)  # covers 2026-11-19 07:00 to 2026-11-20 07:00 Berlin (06:00 UTC)


def berlin(day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2026, 11, day, hour, minute, tzinfo=BERLIN).astimezone(UTC)


@pytest.fixture
def database(database_url: str) -> str:
    """A migrated database: SQLite, and PostgreSQL where MELANOSCREEN_TEST_POSTGRES_URL is set."""
    return database_url


@pytest.fixture
def sessions(database: str) -> Iterator[sessionmaker[Session]]:
    factory = make_session_factory(database)
    yield factory
    bind = factory.kw["bind"]
    bind.dispose()


def job_settings(database: str, tmp_path: Path, smtp: SmtpSettings | None = None) -> Settings:
    """The settings the digest job and delivery read; no SMTP host: .eml files in outbox/."""
    return Settings(  # type: ignore[call-arg]
        _env_file=None, data_dir=tmp_path / "data", database_url=database,
        timezone="Europe/Berlin", digest=DigestSettings(time=time(7, 0)),
        alert=AlertSettings(recipients=list(DOCTORS), retry_base=0.1),
        smtp=smtp or SmtpSettings(sender="melanoscreen@clinic.example"))


def add_image(session: Session, folder: Path, source: str, *, status: ImageStatus, at: datetime,
              p: float | None = None, reason: str | None = None, seed: int = 0) -> int:
    location = folder / f"{uuid.uuid4().hex}.jpg"
    location.write_bytes(synthetic_lesion(seed, size=120))
    image = Image(sha256=uuid.uuid4().hex + uuid.uuid4().hex, source=source, size_bytes=1,
                  location=str(location), status=status, reason=reason,
                  received_at=at - timedelta(minutes=1), attempts=1, screened_at=at)
    session.add(image)
    session.flush()
    if p is not None:
        probabilities = {"melanoma": p, "nevus": 1 - p}
        session.add(Prediction(image_id=image.id, model_version="dermnet-test", threshold=0.3,
                               probabilities=probabilities, melanoma_probability=p,
                               predicted_class="melanoma" if p >= 0.5 else "nevus",
                               flagged=p >= 0.3, seconds=0.01, created_at=at))
    return image.id


def seed_day(sessions: sessionmaker[Session], folder: Path) -> None:
    """A day with 3 screened (2 flagged), 1 rejected, 1 failed, 1 undelivered alert, and noise
    just outside the window on both sides."""
    with sessions.begin() as s:
        add_image(s, folder, "clinic-a/low.jpg", status=ImageStatus.SCREENED, at=berlin(19, 9), p=0.05)
        add_image(s, folder, "clinic-a/second.jpg", status=ImageStatus.SCREENED, at=berlin(19, 14), p=0.62,
                  seed=1)
        add_image(s, folder, "clinic-b/first.jpg", status=ImageStatus.SCREENED, at=berlin(20, 6, 59),
                  p=0.91, seed=2)
        add_image(s, folder, "clinic-b/broken.jpg", status=ImageStatus.REJECTED, at=berlin(19, 10),
                  reason="not an image: cannot identify image file")
        add_image(s, folder, "clinic-b/stuck.jpg", status=ImageStatus.FAILED, at=berlin(19, 11),
                  reason="gave up after 5 screening attempts")
        add_image(s, folder, "before/old.jpg", status=ImageStatus.SCREENED, at=berlin(19, 6, 59), p=0.99)
        add_image(s, folder, "after/new.jpg", status=ImageStatus.SCREENED, at=berlin(20, 7), p=0.99)
        s.add(OutboxMessage(kind=OutboxKind.ALERT, recipient="dr.a@clinic.example", message_id="<a1@x.test>",
                            subject="Melanoma suspected (p=0.62): clinic-a/second.jpg",
                            status=OutboxStatus.FAILED, attempts=8, last_error="550 mailbox unavailable",
                            created_at=berlin(19, 14), failed_at=berlin(19, 15)))
        s.add(Digest(day=DAY - timedelta(days=1), period_start=berlin(18, 7),
                     period_end=berlin(19, 7), recipients=2, created_at=berlin(19, 7)))


def body(message: EmailMessage, kind: str) -> str:
    part = message.get_body(preferencelist=(kind,))
    assert part is not None, f"no {kind} part"
    return str(part.get_content())


def deliver_all(sessions: sessionmaker[Session], ids: list[int], settings: Settings) -> None:
    for outbox_id in ids:
        outcome = deliver_outbox(sessions, outbox_id, token=uuid.uuid4().hex, settings=settings)
        assert outcome.status == "sent"


def test_the_digest_of_a_seeded_day_has_the_right_counts_and_rows(
        sessions: sessionmaker[Session], database: str, tmp_path: Path) -> None:
    seed_day(sessions, tmp_path)
    enqueued: list[int] = []
    days = queue_due_digests(sessions, job_settings(database, tmp_path), berlin(20, 7, 1),
                             enqueued.append)
    assert days == [DAY]
    assert len(enqueued) == 2

    handler = RecordingHandler()
    with smtp_server(handler) as controller:
        smtp = SmtpSettings(host=LOOPBACK, port=controller.port, security="none",
                            sender="melanoscreen@clinic.example", timeout=5)
        deliver_all(sessions, enqueued, job_settings(database, tmp_path, smtp))
        received = handler.wait_for(2)
    assert sorted(r.rcpt_tos[0] for r in received) == sorted(DOCTORS)
    message = received[0].message
    assert message["Subject"] == ("MelanoScreen digest 2026-11-20: 2 flagged of 3 screened, "
                                  "1 alert NOT delivered")
    text = body(message, "plain")
    assert "Screened: 3   Flagged: 2   Rejected: 1   Failed: 1" in text
    # Highest probability first; nothing from outside the window.
    assert text.index("0.910  clinic-b/first.jpg") < text.index("0.620  clinic-a/second.jpg")
    assert "before/old.jpg" not in text and "after/new.jpg" not in text
    assert "clinic-b/broken.jpg: not an image" in text
    assert "clinic-b/stuck.jpg: gave up after 5 screening attempts" in text
    assert "550 mailbox unavailable" in text
    assert "Model version: dermnet-test" in text
    html = body(message, "html")
    assert html.count('alt="lesion"') == 2
    assert len(decoded_images(image_parts(message))) == 2
    ids = {r.message["Message-ID"] for r in received}
    assert len(ids) == 2 and all(i.startswith("<digest-2026-11-20.") for i in ids)


def test_a_quiet_day_gets_a_short_digest_that_says_so(
        sessions: sessionmaker[Session], database: str, tmp_path: Path) -> None:
    enqueued: list[int] = []
    settings = job_settings(database, tmp_path)
    queue_due_digests(sessions, settings, berlin(20, 8), enqueued.append)
    deliver_all(sessions, enqueued, settings)
    files = sorted(settings.outbox_dir.glob("*.eml"))
    assert len(files) == 2  # no SMTP host: one .eml per recipient's copy
    message = BytesParser(policy=policy.default).parsebytes(files[0].read_bytes())
    assert isinstance(message, EmailMessage)
    assert message["Subject"] == "MelanoScreen digest 2026-11-20: nothing flagged (0 screened)"
    assert "Nothing was flagged in this period." in body(message, "plain")


def test_a_digest_is_written_once_when_two_runs_race_for_the_same_date(
        sessions: sessionmaker[Session], database: str, tmp_path: Path) -> None:
    seed_day(sessions, tmp_path)
    config = job_settings(database, tmp_path)
    now = berlin(20, 7, 0)
    barrier = threading.Barrier(2)
    results: list[list[int]] = [[], []]

    def run(slot: int) -> None:
        # Each run has its own engine, as two workers or a worker and a beat restart would.
        factory = make_session_factory(database)
        barrier.wait()
        queue_due_digests(factory, config, now, results[slot].append)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(len(r) for r in results) == [0, 2]
    # And once more, later the same day: nothing owed.
    assert queue_due_digests(sessions, config, now + timedelta(hours=3), results[0].append) == []
    with sessions.begin() as s:
        assert s.scalar(select(func.count()).select_from(Digest).where(Digest.day == DAY)) == 1
        assert s.scalar(select(func.count()).select_from(OutboxMessage)
                        .where(OutboxMessage.kind == OutboxKind.DIGEST)) == 2


def test_missed_days_are_caught_up_each_with_its_own_window(
        sessions: sessionmaker[Session], database: str, tmp_path: Path) -> None:
    with sessions.begin() as s:
        s.add(Digest(day=date(2026, 11, 17), period_start=berlin(16, 7), period_end=berlin(17, 7),
                     recipients=2, created_at=berlin(17, 7)))
        add_image(s, tmp_path, "on-the-18th.jpg", status=ImageStatus.SCREENED, at=berlin(18, 6), p=0.8)
    enqueued: list[int] = []
    days = queue_due_digests(sessions, job_settings(database, tmp_path), berlin(20, 9),
                             enqueued.append)
    assert days == [date(2026, 11, 18), date(2026, 11, 19), date(2026, 11, 20)]
    assert len(enqueued) == 6
    with sessions.begin() as s:
        windows = {d.day: (d.period_start, d.period_end) for d in s.scalars(select(Digest))}
        subjects = {(r.digest_date, r.subject) for r in s.scalars(select(OutboxMessage))}
    assert windows[date(2026, 11, 19)] == (berlin(18, 7), berlin(19, 7))
    assert (date(2026, 11, 18), "MelanoScreen digest 2026-11-18: 1 flagged of 1 screened") in subjects
    assert (date(2026, 11, 19), "MelanoScreen digest 2026-11-19: nothing flagged (0 screened)") \
        in subjects
    assert queue_due_digests(sessions, job_settings(database, tmp_path), berlin(20, 23),
                             enqueued.append) == []


def test_starttls_and_login_configured_by_settings_deliver_a_digest(
        sessions: sessionmaker[Session], database: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    certificate = make_certificate(tmp_path)
    handler = RecordingHandler()
    with smtp_server(handler, tls_context=certificate.server_context(), require_starttls=True,
                     auth_require_tls=True, auth_required=True,
                     authenticator=password_authenticator(handler, "screening", "s3cret")) as ctl:
        for name, value in {"SMTP_HOST": LOOPBACK, "SMTP_PORT": str(ctl.port),
                            "SMTP_USER": "screening", "SMTP_PASSWORD": "s3cret",
                            "SMTP_CAFILE": str(certificate.cert_file), "SMTP_TIMEOUT": "5"}.items():
            monkeypatch.setenv(f"MELANOSCREEN_{name}", value)
        settings = Settings(_env_file=None)  # type: ignore[call-arg]
        assert settings.smtp.security == "starttls"  # the default
        enqueued: list[int] = []
        queue_due_digests(sessions, job_settings(database, tmp_path), berlin(20, 8), enqueued.append)
        deliver_all(sessions, enqueued, job_settings(database, tmp_path, settings.smtp))
        handler.wait_for(2)
    assert handler.auth_mechanisms


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "melanoscreen", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_the_digest_command_previews_sends_once_and_status_shows_it(
        sessions: sessionmaker[Session], database: str, tmp_path: Path) -> None:
    seed_day(sessions, tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MELANOSCREEN_")}
    env.update(MELANOSCREEN_DATA_DIR=str(tmp_path / "data"), MELANOSCREEN_DATABASE_URL=database,
               MELANOSCREEN_ALERT_RECIPIENTS=",".join(DOCTORS),
               MELANOSCREEN_TIMEZONE="Europe/Berlin", MELANOSCREEN_DIGEST_TIME="07:00")
    preview = tmp_path / "preview.html"
    shown = _cli(env, "digest", "--date", "2026-11-20", "--preview", str(preview))
    assert shown.returncode == 0, shown.stderr
    page = preview.read_text()
    assert "clinic-b/first.jpg" in page and "data:image/jpeg;base64," in page

    sent = _cli(env, "digest", "--date", "2026-11-20", "--send")
    assert sent.returncode == 0, sent.stderr
    assert len(list((tmp_path / "data" / "outbox").glob("*.eml"))) == 2
    again = _cli(env, "digest", "--date", "2026-11-20", "--send")
    assert again.returncode == 1 and "already sent" in again.stderr

    status = json.loads(_cli(env, "status", "--json").stdout)
    assert status["last_digest"]["date"] == "2026-11-20"
    assert status["digest_messages"]["sent"] == 2
    assert status["alerts"]["failed"] == 1
    assert {"counts", "flagged", "queue_length"} <= set(status)


def test_out_of_scope_images_are_listed_apart_and_the_threshold_says_what_it_means(
        sessions: sessionmaker[Session], database: str, tmp_path: Path) -> None:
    from model.card import ModelCard, card_path_for

    seed_day(sessions, tmp_path)
    with sessions.begin() as s:
        image_id = add_image(s, tmp_path, "clinic-c/<i>letter</i>.jpg", status=ImageStatus.SCREENED,
                             at=berlin(19, 12))
        s.add(Prediction(image_id=image_id, model_version="dermnet-test", threshold=0.3,
                         probabilities={"melanoma": 0.95, "nevus": 0.05}, melanoma_probability=0.95,
                         predicted_class="melanoma", flagged=False, out_of_scope=True,
                         scope_distance=12.5, seconds=0.01, created_at=berlin(19, 12)))
    # The configured model's card (only its JSON is read for the digest).
    model = tmp_path / "dermnet.keras"
    ModelCard(version="dermnet-test", architecture="melanonet", classes=["melanoma", "nevus"],
              input_size=[32, 32], alert_threshold=0.3,
              validation={"melanoma_same_source": {"sensitivity": 0.953}}).write(card_path_for(model))
    settings = job_settings(database, tmp_path).model_copy(update={"model": model})
    enqueued: list[int] = []
    queue_due_digests(sessions, settings, berlin(20, 7, 1), enqueued.append)
    deliver_all(sessions, enqueued, settings)

    message = BytesParser(policy=policy.default).parsebytes(
        sorted(settings.outbox_dir.glob("*.eml"))[0].read_bytes())
    assert isinstance(message, EmailMessage)
    # Not flagged: the counts and the subject are those of the seeded day.
    assert message["Subject"].startswith("MelanoScreen digest 2026-11-20: 2 flagged of 4 screened")
    text, html = body(message, "plain"), body(message, "html")
    assert "Out of scope: unlike the images the model learnt from (1)" in text
    assert "clinic-c/<i>letter</i>.jpg" in text
    assert "clinic-c/&lt;i&gt;letter&lt;/i&gt;.jpg" in html and "<i>letter</i>" not in html
    assert text.index("0.910  clinic-b/first.jpg") < text.index("Out of scope")
    assert "0.950" not in text  # its scores mean nothing: not shown as a melanoma probability
    assert ("Alert threshold: 0.30\nAt this threshold the model caught 95% of melanomas in "
            "validation (images it had not been trained on).") in text.replace("\r\n", "\n")


def test_digest_today_shows_the_period_so_far_and_is_never_sent(
        sessions: sessionmaker[Session], database: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MELANOSCREEN_")}
    env.update(MELANOSCREEN_DATA_DIR=str(tmp_path / "data"), MELANOSCREEN_DATABASE_URL=database,
               MELANOSCREEN_TIMEZONE="Europe/Berlin", MELANOSCREEN_DIGEST_TIME="07:00")
    now = datetime.now(ZoneInfo("Europe/Berlin"))
    running = now.date() + timedelta(days=1 if now.time() >= time(7, 0) else 0)
    shown = _cli(env, "digest", "--today")
    assert shown.returncode == 0, shown.stderr
    assert f"digest {running.isoformat()}" in shown.stdout
    refused = _cli(env, "digest", "--today", "--send")
    assert refused.returncode == 1 and refused.stderr.startswith("error: --today")


def test_the_digest_shows_each_flagged_images_review_state(
        sessions: sessionmaker[Session], database: str, tmp_path: Path) -> None:
    """A flagged image a dermatologist already judged benign says so in the digest (verdict and
    reviewer); one nobody has looked at says it is not reviewed."""
    seed_day(sessions, tmp_path)
    with sessions.begin() as s:
        reviewer = add_user(s, name="dr.lee", email="lee@clinic.example", role=Role.REVIEWER,
                            password_hash="x", now=berlin(19, 15))
        second = s.scalars(select(Image).where(Image.source == "clinic-a/second.jpg")).one()
        add_review(s, second, reviewer, verdict=Verdict.BENIGN, diagnosis="nevus", note="",
                   now=berlin(19, 16))
    with sessions.begin() as s:
        content = build_digest_content(s, DAY, time(7, 0), "Europe/Berlin")
    text = render_digest_text(content)
    second_line = next(line for line in text.splitlines() if "0.620  clinic-a/second.jpg" in line)
    first_line = next(line for line in text.splitlines() if "0.910  clinic-b/first.jpg" in line)
    assert "reviewed: benign by dr.lee" in second_line
    assert "not reviewed yet" in first_line
    html = render_digest_html(content)
    assert "benign by dr.lee" in html and "not reviewed yet" in html
