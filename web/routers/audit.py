"""The audit log: who opened which case and who reviewed what, when (any logged-in user)."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from db import audit
from web.deps import MAX_PAGE, CurrentUser, DbSession, clinics_of

router = APIRouter(tags=["audit"])
PAGE_SIZE = 100


def _shown(row: audit.AuditRow) -> audit.AuditRow:
    """The entry as reviewers see it: never a name typed at a failed login that is no account's
    (entries written before such names stopped being stored still hold them)."""
    if row.action == "login_failed" and row.detail == "unknown name":
        return replace(row, username=audit.UNKNOWN_NAME)
    return row


@router.get("/audit", summary="login: the audit log")
def audit_page(request: Request, session: DbSession, user: CurrentUser,
               page: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 1) -> Response:
    """The audit log, newest first, paged; with clinic access enforced, a reviewer given clinics
    sees the entries about their clinics' images and those about no image."""
    rows = [_shown(row) for row in
            audit.audit_page(session, limit=PAGE_SIZE + 1, offset=(page - 1) * PAGE_SIZE,
                             prefixes=clinics_of(request, user))]
    return request.app.state.templates.TemplateResponse(request, "audit.html", {
        "user": user, "rows": rows[:PAGE_SIZE], "page": page, "more": len(rows) > PAGE_SIZE})
