"""Enqueue work by task name, with a minimal Celery app: no worker code, no TensorFlow."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any

from celery import Celery

from melanoscreen.celeryconfig import (
    CONTRACT,
    DELIVER_MESSAGE,
    DIGEST_CHECK_INTERVAL,
    ESCALATE,
    QUEUE_DIGESTS,
    SCREEN_BATCH,
    SWEEP,
    broker_options,
)

_SEND_RETRY = {"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 2.0}


def make_producer(broker_url: str, visibility_timeout: int = 3600) -> Celery:
    """A Celery app that only sends messages (for the watcher, beat and the CLI)."""
    app = Celery("melanoscreen", set_as_current=False)
    app.config_from_object(CONTRACT)
    app.conf.update(broker_options(broker_url, visibility_timeout))
    return app


def chunks(ids: Sequence[int], size: int) -> Iterator[list[int]]:
    """Consecutive lists of at most `size` ids."""
    for start in range(0, len(ids), size):
        yield list(ids[start : start + size])


def send_screen_batch(app: Celery, image_ids: Sequence[int]) -> None:
    """Ask a worker to screen these images (ids only; the worker re-reads the database)."""
    app.send_task(SCREEN_BATCH, args=[list(image_ids)], retry=True, retry_policy=_SEND_RETRY)


def send_queue_digests(app: Celery) -> None:
    """Ask a worker to write the digests owed now, if any (beat does this at start, too)."""
    app.send_task(QUEUE_DIGESTS, retry=True, retry_policy=_SEND_RETRY)


def send_deliver_message(app: Celery, outbox_id: int) -> None:
    """Ask a worker to deliver one outbox message."""
    app.send_task(DELIVER_MESSAGE, args=[outbox_id], retry=True, retry_policy=_SEND_RETRY)


def beat_schedule(sweep_interval: float,
                  digest_interval: float = DIGEST_CHECK_INTERVAL) -> dict[str, dict[str, Any]]:
    """The periodic tasks that `melanoscreen beat` sends: one entry per task."""
    return {
        "sweep": {"task": SWEEP, "schedule": timedelta(seconds=sweep_interval)},
        # Every minute, not once a day: the job sends only what is owed (a unique row per date),
        # so a beat restart, two beats or a DST change neither skip nor double a digest.
        "digest": {"task": QUEUE_DIGESTS, "schedule": timedelta(seconds=digest_interval)},
        # Reminders about unreviewed flagged images: each image's is taken once, by an UPDATE.
        "escalate": {"task": ESCALATE, "schedule": timedelta(seconds=digest_interval)},
    }
