"""The digest's queries: the row that takes a date, and what happened in its window."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, func, or_, select
from sqlalchemy.orm import Session

from db.predictions import previous_predictions
from db.schema import Digest, Image, ImageStatus, OutboxKind, OutboxMessage, OutboxStatus, Prediction


def last_digest(session: Session) -> Digest | None:
    """The latest digest date taken, if any."""
    return session.scalars(select(Digest).order_by(Digest.day.desc()).limit(1)).one_or_none()


def take_digest(session: Session, *, day: date, period_start: datetime, period_end: datetime,
                recipients: int, now: datetime) -> None:
    """Insert the digest row for `day`; raises IntegrityError when someone else already has it.

    Callers make this the first statement of their transaction, so that on SQLite the write lock
    is waited for (busy timeout) instead of failing on a stale snapshot.
    """
    session.add(Digest(day=day, period_start=period_start, period_end=period_end,
                       recipients=recipients, created_at=now))
    session.flush()


def images_in_period(session: Session, start: datetime, end: datetime,
                     statuses: Sequence[ImageStatus]) -> list[Image]:
    """Images that reached one of `statuses` in [start, end), oldest first."""
    return list(session.scalars(
        select(Image).where(Image.status.in_(statuses), Image.screened_at >= start,
                            Image.screened_at < end).order_by(Image.screened_at, Image.id)
    ))


def flagged_in_period(session: Session, start: datetime,
                      end: datetime) -> list[tuple[Image, Prediction]]:
    """Flagged predictions made in [start, end) with their images, highest probability first."""
    return _predictions_in_period(session, start, end, Prediction.flagged.is_(True),
                                  Prediction.melanoma_probability.desc())


def out_of_scope_in_period(session: Session, start: datetime,
                           end: datetime) -> list[tuple[Image, Prediction]]:
    """Predictions made in [start, end) that marked their image out of scope, oldest first."""
    return _predictions_in_period(session, start, end, Prediction.out_of_scope.is_(True),
                                  Prediction.created_at.asc())


def _predictions_in_period(session: Session, start: datetime, end: datetime,
                           condition: ColumnElement[bool],
                           order: ColumnElement[Any]) -> list[tuple[Image, Prediction]]:
    """Predictions made in [start, end) that meet `condition`, with their images, in `order`
    (then by image)."""
    return [(image, prediction) for image, prediction in session.execute(
        select(Image, Prediction).join(Prediction, Prediction.image_id == Image.id)
        .where(condition, Prediction.created_at >= start, Prediction.created_at < end)
        .order_by(order, Image.id)
    )]


def latest_prediction_before(session: Session, end: datetime) -> Prediction | None:
    """The newest prediction made before `end` (for the model version and threshold)."""
    return session.scalars(select(Prediction).where(Prediction.created_at < end)
                           .order_by(Prediction.created_at.desc()).limit(1)).one_or_none()


def undelivered_alerts(session: Session, start: datetime, end: datetime) -> list[OutboxMessage]:
    """Alerts that failed in [start, end), or were tried before `end` and wait for a retry."""
    failed = and_(OutboxMessage.status == OutboxStatus.FAILED, OutboxMessage.failed_at >= start,
                  OutboxMessage.failed_at < end)
    unsent = and_(OutboxMessage.status == OutboxStatus.PENDING, OutboxMessage.attempts > 0,
                  OutboxMessage.created_at < end)
    return list(session.scalars(
        select(OutboxMessage).where(OutboxMessage.kind == OutboxKind.ALERT, or_(failed, unsent))
        .order_by(OutboxMessage.created_at, OutboxMessage.id)
    ))


def lost_flags_in_period(session: Session, start: datetime,
                         end: datetime) -> list[tuple[Image, Prediction, Prediction]]:
    """Re-screens in [start, end) that no longer flag an image the version before flagged:
    (image, the new prediction, the earlier flagged one), by source; for the digest."""
    screened_again = (select(Prediction.image_id).group_by(Prediction.image_id)
                      .having(func.count() > 1))
    unflagged = list(session.scalars(
        select(Prediction).where(Prediction.created_at >= start, Prediction.created_at < end,
                                 Prediction.flagged.is_(False),
                                 Prediction.image_id.in_(screened_again))))
    earlier = previous_predictions(session, unflagged)
    lost = [(session.get_one(Image, p.image_id), p, earlier[p.image_id])
            for p in unflagged if p.image_id in earlier and earlier[p.image_id].flagged]
    return sorted(lost, key=lambda row: row[0].source)
