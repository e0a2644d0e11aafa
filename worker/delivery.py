"""Deliver one outbox row: claim it, compose it if needed, hand it to SMTP, record what happened.

Exactly once, as far as any mail system can be: the row is claimed (`pending` → `sending`, the
status test inside the UPDATE), so a redelivered or re-run task finds a row marked `sent` and
sends nothing. The one boundary nobody can close: a crash after the SMTP server accepted the
message but before the `sent` mark is committed. The row then stays `sending`; once its claim
is stale the sweep hands it out again and the message is sent a second time, carrying the same
Message-ID (it is composed once and its bytes kept), so mail clients can tell it is the same.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import formatdate
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from db import outbox
from db.schema import utcnow
from worker.mail import (
    AlertContent,
    FlaggedImage,
    PermanentMailError,
    SmtpConfig,
    TransientMailError,
    alert_message_id,
    alert_subject,
    backoff_delay,
    compose_alert,
    deliver,
)

logger = logging.getLogger(__name__)

#: Makes the Grad-CAM overlay (PNG) of a stored image, or None when it cannot.
Overlay = Callable[[Path], bytes | None]


@dataclass(frozen=True)
class DeliveryOptions:
    """Where and how messages go, and how hard to try."""

    smtp: SmtpConfig
    outbox_dir: Path  # with no SMTP host, messages become .eml files here
    timezone: str = "UTC"
    max_attempts: int = 8
    retry_base: float = 30.0  # seconds; the first retry waits up to this, then doubling
    retry_cap: float = 3600.0
    stale_after: float = 600.0  # seconds a `sending` claim is honoured before it may be retaken


@dataclass(frozen=True)
class DeliveryOutcome:
    """What one delivery call did: sent, failed, retry (after `retry_in` seconds) or skipped."""

    status: str
    retry_in: float | None = None
    detail: str | None = None


def new_alert_key() -> str:
    """A fresh key for one alert; each recipient's message gets a Message-ID derived from it."""
    # Short enough that the Message-ID header is never folded (78 columns).
    return uuid.uuid4().hex[:16]


def recipient_message_id(key: str, recipient: str) -> str:
    """The stable Message-ID of one recipient's copy of the alert `key` (kept on every resend)."""
    return alert_message_id(f"{key}.{hashlib.sha256(recipient.lower().encode()).hexdigest()[:8]}")


def alert_subject_for(sources: list[tuple[str, float]], threshold: float) -> str:
    """The alert's subject from (source, melanoma probability) pairs, without loading images."""
    images = [FlaggedImage(source=source, melanoma_probability=p, probabilities={},
                           predicted_class="melanoma", received_at=utcnow(), image=None)
              for source, p in sources]
    return alert_subject(AlertContent(images=images, model_version="", threshold=threshold))


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError as exc:
        logger.warning("cannot read %s for the alert: %s", path, exc)
        return None


def compose_alert_bytes(items: list[outbox.AlertItem], *, message_id: str, recipient: str,
                        sender: str, timezone: str, overlay: Overlay | None) -> bytes:
    """The alert email for these flagged images, as the bytes that every attempt will send."""
    images = []
    for item in items:
        location = Path(item.location)
        images.append(FlaggedImage(
            source=item.source, melanoma_probability=item.melanoma_probability,
            probabilities=item.probabilities, predicted_class=item.predicted_class,
            received_at=item.received_at, image=_read(location),
            gradcam_png=overlay(location) if overlay is not None else None))
    content = AlertContent(images=images, model_version=items[0].model_version,
                           threshold=items[0].threshold, timezone=timezone)
    message = compose_alert(content, message_id=message_id, sender=sender, recipients=[recipient])
    message["Date"] = formatdate(usegmt=True)
    return message.as_bytes()


def parse_message(raw: bytes) -> EmailMessage:
    """Stored bytes back into a message."""
    message = BytesParser(policy=policy.default).parsebytes(raw)
    assert isinstance(message, EmailMessage)
    return message


def deliver_outbox(sessions: sessionmaker[Session], outbox_id: int, *, token: str,
                   options: DeliveryOptions, overlay: Overlay | None = None) -> DeliveryOutcome:
    """Try to deliver one outbox row once; safe to call again (a `sent` row is left alone)."""
    now = utcnow()
    with sessions.begin() as session:
        claimed = outbox.claim_message(session, outbox_id, token=token, now=now,
                                       stale_before=now - timedelta(seconds=options.stale_after))
        items = outbox.alert_items(session, outbox_id) if claimed and claimed.raw is None else []
    if claimed is None:
        # Sent, failed, or held by another delivery: nothing to do, and nothing is sent.
        logger.info("outbox %d: not pending (already sent, failed or in hand); nothing sent",
                    outbox_id)
        return DeliveryOutcome("skipped")

    raw = claimed.raw
    if raw is None:
        if not items:
            return _finish(sessions, claimed, token, "failed", "error", "nothing to send")
        raw = compose_alert_bytes(items, message_id=claimed.message_id,
                                  recipient=claimed.recipient, sender=options.smtp.sender,
                                  timezone=options.timezone, overlay=overlay)
        with sessions.begin() as session:
            outbox.store_raw(session, claimed.id, token=token, raw=raw)

    try:
        result = deliver(parse_message(raw), [claimed.recipient], options.smtp, options.outbox_dir)
    except TransientMailError as exc:
        if claimed.attempts >= options.max_attempts:
            reason = f"gave up after {claimed.attempts} attempts: {exc}"
            return _finish(sessions, claimed, token, "failed", "deferred", reason)
        delay = backoff_delay(claimed.attempts - 1, base=options.retry_base, cap=options.retry_cap)
        return _finish(sessions, claimed, token, "pending", "deferred", str(exc), retry_in=delay)
    except PermanentMailError as exc:
        return _finish(sessions, claimed, token, "failed", "rejected", str(exc))
    if claimed.recipient in result.rejected:
        return _finish(sessions, claimed, token, "failed", "rejected",
                       result.rejected[claimed.recipient])
    where = str(result.outbox_path) if result.outbox_path else "accepted by the SMTP server"
    return _finish(sessions, claimed, token, "sent", "sent", where)


def _finish(sessions: sessionmaker[Session], claimed: outbox.ClaimedMessage, token: str,
            status: str, outcome: str, detail: str,
            retry_in: float | None = None) -> DeliveryOutcome:
    now = utcnow()
    with sessions.begin() as session:
        outbox.record_attempt(session, claimed.id, now=now, outcome=outcome, detail=detail)
        next_at = now + timedelta(seconds=retry_in) if retry_in is not None else None
        held = outbox.finish_message(session, claimed.id, token=token, now=now, status=status,
                                     error=None if status == "sent" else detail,
                                     next_attempt_at=next_at)
    if not held:
        logger.warning("outbox %d: the claim was taken over before it could be marked %s",
                       claimed.id, status)
    log = logger.info if status == "sent" else logger.warning
    log("outbox %d (%s to %s, attempt %d): %s: %s", claimed.id, claimed.kind, claimed.recipient,
        claimed.attempts, status, detail)
    return DeliveryOutcome("retry" if status == "pending" else status, retry_in, detail)


def stale_outbox(sessions: sessionmaker[Session], stale_after: float) -> list[int]:
    """Ids of outbox rows the queue may have lost, marked as re-enqueued now."""
    now = utcnow()
    with sessions.begin() as session:
        ids = outbox.stale_message_ids(session, before=now - timedelta(seconds=stale_after))
        outbox.mark_messages_enqueued(session, ids, now)
    return ids
