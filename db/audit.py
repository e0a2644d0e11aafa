"""The audit log: who did what, when."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.schema import AuditEvent, Image, User


def audit(session: Session, *, user: User | None, username: str, action: str, now: datetime,
          image_id: int | None = None, detail: str | None = None) -> None:
    """Write who did what, when."""
    session.add(AuditEvent(at=now, user_id=user.id if user else None, username=username,
                           action=action, image_id=image_id, detail=detail))
    session.flush()


@dataclass(frozen=True)
class AuditRow:
    """One audit entry, with the image's sha256 and name when it is about one."""

    at: datetime
    username: str
    action: str
    detail: str | None
    sha256: str | None
    source: str | None


def audit_page(session: Session, *, limit: int, offset: int,
               sha256: str | None = None) -> list[AuditRow]:
    """Audit entries, newest first (of one image when `sha256` is given)."""
    query = (select(AuditEvent, Image.sha256, Image.source)
             .outerjoin(Image, Image.id == AuditEvent.image_id)
             .order_by(AuditEvent.at.desc(), AuditEvent.id.desc()).limit(limit).offset(offset))
    if sha256 is not None:
        query = query.where(Image.sha256 == sha256)
    return [AuditRow(event.at, event.username, event.action, event.detail, sha, source)
            for event, sha, source in session.execute(query)]
