"""The health check: open to anyone, and it tells nothing but whether the app can serve."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from web.deps import DbSession

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="public: whether the app and its database answer")
def healthz(session: DbSession) -> JSONResponse:
    """200 `{"status": "ok"}` when the database answers a query, else 503 (no detail: it is open)."""
    try:
        session.execute(text("SELECT 1"))
    except SQLAlchemyError:
        return JSONResponse({"status": "database unavailable"}, status_code=503)
    return JSONResponse({"status": "ok"})
