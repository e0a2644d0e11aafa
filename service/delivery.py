from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from db import outbox, reviews
from db.schema import OutboxStatus, utcnow
from melanoscreen.settings import Settings
from service.alert_message import ALERT_IMAGE_PX, AlertContent, FlaggedImage, compose_alert
from service.mail import PermanentMailError, TransientMailError, backoff_delay, deliver
from service.messages import ComposedMessage, case_url, review_hint
from service.pictures import shrunk_jpeg
from service.rates import benign_alerts_sentence
from service.thresholds import threshold_sentence

logger = logging.getLogger(__name__)

#: Makes the Grad-CAM overlay (PNG) of a stored image, or None when it cannot.
Overlay = Callable[[Path], bytes | None]
#: The longest wait between two delivery attempts (seconds).
RETRY_CAP = 3600.0


@dataclass(frozen=True)
class DeliveryOutcome:
    """What one delivery call did: sent, failed, retry (after `retry_in` seconds) or skipped."""

    status: str
    retry_in: float | None = None
    detail: str | None = None


def _named(item: outbox.AlertItem) -> str:
    """How the alert names an image: its source, and its study's accession number if DICOM."""
    if item.accession_number:
        return f"{item.source} (accession {item.accession_number})"
    return item.source


def local_review_url(settings: Settings) -> str:
    """The review app's address on the computer that runs it (loopback when it listens on all)."""
    host = settings.web.address
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://{f'[{host}]' if ':' in host else host}:{settings.web.port}"


def compose_alert_message(items: list[outbox.AlertItem], *, message_id: str, recipient: str,
                          sender: str, timezone: str, overlay: Overlay | None,
                          threshold_meaning: str | None = None,
                          public_url: str | None = None, label: str | None = None,
                          local_url: str | None = None,
                          benign_record: str | None = None) -> ComposedMessage:
    """The alert email for these flagged images, composed once: every attempt sends its bytes.
    Without `public_url`, the review app's `local_url` and how to reach it are said instead."""
    images = []
    for item in items:
        location = Path(item.location)
        images.append(FlaggedImage(
            source=_named(item), melanoma_probability=item.melanoma_probability,
            probabilities=item.probabilities, predicted_class=item.predicted_class,
            received_at=item.received_at, image=shrunk_jpeg(location, ALERT_IMAGE_PX, quality=92),
            gradcam_png=overlay(location) if overlay is not None else None,
            url=case_url(public_url, item.sha256) if item.sha256 else None))
    content = AlertContent(images=images, model_version=items[0].model_version,
                           threshold=items[0].threshold, timezone=timezone,
                           threshold_meaning=threshold_meaning, label=label,
                           unusual=all(item.out_of_scope for item in items),
                           review_hint=review_hint(local_url) if local_url and not public_url
                           else None, benign_record=benign_record)
    return compose_alert(content, message_id=message_id, sender=sender, recipient=recipient)


def alert_record(session: Session, model_version: str) -> str:
    """What the alert says of how this model version's reviewed alerts turned out."""
    figures = next(iter(reviews.performance(session, model_version)), None)
    return benign_alerts_sentence(figures.benign if figures else 0,
                                  figures.reviewed if figures else 0, model_version)


def deliver_outbox(sessions: sessionmaker[Session], outbox_id: int, *, token: str,
                   settings: Settings, overlay: Overlay | None = None) -> DeliveryOutcome:
    """Try to deliver one outbox row once; safe to call again (a `sent` row is left alone)."""
    now = utcnow()
    with sessions.begin() as session:
        claimed = outbox.claim_message(session, outbox_id, token=token, now=now,
                                       stale_before=now - timedelta(seconds=settings.sweep.limit))
        items = outbox.alert_items(session, outbox_id) if claimed and claimed.raw is None else []
        label = outbox.alert_label(session, outbox_id) if items else None
        record = alert_record(session, items[0].model_version) if items else None
    if claimed is None:
        # Sent, failed, or held by another delivery: nothing to do, and nothing is sent.
        logger.info("outbox %d: not pending (already sent, failed or in hand); nothing sent",
                    outbox_id)
        return DeliveryOutcome("skipped")

    raw = claimed.raw
    if raw is None:
        if not items:
            return _finish(sessions, claimed, token, OutboxStatus.FAILED, "error", "nothing to send")
        raw = compose_alert_message(items, message_id=claimed.message_id,
                                    recipient=claimed.recipient, sender=settings.smtp.sender,
                                    timezone=settings.timezone, overlay=overlay,
                                    threshold_meaning=threshold_sentence(
                                        settings.model, items[0].threshold,
                                        items[0].model_version),
                                    public_url=settings.public_url, label=label,
                                    local_url=local_review_url(settings),
                                    benign_record=record).raw
        with sessions.begin() as session:
            outbox.store_raw(session, claimed.id, token=token, raw=raw)

    message = ComposedMessage(claimed.recipient, claimed.message_id, claimed.subject, raw)
    try:
        written = deliver(message, settings.smtp, settings.outbox_dir)
    except TransientMailError as exc:
        if claimed.attempts >= settings.alert.max_attempts:
            reason = f"gave up after {claimed.attempts} attempts: {exc}"
            return _finish(sessions, claimed, token, OutboxStatus.FAILED, "deferred", reason)
        delay = backoff_delay(claimed.attempts - 1, base=settings.alert.retry_base, cap=RETRY_CAP)
        return _finish(sessions, claimed, token, OutboxStatus.PENDING, "deferred", str(exc),
                       retry_in=delay)
    except PermanentMailError as exc:
        return _finish(sessions, claimed, token, OutboxStatus.FAILED, "rejected", str(exc))
    where = str(written) if written else "accepted by the SMTP server"
    return _finish(sessions, claimed, token, OutboxStatus.SENT, "sent", where)


def _finish(sessions: sessionmaker[Session], claimed: outbox.ClaimedMessage, token: str,
            status: OutboxStatus, outcome: str, detail: str,
            retry_in: float | None = None) -> DeliveryOutcome:
    now = utcnow()
    with sessions.begin() as session:
        outbox.record_attempt(session, claimed.id, now=now, outcome=outcome, detail=detail)
        next_at = now + timedelta(seconds=retry_in) if retry_in is not None else None
        held = outbox.finish_message(session, claimed.id, token=token, now=now, status=status,
                                     error=None if status is OutboxStatus.SENT else detail,
                                     next_attempt_at=next_at)
    if not held:
        logger.warning("outbox %d: the claim was taken over before it could be marked %s",
                       claimed.id, status)
    log = logger.info if status is OutboxStatus.SENT else logger.warning
    log("outbox %d (%s to %s, attempt %d): %s: %s", claimed.id, claimed.kind, claimed.recipient,
        claimed.attempts, status, detail)
    return DeliveryOutcome("retry" if status is OutboxStatus.PENDING else status.value, retry_in,
                           detail)


def stale_outbox(sessions: sessionmaker[Session], stale_after: float) -> list[int]:
    """Ids of outbox rows the queue may have lost, marked as re-enqueued now."""
    now = utcnow()
    with sessions.begin() as session:
        ids = outbox.stale_message_ids(session, before=now - timedelta(seconds=stale_after))
        outbox.mark_messages_enqueued(session, ids, now)
    return ids
