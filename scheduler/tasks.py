"""The digest job as a Celery task, run by the worker (whose app lists this module by name).

Beat sends `scheduler.tasks.queue_digests` every minute and once at its start; the job decides
what is owed. Delivery is enqueued by task name, so this module imports no worker code.
"""

from __future__ import annotations

import logging
import os

from celery import current_app, shared_task
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from db.schema import utcnow
from db.session import make_session_factory
from scheduler.digest_job import DigestJobConfig, queue_due_digests
from scheduler.queue import QUEUE_DIGESTS, send_deliver_message

logger = logging.getLogger(__name__)

_config: DigestJobConfig | None = None
_sessions: tuple[int, sessionmaker[Session]] | None = None


def configure(config: DigestJobConfig) -> None:
    """Record the job's configuration (the worker command calls this before the pool forks)."""
    global _config
    _config = config


def _session_factory(url: str) -> sessionmaker[Session]:
    global _sessions
    if _sessions is None or _sessions[0] != os.getpid():
        # A fresh fork: never reuse the parent's connections.
        _sessions = (os.getpid(), make_session_factory(url))
    return _sessions[1]


@shared_task(name=QUEUE_DIGESTS, autoretry_for=(OperationalError,), retry_backoff=True,
             retry_jitter=True, max_retries=3)
def queue_digests() -> list[str]:
    """Write the digests owed now (one row per date, taken first) and enqueue their delivery."""
    if _config is None:
        logger.warning("digest job not configured in this process: start it with "
                       "`melanoscreen worker`")
        return []
    if not _config.recipients:
        return []
    app = current_app._get_current_object()
    days = queue_due_digests(_session_factory(_config.database_url), _config, utcnow(),
                             lambda outbox_id: send_deliver_message(app, outbox_id))
    return [day.isoformat() for day in days]
