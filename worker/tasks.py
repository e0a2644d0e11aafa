"""Celery tasks; thin bodies around `worker.screening`. Their names are an API."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task
from sqlalchemy.exc import OperationalError

from worker import runtime, screening
from worker.celery_app import app

logger = logging.getLogger(__name__)

SCREEN_BATCH = "worker.tasks.screen_batch"
SWEEP = "worker.tasks.sweep"


@app.task(name=SCREEN_BATCH, bind=True, autoretry_for=(OperationalError,), retry_backoff=True,
          retry_jitter=True, max_retries=5)
def screen_batch(self: Task, image_ids: list[int]) -> dict[str, Any]:
    """Screen a batch of images by id; a redelivery skips what is already finished."""
    outcome = screening.screen_batch([int(i) for i in image_ids], token=str(self.request.id))
    logger.info("batch of %d: %d screened, %d rejected, %d skipped", len(image_ids),
                outcome.screened, outcome.rejected, outcome.skipped)
    # Committed by now: the alert engineer's delivery task can be enqueued from here by id.
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
    return count
