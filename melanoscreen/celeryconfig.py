"""The Celery contract: task names, the queue and the delivery settings, in one place.

The watcher, beat and the worker all load this module with `app.config_from_object(CONTRACT)`,
so they cannot disagree on the queue or the serializer; the watcher and beat send tasks by the
names below without importing worker code (and so never load TensorFlow). A leaf: it imports
nothing. The broker URL and the visibility timeout come from the settings at start
(`broker_options`).
"""

from __future__ import annotations

#: This module, for `config_from_object`.
CONTRACT = __name__

#: Shipped task names are an API: the worker registers exactly these.
SCREEN_BATCH = "worker.tasks.screen_batch"
SWEEP = "worker.tasks.sweep"
DELIVER_MESSAGE = "worker.tasks.deliver_message"
QUEUE_DIGESTS = "worker.tasks.queue_digests"
ESCALATE = "worker.tasks.escalate"
#: The one queue every task goes to (Celery's default name).
QUEUE = "celery"
#: How often beat asks whether a digest is owed (seconds); the job decides what is owed.
DIGEST_CHECK_INTERVAL = 60.0

# ---- Celery settings (lowercase names are Celery's own) ---------------------------------------
broker_connection_retry_on_startup = True
broker_connection_max_retries = None
task_default_queue = QUEUE
task_ignore_result = True
task_serializer = "json"
accept_content = ["json"]
task_send_sent_event = True
timezone = "UTC"
# Tasks are idempotent (claims in the database), so a task is acknowledged only when done and
# handed to another worker when its process dies.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
worker_send_task_events = True
# TensorFlow loads on the first task in each pool process, not at fork time.
worker_proc_alive_timeout = 60
worker_hijack_root_logger = False
worker_redirect_stdouts = False


def broker_options(broker_url: str, visibility_timeout: int) -> dict[str, object]:
    """The run-time part of the contract: where the broker is, and how long a task may run
    unacknowledged (seconds, longer than the longest task) before Redis hands it out again."""
    return {"broker_url": broker_url,
            "broker_transport_options": {"visibility_timeout": visibility_timeout}}
