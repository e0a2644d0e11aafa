"""When the nightly digest is due: which dates are owed, and which window each one covers.

Pure: dates and times in, dates and times out. What a digest says and how it is sent live with
the other messages in `worker.messages` and `worker.digests`.
"""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

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
