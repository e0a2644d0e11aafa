"""The nightly digest job: take each owed date's row, compose its emails, write them to the outbox.

Plain functions over a session factory (the worker's `queue_digests` task and the
`melanoscreen digest` command both call them). *When* a digest is owed (which dates, which
window each covers) is pure date math here too: dates and times in, dates and times out.
Exactly once per date: the `digests` row is the first statement of the transaction that also
writes the outbox rows, so of two beats, workers or commands racing for one date exactly one
inserts it; the other gets a unique violation and sends nothing.
Delivery happens after the commit, from the outbox.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from db import digests, outbox, reviews
from db.schema import ImageStatus, OutboxKind
from melanoscreen.settings import Settings
from service.digest_message import (
    MAX_DIGEST_THUMBNAILS,
    DigestContent,
    DigestImage,
    FileProblem,
    LostFlag,
    OutOfScopeImage,
    UndeliveredAlert,
    UnreviewedImage,
    compose_digest,
    digest_key,
)
from service.messages import case_url, recipient_message_id
from service.pictures import email_picture
from service.thresholds import threshold_sentence

logger = logging.getLogger(__name__)

#: At most this many owed days are caught up after a long outage (the newest ones).
MAX_CATCH_UP_DAYS = 31


def _instant(day: date, at: time, tz: ZoneInfo) -> datetime:
    """The UTC instant of local wall-clock `day` `at`.

    A time skipped by a spring-forward gap is read with the offset before the gap, so 02:30
    becomes 03:30 (zoneinfo's fold=0); a time repeated on a fall-back night means its first
    occurrence.
    """
    return datetime.combine(day, at.replace(tzinfo=None), tzinfo=tz).astimezone(UTC)


def digest_period(day: date, digest_time: time, tz: ZoneInfo) -> tuple[datetime, datetime]:
    """The UTC window the digest of `day` covers: the day before at digest time, to `day` at it."""
    return _instant(day - timedelta(days=1), digest_time, tz), _instant(day, digest_time, tz)


def digest_due_dates(last_sent: date | None, now: datetime, digest_time: time, tz: ZoneInfo,
                     *, first_start: datetime | None = None) -> list[date]:
    """The digest dates owed at `now`, oldest first: missed days are caught up, none is doubled.

    Works on local calendar dates, so a 23- or 25-hour day neither skips nor repeats a digest.
    With nothing sent yet, only the latest due digest is owed; after a long outage, at most the
    last `MAX_CATCH_UP_DAYS`. With `first_start`, none for a window that ended before it (a
    new install does not mail an empty digest of the day before it existed).
    """
    owed = _due_dates(last_sent, now, digest_time, tz)
    if first_start is None:
        return owed
    return [day for day in owed if digest_period(day, digest_time, tz)[1] > first_start]


def _due_dates(last_sent: date | None, now: datetime, digest_time: time, tz: ZoneInfo) -> list[date]:
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    today = now.astimezone(tz).date()
    latest = today if now >= _instant(today, digest_time, tz) else today - timedelta(days=1)
    if last_sent is None:
        return [latest]
    owed = [last_sent + timedelta(days=n) for n in range(1, (latest - last_sent).days + 1)]
    if len(owed) > MAX_CATCH_UP_DAYS:
        logger.warning("%d digests owed; sending the last %d", len(owed), MAX_CATCH_UP_DAYS)
    return owed[-MAX_CATCH_UP_DAYS:]



#: A flagged image still unreviewed this long after it was screened heads the digest.
UNREVIEWED_AFTER = timedelta(hours=24)


def _read(location: str) -> bytes | None:
    return email_picture(location)


def build_digest_content(session: Session, day: date, digest_time: time, timezone: str,
                         model_path: Path | None = None, public_url: str | None = None,
                         keep: Callable[[str], bool] | None = None,
                         recipients: Collection[str] | None = None) -> DigestContent:
    """Everything the digest of `day` says, read from the database for its window; what the
    threshold means comes from the card of the model at `model_path` (None: the shipped one);
    with `public_url` (the review app's address) the unreviewed images link to their case pages.
    With `keep`, only images whose source it accepts (one route's digest), and with `recipients`
    only the undelivered alerts addressed to them."""
    start, end = digest_period(day, digest_time, ZoneInfo(timezone))
    ours = keep or (lambda _source: True)
    unreviewed = [
        UnreviewedImage(source=image.source, melanoma_probability=image.melanoma_probability or 0.0,
                        threshold=None, screened_at=image.screened_at or image.received_at,
                        url=case_url(public_url, image.sha256))
        for image in reviews.unreviewed_flagged_before(session, end - UNREVIEWED_AFTER)
        if ours(image.source)]
    screened = [i for i in digests.images_in_period(session, start, end, (ImageStatus.SCREENED,))
                if ours(i.source)]
    rejected = [i for i in digests.images_in_period(session, start, end, (ImageStatus.REJECTED,))
                if ours(i.source)]
    failed = [i for i in digests.images_in_period(session, start, end, (ImageStatus.FAILED,))
              if ours(i.source)]
    flagged = [(i, p) for i, p in digests.flagged_in_period(session, start, end) if ours(i.source)]
    reviewed = reviews.latest_reviews(session, sorted({image.id for image, _ in flagged}))
    images = [
        DigestImage(source=image.source, melanoma_probability=prediction.melanoma_probability,
                    predicted_class=prediction.predicted_class, received_at=image.received_at,
                    thumbnail=_read(image.location) if rank < MAX_DIGEST_THUMBNAILS else None,
                    threshold=prediction.threshold, url=case_url(public_url, image.sha256),
                    unusual=bool(prediction.out_of_scope),
                    verdict=reviewed[image.id].verdict.value if image.id in reviewed else None,
                    reviewer=reviewed[image.id].reviewer if image.id in reviewed else None)
        for rank, (image, prediction) in enumerate(flagged)
    ]
    out_of_scope = [OutOfScopeImage(source=image.source, received_at=image.received_at)
                    for image, _ in digests.out_of_scope_in_period(session, start, end)
                    if ours(image.source)]
    undelivered = [
        UndeliveredAlert(subject=row.subject, reason=row.last_error or "not delivered yet",
                         attempts=row.attempts)
        for row in digests.undelivered_alerts(session, start, end)
        if recipients is None or row.recipient in recipients
    ]
    lost_flags = [
        LostFlag(source=image.source, melanoma_probability=now.melanoma_probability,
                 model_version=now.model_version, earlier_probability=then.melanoma_probability,
                 earlier_version=then.model_version, url=case_url(public_url, image.sha256))
        for image, now, then in digests.lost_flags_in_period(session, start, end)
        if ours(image.source)]
    latest = digests.latest_prediction_before(session, end)
    return DigestContent(
        day=day, period_start=start, period_end=end, timezone=timezone,
        screened=len(screened), flagged=len({image.id for image, _ in flagged}),
        rejected=len(rejected), failed=len(failed), flagged_images=images,
        rejected_files=[FileProblem(i.source, i.reason or "unreadable") for i in rejected],
        failed_files=[FileProblem(i.source, i.reason or "failed") for i in failed],
        undelivered_alerts=undelivered,
        model_version=latest.model_version if latest else None,
        threshold=latest.threshold if latest else None,
        out_of_scope_images=out_of_scope,
        threshold_meaning=threshold_sentence(model_path, latest.threshold, latest.model_version)
        if latest else None,
        unreviewed_images=unreviewed,
        lost_flags=lost_flags,
    )


def take_and_write_digest(sessions: sessionmaker[Session], settings: Settings, day: date,
                          now: datetime) -> list[int] | None:
    """Take the row for `day` and write one outbox row per recipient; None if already taken.

    The global recipients get every image; each route's recipients (MELANOSCREEN_ALERT_ROUTES) get
    a digest of only the images routed to them (longest prefix), with its own Message-IDs."""
    routes = settings.alert.routes
    copies: list[tuple[str | None, str]] = [(None, r) for r in settings.alert.recipients]
    copies += [(prefix, r) for prefix, addresses in routes.items() for r in addresses]
    start, end = digest_period(day, settings.digest.time, ZoneInfo(settings.timezone))
    try:
        with sessions.begin() as session:
            # First statement of the transaction: the exactly-once guard (see the module doc).
            digests.take_digest(session, day=day, period_start=start, period_end=end,
                               recipients=len(copies), now=now)
            contents: dict[str | None, DigestContent] = {}
            for route in dict.fromkeys(route for route, _ in copies):
                keep = None if route is None else _routed_to(settings, route)
                contents[route] = build_digest_content(
                    session, day, settings.digest.time, settings.timezone, settings.model,
                    settings.public_url, keep=keep,
                    recipients=None if route is None else routes[route])
            content = contents.get(None) or next(iter(contents.values()), None)
            ids = []
            for route, recipient in copies:
                # One Message-ID per recipient's copy (an outbox row is one email), stable.
                key = digest_key(day) if route is None else f"{digest_key(day)}-{route}"
                message = compose_digest(
                    contents[route], message_id=recipient_message_id(key, recipient),
                    sender=settings.smtp.sender, recipient=recipient)
                ids.append(outbox.add_message(
                    session, kind=OutboxKind.DIGEST, recipient=recipient,
                    message_id=message.message_id, subject=message.subject, raw=message.raw,
                    digest_date=day, now=now))
    except IntegrityError:
        logger.info("digest %s already taken by another run; not sending it again", day)
        return None
    if content is not None:
        logger.info("digest %s written for %d recipient(s): %d screened, %d flagged", day,
                    len(ids), content.screened, content.flagged)
    return ids


def _routed_to(settings: Settings, route: str) -> Callable[[str], bool]:
    """Whether a source's longest matching route prefix is `route`."""
    return lambda source: settings.alert.route_for(source) == route


def first_start(settings: Settings) -> datetime | None:
    """When the service first started on this data folder (`first-start`, written by the first
    start), so no digest is owed for a window before it; None where it is not recorded."""
    try:
        return datetime.fromisoformat(settings.first_start_file.read_text().strip())
    except (OSError, ValueError):
        return None


def queue_due_digests(sessions: sessionmaker[Session], settings: Settings, now: datetime,
                      enqueue: Callable[[int], None]) -> list[date]:
    """Write every digest owed at `now` and hand each outbox row to `enqueue` after its commit."""
    if not settings.alert.anyone:
        return []
    with sessions.begin() as session:
        last = digests.last_digest(session)
        last_day = last.day if last else None
    written = []
    for day in digest_due_dates(last_day, now, settings.digest.time, ZoneInfo(settings.timezone),
                                first_start=first_start(settings)):
        ids = take_and_write_digest(sessions, settings, day, now)
        if ids is None:
            continue
        for outbox_id in ids:
            enqueue(outbox_id)
        written.append(day)
    return written
