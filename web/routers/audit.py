"""The audit log: who opened which case and who reviewed what, when (any logged-in user)."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from db import audit
from web.deps import MAX_PAGE, CurrentUser, DbSession

router = APIRouter(tags=["audit"])
PAGE_SIZE = 100
#: What the log shows for a name that is no account: what was typed there may be a password
#: typed into the wrong field (the database keeps it, for an admin with the database).
UNKNOWN_NAME = "(unknown name)"


def _shown(row: audit.AuditRow) -> audit.AuditRow:
    """The entry as reviewers see it: a failed login's typed name only if it is an account's."""
    if row.action == "login_failed" and row.detail == "unknown name":
        return replace(row, username=UNKNOWN_NAME)
    return row


@router.get("/audit", summary="login: the audit log")
def audit_page(request: Request, session: DbSession, user: CurrentUser,
               page: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 1) -> Response:
    """The audit log, newest first, paged."""
    rows = [_shown(row) for row in
            audit.audit_page(session, limit=PAGE_SIZE + 1, offset=(page - 1) * PAGE_SIZE)]
    return request.app.state.templates.TemplateResponse(request, "audit.html", {
        "user": user, "rows": rows[:PAGE_SIZE], "page": page, "more": len(rows) > PAGE_SIZE})
