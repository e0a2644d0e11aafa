"""The model in use: per model version, how the reviewers judged its alerts (any logged-in user)."""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter, Request, Response

from db import reviews
from service.rates import MIN_REVIEWS, Rate
from web.charts import daily_chart_svg
from web.deps import CurrentUser, DbSession, now

router = APIRouter(tags=["performance"])
CHART_DAYS = 30


@router.get("/performance", summary="login: the model in use")
def performance_page(request: Request, session: DbSession, user: CurrentUser) -> Response:
    """Alerts, reviewed, PPV, benign share, misses seen, diagnosis agreement per version, each
    share with its 95% interval and none on fewer than `MIN_REVIEWS` reviews; flagged and
    reviewed per day."""
    days = reviews.daily_counts(session, now() - timedelta(days=CHART_DAYS))
    versions = [{"figures": v, "ppv": Rate(v.referred, v.reviewed), "benign": Rate(v.benign, v.reviewed),
                 "agreement": Rate(v.diagnosis_agrees, v.with_diagnosis)}
                for v in reviews.performance(session)]
    return request.app.state.templates.TemplateResponse(request, "performance.html", {
        "user": user, "versions": versions, "days": days, "minimum": MIN_REVIEWS,
        "chart": daily_chart_svg(days)})
