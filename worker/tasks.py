"""Celery tasks: thin bodies that take this process's state and call plain functions.

Their names (`melanoscreen.celeryconfig`) are an API: the watcher and beat send them by name.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task
from sqlalchemy.exc import OperationalError

from db.schema import utcnow
from melanoscreen.celeryconfig import DELIVER_MESSAGE, ESCALATE, QUEUE_DIGESTS, SCREEN_BATCH, SWEEP
from service import delivery, digests, escalation, screening
from worker import runtime
from worker.celery_app import app

logger = logging.getLogger(__name__)


@app.task(name=SCREEN_BATCH, bind=True, autoretry_for=(OperationalError,), retry_backoff=True,
          retry_jitter=True, max_retries=5)
def screen_batch(self: Task, image_ids: list[int]) -> dict[str, Any]:
    """Screen a batch of images by id; a redelivery skips what is already finished."""
    here = runtime.process()
    outcome = screening.screen_batch(here.sessions, here.classifier, [int(i) for i in image_ids],
                                     token=str(self.request.id), settings=here.settings)
    logger.info("batch of %d: %d screened (%d flagged), %d rejected, %d skipped", len(image_ids),
                outcome.screened, len(outcome.flagged), outcome.rejected, outcome.skipped)
    # Committed by now: each alert row exists, so its delivery can be enqueued by id.
    for outbox_id in outcome.alerts:
        deliver_message.apply_async(args=[outbox_id])
    return {"screened": outcome.screened, "rejected": outcome.rejected,
            "skipped": outcome.skipped, "flagged": list(outcome.flagged)}


@app.task(name=SWEEP, send_events=False, autoretry_for=(OperationalError,), retry_backoff=True, max_retries=3)
def sweep() -> int:
    """Re-enqueue work the queue lost: images left `queued` or `screening`, and outbox messages
    left `pending` or `sending`, past the sweep limit."""
    here = runtime.process()
    limit = here.settings.sweep.limit
    batches = screening.sweep_stale(here.sessions, stale_after=limit,
                                    batch_size=here.settings.batch.size,
                                    lease=here.settings.sweep.lease)
    for batch in batches:
        screen_batch.apply_async(args=[batch])
    count = sum(len(b) for b in batches)
    if count:
        logger.warning("sweep re-enqueued %d images", count)
    messages = delivery.stale_outbox(here.sessions, limit)
    for outbox_id in messages:
        deliver_message.apply_async(args=[outbox_id])
    if messages:
        logger.warning("sweep re-enqueued %d outbox messages", len(messages))
    if not count and not messages:
        logger.debug("sweep: nothing lost")
    return count


@app.task(name=DELIVER_MESSAGE, bind=True, autoretry_for=(OperationalError,), retry_backoff=True,
          retry_jitter=True, max_retries=5)
def deliver_message(self: Task, outbox_id: int) -> str:
    """Deliver one outbox message (alert or digest); a row already `sent` sends nothing."""
    here = runtime.process()
    outcome = delivery.deliver_outbox(here.sessions, int(outbox_id), token=str(self.request.id),
                                      settings=here.settings, overlay=here.gradcam_overlay)
    if outcome.status == "retry":
        # The row is `pending` again with its next attempt time; the retry claims it afresh.
        raise self.retry(countdown=outcome.retry_in, max_retries=None)
    return outcome.status


@app.task(name=QUEUE_DIGESTS, send_events=False, autoretry_for=(OperationalError,), retry_backoff=True,
          retry_jitter=True, max_retries=3)
def queue_digests() -> list[str]:
    """Write the digests owed now (one row per date, taken first) and enqueue their delivery."""
    here = runtime.process()
    days = digests.queue_due_digests(here.sessions, here.settings, utcnow(),
                                     lambda outbox_id: deliver_message.apply_async(args=[outbox_id]))
    logger.debug("digest check: %s", ", ".join(d.isoformat() for d in days) or "nothing due")
    return [day.isoformat() for day in days]


@app.task(name=ESCALATE, send_events=False, autoretry_for=(OperationalError,), retry_backoff=True,
          retry_jitter=True, max_retries=3)
def escalate() -> int:
    """Write the reminders owed now (one per unreviewed flagged image, ever) and enqueue them."""
    here = runtime.process()
    images = escalation.queue_due_escalations(
        here.sessions, here.settings, utcnow(),
        lambda outbox_id: deliver_message.apply_async(args=[outbox_id]))
    return len(images)
