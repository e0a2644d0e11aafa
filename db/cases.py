"""A case: everything the case page shows about one image."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.reviews import ReviewRow, reviews_of
from db.schema import AlertImage, DeliveryAttempt, Duplicate, Image, OutboxMessage, Prediction


@dataclass(frozen=True)
class AlertRow:
    """One alert email about an image, and its delivery."""

    recipient: str
    subject: str
    status: str
    attempts: int
    last_error: str | None
    created_at: datetime
    sent_at: datetime | None
    tries: list[tuple[datetime, str, str | None]] = field(default_factory=list)


@dataclass(frozen=True)
class Case:
    """Everything the case page shows about one image."""

    image: Image
    duplicates: list[Duplicate]
    predictions: list[Prediction]  # newest first, every model version
    alerts: list[AlertRow]
    reviews: list[ReviewRow]


def find_case(session: Session, sha256: str) -> Case | None:
    """The case of the image with this content, if it is known."""
    image = session.scalars(select(Image).where(Image.sha256 == sha256)).one_or_none()
    if image is None:
        return None
    duplicates = list(session.scalars(select(Duplicate).where(Duplicate.image_id == image.id)
                                      .order_by(Duplicate.received_at)))
    predictions = list(session.scalars(select(Prediction).where(Prediction.image_id == image.id)
                                       .order_by(Prediction.id.desc())))
    messages = list(session.scalars(
        select(OutboxMessage).join(AlertImage, AlertImage.outbox_id == OutboxMessage.id)
        .where(AlertImage.image_id == image.id).order_by(OutboxMessage.created_at, OutboxMessage.id)))
    tries: dict[int, list[tuple[datetime, str, str | None]]] = {}
    if messages:
        for attempt in session.scalars(select(DeliveryAttempt).where(
                DeliveryAttempt.outbox_id.in_([m.id for m in messages])).order_by(DeliveryAttempt.at)):
            tries.setdefault(attempt.outbox_id, []).append((attempt.at, attempt.outcome, attempt.detail))
    alerts = [AlertRow(m.recipient, m.subject, m.status.value, m.attempts, m.last_error,
                       m.created_at, m.sent_at, tries.get(m.id, [])) for m in messages]
    return Case(image, duplicates, predictions, alerts, reviews_of(session, image.id))
