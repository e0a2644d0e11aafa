"""Screen a batch of images: claim rows, decode, one forward pass, write everything in one transaction."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from sqlalchemy.orm import Session

from db import outbox, queries
from db.schema import utcnow
from worker import runtime
from worker.delivery import alert_subject_for, new_alert_key, recipient_message_id

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchOutcome:
    """What one task did."""

    screened: int = 0
    rejected: int = 0
    skipped: int = 0  # already finished, or claimed by another delivery
    flagged: tuple[int, ...] = ()  # image ids whose melanoma probability reached the threshold
    alerts: tuple[int, ...] = ()  # outbox ids of the alert messages written for them


def quarantine(path: Path, quarantine_dir: Path, reason: str) -> Path:
    """Move an unreadable file aside (atomic rename in the data folder) with its reason beside it."""
    quarantine_dir.mkdir(parents=True, exist_ok=True)
    target = quarantine_dir / path.name
    counter = 1
    while target.exists():
        target = quarantine_dir / f"{path.stem}-{counter}{path.suffix}"
        counter += 1
    if path.exists():
        os.rename(path, target)
    else:
        target = path  # nothing to move (already gone): keep the last known place
    (quarantine_dir / f"{target.name}.reason.txt").write_text(reason + "\n")
    return target


def screen_batch(image_ids: list[int], token: str) -> BatchOutcome:
    """Screen the given images; safe to call again with the same ids (nothing is screened twice)."""
    from model.imaging import DecodeError

    cfg = runtime.config()
    sessions = runtime.sessions()
    now = utcnow()
    with sessions.begin() as session:
        claimed = queries.claim_images(
            session, image_ids, token=token, now=now,
            stale_before=now - timedelta(seconds=cfg.sweep_limit), max_attempts=cfg.max_attempts)
        work = [(image.id, Path(image.location)) for image in claimed]
        sources = {image.id: image.source for image in claimed}
    skipped = len(set(image_ids)) - len(work)
    if not work:
        return BatchOutcome(skipped=skipped)

    try:
        classifier = runtime.classifier()
        started = time.perf_counter()
        answers = classifier.predict([path for _, path in work], batch_size=max(len(work), 1))
        per_image = (time.perf_counter() - started) / len(work)
    except Exception:
        with sessions.begin() as session:
            queries.release_claims(session, [image_id for image_id, _ in work], token=token)
        raise

    threshold = cfg.alert_threshold if cfg.alert_threshold is not None else classifier.threshold
    # Files move before the commit: if the commit is lost, the retry finds them in quarantine.
    moved: dict[int, Path] = {}
    for (image_id, path), answer in zip(work, answers, strict=True):
        if isinstance(answer, DecodeError):
            moved[image_id] = quarantine(path, cfg.quarantine_dir, answer.reason)
            logger.warning("image %d rejected: %s", image_id, answer.reason)

    screened = rejected = 0
    flagged: list[tuple[int, int, float]] = []  # (image id, prediction id, melanoma probability)
    alerts: list[int] = []
    finished = utcnow()
    with sessions.begin() as session:
        for (image_id, _path), answer in zip(work, answers, strict=True):
            if isinstance(answer, DecodeError):
                rejected += queries.finish_rejected(
                    session, image_id, token=token, now=finished, reason=answer.reason,
                    location=str(moved[image_id]))
                continue
            prediction = queries.finish_screened(
                session, image_id, token=token, now=finished, model_version=classifier.version,
                probabilities=dict(zip(classifier.classes, answer.probabilities, strict=True)),
                melanoma_probability=answer.melanoma_probability,
                predicted_class=answer.predicted_class, threshold=threshold, seconds=per_image)
            screened += prediction is not None
            if prediction is not None and prediction.flagged:
                flagged.append((image_id, prediction.id, prediction.melanoma_probability))
        if flagged and cfg.alert_recipients:
            # Same transaction as the predictions: a flag is never stored without its alert.
            alerts = write_alerts(session, flagged, sources, threshold=threshold,
                                  recipients=cfg.alert_recipients)
    if flagged and not cfg.alert_recipients:
        logger.warning("%d flagged image(s) recorded; no MELANOSCREEN_ALERT_RECIPIENTS to tell",
                       len(flagged))
    lost = len(work) - screened - rejected
    return BatchOutcome(screened=screened, rejected=rejected, skipped=skipped + lost,
                        flagged=tuple(image_id for image_id, _, _ in flagged),
                        alerts=tuple(alerts))


def write_alerts(session: Session, flagged: list[tuple[int, int, float]], sources: dict[int, str],
                 *, threshold: float, recipients: tuple[str, ...]) -> list[int]:
    """One alert outbox row per recipient for the flagged images of one batch; their ids."""
    key = new_alert_key()
    subject = alert_subject_for([(sources[i], p) for i, _, p in flagged], threshold)
    now = utcnow()
    ids = []
    for recipient in recipients:
        outbox_id = outbox.add_message(session, kind="alert", recipient=recipient,
                                       message_id=recipient_message_id(key, recipient),
                                       subject=subject, now=now)
        outbox.link_alert_images(session, outbox_id, [(i, pid) for i, pid, _ in flagged])
        ids.append(outbox_id)
    return ids


def sweep_stale(batch_size: int) -> list[list[int]]:
    """Ids of images left `queued`/`screening` too long, in batches, marked as re-enqueued now."""
    cfg = runtime.config()
    now = utcnow()
    with runtime.sessions().begin() as session:
        ids = queries.stale_image_ids(session, before=now - timedelta(seconds=cfg.sweep_limit))
        queries.mark_enqueued(session, ids, now)
    return [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]
