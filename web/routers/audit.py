"""The audit log: who opened which case and who reviewed what, when (any logged-in user)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from db import audit
from web.deps import CurrentUser, DbSession

router = APIRouter(tags=["audit"])
PAGE_SIZE = 100


@router.get("/audit", summary="login: the audit log")
def audit_page(request: Request, session: DbSession, user: CurrentUser, page: int = 1) -> Response:
    """The audit log, newest first, paged."""
    page = max(1, page)
    rows = audit.audit_page(session, limit=PAGE_SIZE + 1, offset=(page - 1) * PAGE_SIZE)
    return request.app.state.templates.TemplateResponse(request, "audit.html", {
        "user": user, "rows": rows[:PAGE_SIZE], "page": page, "more": len(rows) > PAGE_SIZE})
