"""Enqueue screening work by task name, with a minimal Celery app: no worker code, no TensorFlow."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any

from celery import Celery

#: Shipped task names are an API: the worker registers exactly these.
SCREEN_BATCH = "worker.tasks.screen_batch"
SWEEP = "worker.tasks.sweep"
DELIVER_MESSAGE = "worker.tasks.deliver_message"
QUEUE_DIGESTS = "scheduler.tasks.queue_digests"
#: How often beat asks whether a digest is owed (seconds); the due-date logic decides.
DIGEST_CHECK_INTERVAL = 60.0
#: The one queue every screening task goes to (Celery's default name).
QUEUE = "celery"

_SEND_RETRY = {"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 2.0}


def celery_config(broker_url: str, visibility_timeout: int) -> dict[str, Any]:
    """Settings shared by the watcher, beat and worker apps, so they agree on the queue."""
    return {
        "broker_url": broker_url,
        "broker_transport_options": {"visibility_timeout": visibility_timeout},
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "task_default_queue": QUEUE,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_send_sent_event": True,
        "timezone": "UTC",
    }


def make_producer(broker_url: str, visibility_timeout: int = 3600) -> Celery:
    """A Celery app that only sends messages (for the watcher and beat)."""
    app = Celery("melanoscreen", set_as_current=False)
    app.conf.update(celery_config(broker_url, visibility_timeout))
    return app


def chunks(ids: Sequence[int], size: int) -> Iterator[list[int]]:
    """Consecutive lists of at most `size` ids."""
    for start in range(0, len(ids), size):
        yield list(ids[start : start + size])


def send_screen_batch(app: Celery, image_ids: Sequence[int]) -> None:
    """Ask a worker to screen these images (ids only; the worker re-reads the database)."""
    app.send_task(SCREEN_BATCH, args=[list(image_ids)], retry=True, retry_policy=_SEND_RETRY)


def send_queue_digests(app: Celery) -> None:
    """Ask a worker to send the digests owed now, if any (beat does this at start, too)."""
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
    }
