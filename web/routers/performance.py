"""The model in use: per model version, how the reviewers judged its alerts (any logged-in user)."""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter, Request, Response

from db import reviews
from web.charts import daily_chart_svg
from web.deps import CurrentUser, DbSession, now

router = APIRouter(tags=["performance"])
CHART_DAYS = 30


@router.get("/performance", summary="login: the model in use")
def performance_page(request: Request, session: DbSession, user: CurrentUser) -> Response:
    """Alerts, reviewed, PPV, misses seen, diagnosis agreement per version; flagged/reviewed per day."""
    days = reviews.daily_counts(session, now() - timedelta(days=CHART_DAYS))
    return request.app.state.templates.TemplateResponse(request, "performance.html", {
        "user": user, "versions": reviews.performance(session), "days": days,
        "chart": daily_chart_svg(days)})
