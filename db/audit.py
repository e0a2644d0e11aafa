"""The audit log: who did what, when."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from db._sql import escape_like
from db.schema import AuditEvent, Image, User

#: Refused logins are counted, not written one by one: one row per name (all names that are no
#: account share one) and kind, per this window, so that guesses cannot grow the log without end.
REFUSAL_WINDOW = timedelta(minutes=10)
#: The name written for a refused login under a name that is no account: what was typed there
#: may be a password typed into the wrong field, so it is never stored.
UNKNOWN_NAME = "(unknown name)"


def audit(session: Session, *, user: User | None, username: str, action: str, now: datetime,
          image_id: int | None = None, detail: str | None = None) -> None:
    """Write who did what, when."""
    session.add(AuditEvent(at=now, user_id=user.id if user else None, username=username,
                           action=action, image_id=image_id, detail=detail))
    session.flush()


def count_refusal(session: Session, *, user: User | None, action: str, now: datetime,
                  locked: bool = False) -> None:
    """Count one refused login (`user` None: a name that is no account) in the row of its name
    and kind opened within the last REFUSAL_WINDOW ("3 attempts"; "; locked" once one of them
    locked the name), or open one. The count is raised by compare-and-set, so concurrent
    refusals are each counted."""
    username = user.name if user is not None else UNKNOWN_NAME
    owner = AuditEvent.user_id.is_(None) if user is None else AuditEvent.user_id == user.id
    for _ in range(10):
        found = session.execute(
            select(AuditEvent.id, AuditEvent.detail)
            .where(AuditEvent.at >= now - REFUSAL_WINDOW, AuditEvent.action == action,
                   AuditEvent.username == username, owner)
            .order_by(AuditEvent.at.desc(), AuditEvent.id.desc()).limit(1)).first()
        if found is None:
            audit(session, user=user, username=username, action=action, now=now,
                  detail=_attempts(1, locked))
            return
        detail = found.detail or ""
        counted = detail.split(" ", 1)[0]
        count = int(counted) if counted.isdigit() else 1
        raised = session.execute(
            update(AuditEvent).where(AuditEvent.id == found.id, AuditEvent.detail == found.detail)
            .values(detail=_attempts(count + 1, locked or detail.endswith("; locked"))))
        if raised.rowcount:  # type: ignore[attr-defined]
            return
    audit(session, user=user, username=username, action=action, now=now,
          detail=_attempts(1, locked))


def _attempts(count: int, locked: bool) -> str:
    return f"{count} attempt{'s' if count != 1 else ''}{'; locked' if locked else ''}"


@dataclass(frozen=True)
class AuditRow:
    """One audit entry, with the image's sha256 and name when it is about one."""

    at: datetime
    username: str
    action: str
    detail: str | None
    sha256: str | None
    source: str | None


def audit_page(session: Session, *, limit: int, offset: int, sha256: str | None = None,
               prefixes: tuple[str, ...] | None = None) -> list[AuditRow]:
    """Audit entries, newest first (of one image when `sha256` is given). With `prefixes`, only
    entries about no image or about an image whose name starts with one of them."""
    query = (select(AuditEvent, Image.sha256, Image.source)
             .outerjoin(Image, Image.id == AuditEvent.image_id)
             .order_by(AuditEvent.at.desc(), AuditEvent.id.desc()).limit(limit).offset(offset))
    if sha256 is not None:
        query = query.where(Image.sha256 == sha256)
    if prefixes is not None:
        query = query.where(or_(AuditEvent.image_id.is_(None),
                                *(Image.source.like(escape_like(p) + "%", escape="\\")
                                  for p in prefixes)))
    return [AuditRow(event.at, event.username, event.action, event.detail, sha, source)
            for event, sha, source in session.execute(query)]
