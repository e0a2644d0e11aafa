"""Outbox, digest and delivery-attempt queries."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import CursorResult, and_, func, or_, select, update
from sqlalchemy.orm import Session

from db.schema import (
    AlertImage,
    DeliveryAttempt,
    DicomInstance,
    Image,
    OutboxKind,
    OutboxMessage,
    OutboxStatus,
    Prediction,
)


def add_message(session: Session, *, kind: OutboxKind, recipient: str, message_id: str, subject: str,
                now: datetime, raw: bytes | None = None, digest_date: date | None = None,
                label: str | None = None) -> int:
    """A new `pending` outbox row; flushed, so it has its id."""
    row = OutboxMessage(kind=kind, recipient=recipient, message_id=message_id, subject=subject,
                        status=OutboxStatus.PENDING, attempts=0, raw=raw, digest_date=digest_date,
                        created_at=now, enqueued_at=now, label=label)
    session.add(row)
    session.flush()
    return row.id


def link_alert_images(session: Session, outbox_id: int,
                      images: Sequence[tuple[int, int]]) -> None:
    """Record which (image id, prediction id) pairs an alert message is about."""
    session.add_all(AlertImage(outbox_id=outbox_id, image_id=image_id, prediction_id=prediction_id)
                    for image_id, prediction_id in images)
    session.flush()


@dataclass(frozen=True)
class ClaimedMessage:
    """An outbox row this delivery now holds (`sending`)."""

    id: int
    kind: OutboxKind
    recipient: str
    message_id: str
    subject: str
    raw: bytes | None
    attempts: int  # including this one


def claim_message(session: Session, outbox_id: int, *, token: str, now: datetime,
                  stale_before: datetime) -> ClaimedMessage | None:
    """Move a `pending` row (or this token's own, or a stale `sending` one) to `sending`.

    The status test is inside the UPDATE, so two deliveries of one row cannot both hold it, and
    a row already `sent` or `failed` is never taken again. None when it is not ours to send.
    """
    claimable = or_(
        OutboxMessage.status == OutboxStatus.PENDING,
        and_(OutboxMessage.status == OutboxStatus.SENDING,
             or_(OutboxMessage.claim_token == token, OutboxMessage.claimed_at < stale_before)),
    )
    result: CursorResult[Any] = session.execute(  # type: ignore[assignment]
        update(OutboxMessage)
        .where(OutboxMessage.id == outbox_id, claimable)
        .values(status=OutboxStatus.SENDING, claim_token=token, claimed_at=now,
                attempts=OutboxMessage.attempts + 1)
    )
    if result.rowcount != 1:
        return None
    row = session.get_one(OutboxMessage, outbox_id, populate_existing=True)
    return ClaimedMessage(row.id, row.kind, row.recipient, row.message_id, row.subject, row.raw,
                          row.attempts)


def store_raw(session: Session, outbox_id: int, *, token: str, raw: bytes) -> bool:
    """Keep the composed bytes, so a retry sends the very same message; False if not held."""
    result: CursorResult[Any] = session.execute(  # type: ignore[assignment]
        update(OutboxMessage)
        .where(OutboxMessage.id == outbox_id, OutboxMessage.claim_token == token,
               OutboxMessage.status == OutboxStatus.SENDING, OutboxMessage.raw.is_(None))
        .values(raw=raw)
    )
    return result.rowcount == 1


def record_attempt(session: Session, outbox_id: int, *, now: datetime, outcome: str,
                   detail: str | None) -> None:
    """Append one delivery attempt to the log."""
    session.add(DeliveryAttempt(outbox_id=outbox_id, at=now, outcome=outcome, detail=detail))
    session.flush()


def finish_message(session: Session, outbox_id: int, *, token: str, now: datetime,
                   status: OutboxStatus,
                   error: str | None = None, next_attempt_at: datetime | None = None) -> bool:
    """Release the claim: `sent`, `failed` (with the reason) or back to `pending` for a retry."""
    values: dict[str, Any] = {"status": status, "claim_token": None, "last_error": error}
    if status is OutboxStatus.SENT:
        values["sent_at"] = now
    elif status is OutboxStatus.FAILED:
        values["failed_at"] = now
    else:
        values.update(next_attempt_at=next_attempt_at, enqueued_at=now)
    result: CursorResult[Any] = session.execute(  # type: ignore[assignment]
        update(OutboxMessage)
        .where(OutboxMessage.id == outbox_id, OutboxMessage.claim_token == token,
               OutboxMessage.status == OutboxStatus.SENDING)
        .values(**values)
    )
    return result.rowcount == 1


def stale_message_ids(session: Session, *, before: datetime, limit: int = 1000) -> list[int]:
    """Rows the queue may have lost: `pending` and overdue, or `sending` with a stale claim."""
    overdue = and_(
        OutboxMessage.status == OutboxStatus.PENDING,
        func.coalesce(OutboxMessage.enqueued_at, OutboxMessage.created_at) < before,
        or_(OutboxMessage.next_attempt_at.is_(None), OutboxMessage.next_attempt_at < before),
    )
    stuck = and_(OutboxMessage.status == OutboxStatus.SENDING, OutboxMessage.claimed_at < before,
                 func.coalesce(OutboxMessage.enqueued_at, OutboxMessage.created_at) < before)
    return list(session.scalars(
        select(OutboxMessage.id).where(or_(overdue, stuck)).order_by(OutboxMessage.id).limit(limit)
    ))


def mark_messages_enqueued(session: Session, outbox_ids: Sequence[int], now: datetime) -> None:
    """Note when these rows were last handed to the queue (the sweep's clock)."""
    if outbox_ids:
        session.execute(update(OutboxMessage).where(OutboxMessage.id.in_(outbox_ids))
                        .values(enqueued_at=now))


def requeue_failed(session: Session, *, now: datetime,
                   kinds: Sequence[OutboxKind] = (OutboxKind.ALERT,)) -> list[int]:
    """Give failed rows of these kinds a fresh set of attempts; returns their ids."""
    ids = list(session.scalars(
        select(OutboxMessage.id).where(OutboxMessage.status == OutboxStatus.FAILED,
                                       OutboxMessage.kind.in_(kinds)).order_by(OutboxMessage.id)
    ))
    if ids:
        session.execute(
            update(OutboxMessage)
            .where(OutboxMessage.id.in_(ids), OutboxMessage.status == OutboxStatus.FAILED)
            .values(status=OutboxStatus.PENDING, attempts=0, failed_at=None, next_attempt_at=None,
                    enqueued_at=now, claim_token=None)
        )
    return ids


def outbox_counts(session: Session, kind: OutboxKind = OutboxKind.ALERT) -> dict[str, int]:
    """Number of outbox rows of `kind` per status (every status present, zero included)."""
    counts = dict.fromkeys((status.value for status in OutboxStatus), 0)
    rows = session.execute(select(OutboxMessage.status, func.count())
                           .where(OutboxMessage.kind == kind).group_by(OutboxMessage.status))
    counts.update({OutboxStatus(status).value: int(count) for status, count in rows})
    return counts


@dataclass(frozen=True)
class AlertItem:
    """One flagged image of an alert, with what the email shows about it."""

    source: str
    location: str
    received_at: datetime
    melanoma_probability: float
    probabilities: dict[str, float]
    predicted_class: str
    model_version: str
    threshold: float
    sha256: str = ""
    out_of_scope: bool = False
    #: The study's accession number, for an image that came as DICOM (emails name the study by
    #: it, never by the patient).
    accession_number: str | None = None


def alert_label(session: Session, outbox_id: int) -> str | None:
    """Why an alert message was sent beside the first ('re-screen', 'reminder'), if it was."""
    return session.scalar(select(OutboxMessage.label).where(OutboxMessage.id == outbox_id))


def alert_items(session: Session, outbox_id: int) -> list[AlertItem]:
    """The flagged images an alert message is about, highest melanoma probability first."""
    rows = session.execute(
        select(Image, Prediction, DicomInstance.accession_number)
        .join(AlertImage, AlertImage.image_id == Image.id)
        .join(Prediction, Prediction.id == AlertImage.prediction_id)
        .outerjoin(DicomInstance, DicomInstance.image_id == Image.id)
        .where(AlertImage.outbox_id == outbox_id)
        .order_by(Prediction.melanoma_probability.desc(), Image.id)
    )
    return [AlertItem(image.source, image.location, image.received_at,
                      prediction.melanoma_probability, dict(prediction.probabilities),
                      prediction.predicted_class, prediction.model_version, prediction.threshold,
                      image.sha256, bool(prediction.out_of_scope), accession)
            for image, prediction, accession in rows]
