"""Reminders about flagged images nobody reviewed (MELANOSCREEN_ESCALATE_AFTER): once per image,
to its alert recipients plus MELANOSCREEN_ESCALATE_TO, through the outbox and a real SMTP server;
on SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from mail_fixtures import LOOPBACK, RecordingHandler, smtp_server, synthetic_lesion
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.accounts import add_user
from db.reviews import add_review
from db.schema import Image, ImageStatus, Prediction, Role, Verdict
from db.session import make_session_factory
from melanoscreen.settings import AlertSettings, Settings, SmtpSettings
from service.delivery import deliver_outbox
from service.escalation import queue_due_escalations

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
HEAD = "head@hospital.example"


def ignore(_outbox_id: int) -> None:
    """An `enqueue` that drops the id (the test reads the outbox itself)."""


@pytest.fixture
def sessions(database_url: str) -> Iterator[sessionmaker[Session]]:
    factory = make_session_factory(database_url)
    yield factory
    factory.kw["bind"].dispose()


def settings_for(database: str, tmp_path: Path, *, after: float = 24.0,
                 smtp: SmtpSettings | None = None) -> Settings:
    return Settings(  # type: ignore[call-arg]
        _env_file=None, data_dir=tmp_path / "data", database_url=database,
        escalate_after=after, escalate_to=[HEAD],
        alert=AlertSettings(recipients=["oncall@hospital.example"], retry_base=0.1,
                            routes="clinic-a/=derm-a@clinic-a.example"),  # type: ignore[arg-type]
        smtp=smtp or SmtpSettings(sender="melanoscreen@hospital.example"))


def flagged_image(session: Session, folder: Path, source: str, screened_at: datetime,
                  *, flagged: bool = True) -> Image:
    location = folder / f"{uuid.uuid4().hex}.jpg"
    location.write_bytes(synthetic_lesion(len(source), size=96))
    image = Image(sha256=uuid.uuid4().hex * 2, source=source, size_bytes=1, location=str(location),
                  status=ImageStatus.SCREENED, received_at=screened_at - timedelta(minutes=1),
                  attempts=1, screened_at=screened_at, melanoma_probability=0.8, flagged=flagged,
                  needs_review=flagged)
    session.add(image)
    session.flush()
    session.add(Prediction(image_id=image.id, model_version="v-test", threshold=0.3,
                           probabilities={"melanoma": 0.8, "nevus": 0.2}, melanoma_probability=0.8,
                           predicted_class="melanoma", flagged=flagged, seconds=0.01,
                           created_at=screened_at))
    session.flush()
    return image


def test_an_unreviewed_flag_sends_one_reminder_once_and_a_reviewed_one_none(
        sessions: sessionmaker[Session], database_url: str, tmp_path: Path) -> None:
    with sessions.begin() as s:
        flagged_image(s, tmp_path, "clinic-a/old.jpg", NOW - timedelta(hours=25))
        flagged_image(s, tmp_path, "clinic-b/old.jpg", NOW - timedelta(hours=30))
        flagged_image(s, tmp_path, "clinic-a/recent.jpg", NOW - timedelta(hours=23))
        flagged_image(s, tmp_path, "clinic-a/benign.jpg", NOW - timedelta(hours=48), flagged=False)
        reviewed = flagged_image(s, tmp_path, "clinic-a/reviewed.jpg", NOW - timedelta(hours=48))
        reviewer = add_user(s, name="derm", email="derm-a@clinic-a.example", role=Role.REVIEWER,
                            password_hash="x", now=NOW)
        add_review(s, reviewed, reviewer, verdict=Verdict.BENIGN, diagnosis="nevus", note="",
                   now=NOW - timedelta(hours=40))

    enqueued: list[int] = []
    settings = settings_for(database_url, tmp_path)
    reminded = queue_due_escalations(sessions, settings, NOW, enqueued.append)
    assert len(reminded) == 2
    # A second beat, a restart, a redelivered task: nothing more, ever, for these images.
    assert queue_due_escalations(sessions, settings, NOW + timedelta(minutes=1), ignore) == []

    handler = RecordingHandler()
    with smtp_server(handler) as controller:
        smtp = SmtpSettings(host=LOOPBACK, port=controller.port, security="none",
                            sender="melanoscreen@hospital.example", timeout=5)
        for outbox_id in enqueued:
            outcome = deliver_outbox(sessions, outbox_id, token=uuid.uuid4().hex,
                                     settings=settings_for(database_url, tmp_path, smtp=smtp))
            assert outcome.status == "sent"
        received = handler.wait_for(4)
    by_source: dict[str, set[str]] = {}
    for item in received:
        subject = str(item.message["Subject"])
        assert subject.startswith("[reminder] Melanoma suspected"), subject
        by_source.setdefault(subject.rsplit(": ", 1)[1], set()).add(item.rcpt_tos[0])
        assert "Reminder: still unreviewed" in item.message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    # The route's recipients (or the global ones) plus MELANOSCREEN_ESCALATE_TO.
    assert by_source == {"clinic-a/old.jpg": {"derm-a@clinic-a.example", HEAD},
                         "clinic-b/old.jpg": {"oncall@hospital.example", HEAD}}


def test_the_recent_one_comes_due_later_and_a_review_first_sends_nothing(
        sessions: sessionmaker[Session], database_url: str, tmp_path: Path) -> None:
    with sessions.begin() as s:
        flagged_image(s, tmp_path, "clinic-a/due-later.jpg", NOW - timedelta(hours=23))
        later = flagged_image(s, tmp_path, "clinic-a/reviewed-in-time.jpg", NOW - timedelta(hours=23))
        reviewer = add_user(s, name="derm", email="derm-a@clinic-a.example", role=Role.REVIEWER,
                            password_hash="x", now=NOW)
    settings = settings_for(database_url, tmp_path)
    assert queue_due_escalations(sessions, settings, NOW, ignore) == []
    with sessions.begin() as s:
        image = s.get_one(Image, later.id)
        add_review(s, image, s.get_one(type(reviewer), reviewer.id), verdict=Verdict.REFER,
                   diagnosis=None, note="", now=NOW + timedelta(minutes=30))
    ids: list[int] = []
    reminded = queue_due_escalations(sessions, settings, NOW + timedelta(hours=2), ids.append)
    assert len(reminded) == 1 and len(ids) == 2
    with sessions.begin() as s:
        escalated = s.scalars(select(Image.source).where(Image.escalated_at.is_not(None))).all()
    assert escalated == ["clinic-a/due-later.jpg"]


def test_zero_turns_escalation_off(sessions: sessionmaker[Session], database_url: str,
                                   tmp_path: Path) -> None:
    with sessions.begin() as s:
        flagged_image(s, tmp_path, "clinic-a/old.jpg", NOW - timedelta(days=10))
    assert queue_due_escalations(sessions, settings_for(database_url, tmp_path, after=0), NOW,
                                 ignore) == []
