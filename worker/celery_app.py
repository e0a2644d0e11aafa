"""The worker's Celery app: late acks, prefetch 1, events on; tasks live in `worker.tasks`.

`scheduler.tasks` (the digest job) is listed by name: the worker process registers it when it
starts, without this package importing scheduler code.
"""

from __future__ import annotations

from celery import Celery

app = Celery("melanoscreen", include=["worker.tasks", "scheduler.tasks"])


def configure_app(broker_url: str, visibility_timeout: int) -> Celery:
    """Point the app at the broker with the delivery guarantees the pipeline relies on."""
    # The queue and transport options match `scheduler.queue.celery_config` (a test checks):
    # the watcher and beat enqueue by name without importing this package.
    app.conf.update(
        broker_url=broker_url,
        broker_transport_options={"visibility_timeout": visibility_timeout},
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        task_default_queue="celery",
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_send_sent_event=True,
        timezone="UTC",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_send_task_events=True,
        # TensorFlow loads on the first task in each pool process, not at fork time.
        worker_proc_alive_timeout=60,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
    )
    return app
