"""Reminders about flagged images nobody has reviewed: one per image, exactly once.

The worker's `escalate` task (beat sends it every minute, like the digest check) calls
`queue_due_escalations`. The image's `escalated_at` is set by an UPDATE that tests it is still
NULL, in the transaction that writes the reminder's outbox rows, so two beats, a restart or a
redelivered task never send a second reminder; a review before the time sends none.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker

from db import images
from melanoscreen.settings import Settings
from service.alerts import AlertTarget, write_alerts

logger = logging.getLogger(__name__)

#: The label of a reminder alert (its subject starts with "[reminder]").
REMINDER = "reminder"


def queue_due_escalations(sessions: sessionmaker[Session], settings: Settings, now: datetime,
                          enqueue: Callable[[int], None]) -> list[int]:
    """Write a reminder for each flagged image unreviewed MELANOSCREEN_ESCALATE_AFTER hours
    after screening, to its alert recipients plus MELANOSCREEN_ESCALATE_TO; hand each outbox row
    to `enqueue` after the commit. The ids of the images reminded about."""
    if settings.escalate_after <= 0:
        return []
    before = now - timedelta(hours=settings.escalate_after)
    reminded: list[int] = []
    outbox_ids: list[int] = []
    with sessions.begin() as session:
        for image, prediction in images.due_for_escalation(session, screened_before=before):
            if not images.take_escalation(session, image.id, now):
                continue  # another run has it
            recipients = settings.alert.recipients_for(image.source) + settings.escalate_to
            if not recipients:
                continue  # nobody to remind; taken all the same, so it is not tried every minute
            outbox_ids += write_alerts(
                session, [AlertTarget(image.id, prediction.id, prediction.melanoma_probability,
                                      unusual=prediction.out_of_scope)],
                {image.id: image.source}, recipients=recipients, threshold=prediction.threshold,
                label=REMINDER)
            reminded.append(image.id)
    for outbox_id in outbox_ids:
        enqueue(outbox_id)
    if reminded:
        logger.info("reminders written for %d flagged image(s) still unreviewed after %g h",
                    len(reminded), settings.escalate_after)
    return reminded
