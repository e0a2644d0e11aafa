"""Celery tasks; thin bodies around `worker.screening`. Their names are an API."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task
from sqlalchemy.exc import OperationalError

from worker import delivery, runtime, screening
from worker.celery_app import app

logger = logging.getLogger(__name__)

SCREEN_BATCH = "worker.tasks.screen_batch"
SWEEP = "worker.tasks.sweep"
DELIVER_MESSAGE = "worker.tasks.deliver_message"


@app.task(name=SCREEN_BATCH, bind=True, autoretry_for=(OperationalError,), retry_backoff=True,
          retry_jitter=True, max_retries=5)
def screen_batch(self: Task, image_ids: list[int]) -> dict[str, Any]:
    """Screen a batch of images by id; a redelivery skips what is already finished."""
    outcome = screening.screen_batch([int(i) for i in image_ids], token=str(self.request.id))
    logger.info("batch of %d: %d screened, %d rejected, %d skipped", len(image_ids),
                outcome.screened, outcome.rejected, outcome.skipped)
    # Committed by now: each alert row exists, so its delivery can be enqueued by id.
    for outbox_id in outcome.alerts:
        deliver_message.apply_async(args=[outbox_id])
    return {"screened": outcome.screened, "rejected": outcome.rejected,
            "skipped": outcome.skipped, "flagged": list(outcome.flagged)}


@app.task(name=SWEEP, autoretry_for=(OperationalError,), retry_backoff=True, max_retries=3)
def sweep() -> int:
    """Re-enqueue images the queue lost (left `queued` or `screening` past the limit)."""
    batches = screening.sweep_stale(runtime.config().batch_size)
    for batch in batches:
        screen_batch.apply_async(args=[batch])
    count = sum(len(b) for b in batches)
    if count:
        logger.warning("sweep re-enqueued %d images", count)
    messages = delivery.stale_outbox(runtime.sessions(), runtime.config().sweep_limit)
    for outbox_id in messages:
        deliver_message.apply_async(args=[outbox_id])
    if messages:
        logger.warning("sweep re-enqueued %d outbox messages", len(messages))
    return count


@app.task(name=DELIVER_MESSAGE, bind=True, autoretry_for=(OperationalError,), retry_backoff=True,
          retry_jitter=True, max_retries=5)
def deliver_message(self: Task, outbox_id: int) -> str:
    """Deliver one outbox message (alert or digest); a row already `sent` sends nothing."""
    cfg = runtime.config()
    outcome = delivery.deliver_outbox(
        runtime.sessions(), int(outbox_id), token=str(self.request.id),
        options=cfg.delivery_options(), overlay=runtime.gradcam_overlay)
    if outcome.status == "retry":
        # The row is `pending` again with its next attempt time; the retry claims it afresh.
        raise self.retry(countdown=outcome.retry_in, max_retries=None)
    return outcome.status
