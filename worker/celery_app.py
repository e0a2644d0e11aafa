"""The worker's Celery app: the contract of `melanoscreen.celeryconfig`; tasks live in `worker.tasks`."""

from __future__ import annotations

from celery import Celery

from melanoscreen.celeryconfig import CONTRACT

app = Celery("melanoscreen", include=["worker.tasks"])
app.config_from_object(CONTRACT)
