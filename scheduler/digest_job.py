"""The nightly digest job: decide which dates are owed, take each date's row, write the emails.

Plain functions over a session factory (the Celery task in `scheduler.tasks` and the
`melanoscreen digest` command both call them). Exactly once per date: the `digests` row is the
first statement of the transaction that also writes the outbox rows, so of two beats, workers
or commands racing for one date exactly one inserts it; the other gets a unique violation and
sends nothing. Delivery happens after the commit, from the outbox.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, time
from email.utils import formatdate
from pathlib import Path
from zoneinfo import ZoneInfo

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from db import outbox
from scheduler.digest import (
    MAX_THUMBNAILS,
    DigestContent,
    DigestImage,
    FileProblem,
    UndeliveredAlert,
    compose_digest,
    digest_due_dates,
    digest_message_id,
    digest_period,
)

logger = logging.getLogger(__name__)

#: At most this many owed days are caught up after a long outage (the newest ones).
MAX_CATCH_UP_DAYS = 31


@dataclass(frozen=True)
class DigestJobConfig:
    """What the digest job needs, as plain values (set by the worker command)."""

    database_url: str
    recipients: tuple[str, ...]
    digest_time: time
    timezone: str
    sender: str = "melanoscreen@localhost"


def _read(location: str) -> bytes | None:
    try:
        return Path(location).read_bytes()
    except OSError:
        return None


def build_digest_content(session: Session, day: date, digest_time: time, timezone: str) -> DigestContent:
    """Everything the digest of `day` says, read from the database for its window."""
    start, end = digest_period(day, digest_time, ZoneInfo(timezone))
    screened = outbox.images_in_period(session, start, end, ("screened",))
    rejected = outbox.images_in_period(session, start, end, ("rejected",))
    failed = outbox.images_in_period(session, start, end, ("failed",))
    flagged = outbox.flagged_in_period(session, start, end)
    images = [
        DigestImage(source=image.source, melanoma_probability=prediction.melanoma_probability,
                    predicted_class=prediction.predicted_class, received_at=image.received_at,
                    thumbnail=_read(image.location) if rank < MAX_THUMBNAILS else None)
        for rank, (image, prediction) in enumerate(flagged)
    ]
    undelivered = [
        UndeliveredAlert(subject=row.subject,
                         reason=row.last_error or "not delivered yet",
                         recipients=(row.recipient,), attempts=row.attempts)
        for row in outbox.undelivered_alerts(session, start, end)
    ]
    latest = outbox.latest_prediction_before(session, end)
    return DigestContent(
        day=day, period_start=start, period_end=end, timezone=timezone,
        screened=len(screened), flagged=len({image.id for image, _ in flagged}),
        rejected=len(rejected), failed=len(failed), flagged_images=images,
        rejected_files=[FileProblem(i.source, i.reason or "unreadable") for i in rejected],
        failed_files=[FileProblem(i.source, i.reason or "failed") for i in failed],
        undelivered_alerts=undelivered,
        model_version=latest.model_version if latest else None,
        threshold=latest.threshold if latest else None,
    )


def recipient_digest_message_id(day: date, recipient: str) -> str:
    """`<digest-DAY.HASH@melanoscreen.invalid>`: the Message-ID of one recipient's copy."""
    left, right = digest_message_id(day).strip("<>").split("@", 1)
    return f"<{left}.{hashlib.sha256(recipient.lower().encode()).hexdigest()[:10]}@{right}>"


def take_and_write_digest(sessions: sessionmaker[Session], config: DigestJobConfig, day: date,
                          now: datetime) -> list[int] | None:
    """Take the row for `day` and write one outbox row per recipient; None if already taken."""
    start, end = digest_period(day, config.digest_time, ZoneInfo(config.timezone))
    try:
        with sessions.begin() as session:
            # First statement of the transaction: the exactly-once guard (see the module doc).
            outbox.take_digest(session, day=day, period_start=start, period_end=end,
                               recipients=len(config.recipients), now=now)
            content = build_digest_content(session, day, config.digest_time, config.timezone)
            message = compose_digest(content, message_id=digest_message_id(day),
                                     sender=config.sender)
            message["Date"] = formatdate(usegmt=True)
            ids = []
            for recipient in config.recipients:
                # One Message-ID per recipient's copy (an outbox row is one email), stable.
                message_id = recipient_digest_message_id(day, recipient)
                message.replace_header("Message-ID", message_id)
                del message["To"]
                message["To"] = recipient
                ids.append(outbox.add_message(
                    session, kind="digest", recipient=recipient, message_id=message_id,
                    subject=str(message["Subject"]), raw=message.as_bytes(), digest_date=day,
                    now=now))
    except IntegrityError:
        logger.info("digest %s already taken by another run; not sending it again", day)
        return None
    logger.info("digest %s written for %d recipient(s): %d screened, %d flagged", day, len(ids),
                content.screened, content.flagged)
    return ids


def due_digest_dates(sessions: sessionmaker[Session], config: DigestJobConfig,
                     now: datetime) -> list[date]:
    """The digest dates owed at `now`, oldest first (missed days included, up to a month)."""
    with sessions.begin() as session:
        last = outbox.last_digest(session)
        last_day = last.day if last else None
    owed = digest_due_dates(last_day, now, config.digest_time, ZoneInfo(config.timezone))
    if len(owed) > MAX_CATCH_UP_DAYS:
        logger.warning("%d digests owed; sending the last %d", len(owed), MAX_CATCH_UP_DAYS)
        owed = owed[-MAX_CATCH_UP_DAYS:]
    return owed


def queue_due_digests(sessions: sessionmaker[Session], config: DigestJobConfig, now: datetime,
                      enqueue: Callable[[int], None]) -> list[date]:
    """Write every owed digest and hand each outbox row to `enqueue` after its commit."""
    if not config.recipients:
        return []
    written = []
    for day in due_digest_dates(sessions, config, now):
        ids = take_and_write_digest(sessions, config, day, now)
        if ids is None:
            continue
        for outbox_id in ids:
            enqueue(outbox_id)
        written.append(day)
    return written
