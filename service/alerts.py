"""Writing alerts: one outbox row per recipient for flagged images, routed by clinic.

Called inside the transaction that stores the predictions (screening) or takes the reminder
(escalation), so a flag is never stored without its alert. An alert is about one kind of flag:
images whose melanoma is suspected, or unusual pictures (out of scope) that need a look, so
that an unusual picture's alert never reads "melanoma suspected".
"""

from __future__ import annotations

from typing import NamedTuple

from sqlalchemy.orm import Session

from db import outbox
from db.schema import OutboxKind, utcnow
from melanoscreen.settings import Settings
from service.alert_message import alert_subject, new_alert_key
from service.messages import recipient_message_id


class AlertTarget(NamedTuple):
    """One flagged image an alert is about."""

    image_id: int
    prediction_id: int
    melanoma_probability: float
    unusual: bool = False  # out of scope: its score may be unreliable


def write_routed_alerts(session: Session, flagged: list[AlertTarget], sources: dict[int, str], *,
                        settings: Settings, threshold: float | None = None,
                        label: str | None = None) -> tuple[list[int], int]:
    """One alert per route among the flagged images (MELANOSCREEN_ALERT_ROUTES, longest prefix
    wins; no route: the global recipients), each to its recipients; (outbox ids, images untold)."""
    groups: dict[str | None, list[AlertTarget]] = {}
    for item in flagged:
        groups.setdefault(settings.alert.route_for(sources[item.image_id]), []).append(item)
    ids: list[int] = []
    untold = 0
    for route, items in groups.items():
        recipients = settings.alert.routes[route] if route is not None else settings.alert.recipients
        if not recipients:
            untold += len(items)
            continue
        ids += write_alerts(session, items, sources, recipients=recipients, threshold=threshold,
                            label=label)
    return ids, untold


def write_alerts(session: Session, flagged: list[AlertTarget], sources: dict[int, str], *,
                 recipients: list[str], threshold: float | None = None,
                 label: str | None = None) -> list[int]:
    """Alert outbox rows, one per recipient and kind of flag (suspected melanomas, unusual
    pictures), for the flagged images of one batch; their ids. A `label` ('re-screen',
    'reminder') marks an alert sent beside the first."""
    ids: list[int] = []
    for unusual in (False, True):
        items = [item for item in flagged if item.unusual == unusual]
        if items:
            ids += _write_alert(session, items, sources, recipients=recipients,
                                threshold=threshold, label=label, unusual=unusual)
    return ids


def _write_alert(session: Session, flagged: list[AlertTarget], sources: dict[int, str], *,
                 recipients: list[str], threshold: float | None, label: str | None,
                 unusual: bool) -> list[int]:
    key = new_alert_key()
    subject = alert_subject([(sources[item.image_id], item.melanoma_probability) for item in flagged],
                            threshold, label, unusual=unusual)
    now = utcnow()
    ids = []
    for recipient in dict.fromkeys(recipients):
        outbox_id = outbox.add_message(session, kind=OutboxKind.ALERT, recipient=recipient,
                                       message_id=recipient_message_id(key, recipient),
                                       subject=subject, now=now, label=label)
        outbox.link_alert_images(session, outbox_id,
                                 [(item.image_id, item.prediction_id) for item in flagged])
        ids.append(outbox_id)
    return ids
