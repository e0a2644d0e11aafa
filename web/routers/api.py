"""The JSON API under /api (any logged-in user: the session cookie, or HTTP Basic for scripts)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse

from db import audit, cases, readmodel, worklist
from service.reviews import BadReview, store_review
from web import security
from web.deps import (
    MAX_OFFSET,
    CurrentUser,
    DbSession,
    clinics_of,
    image_or_404,
    may_see,
    now,
    web_session,
)
from web.schemas import ReviewIn

router = APIRouter(prefix="/api", tags=["api"])


def _items(session: DbSession, images: list[Any]) -> list[dict[str, Any]]:
    return [row.to_json() for row in readmodel.image_rows(session, images)]


@router.get("/images", summary="login: images, paged (results fields plus review)")
def list_images(request: Request, session: DbSession, user: CurrentUser, flagged: bool | None = None,
                reviewed: bool | None = None, limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0) -> dict[str, Any]:
    """Images in the worklist's order: `items` (the `results --format json` fields plus
    `review`), and `total`, `limit`, `offset`."""
    where = worklist.WorklistFilter(flagged=flagged, reviewed=reviewed,
                                    prefixes=clinics_of(request, user) or ())
    images = worklist.worklist(session, where, limit=limit, offset=offset)
    return {"items": _items(session, images), "total": worklist.worklist_count(session, where),
            "limit": limit, "offset": offset}


@router.get("/images/{sha256}", summary="login: one image with every prediction and review (audited)")
def get_image(request: Request, session: DbSession, user: CurrentUser, sha256: str) -> dict[str, Any]:
    """One image: the results fields, `review`, `names`, `predictions` and `reviews`."""
    case = cases.find_case(session, sha256)
    if case is None or not may_see(request, user, case.image):
        raise HTTPException(404, "no such image")
    audit.audit(session, user=user, username=user.name, action="view_image", now=now(),
                  image_id=case.image.id, detail="api")
    item = _items(session, [case.image])[0]
    item["names"] = [case.image.source, *(d.source for d in case.duplicates)]
    item["predictions"] = [{
        "model_version": p.model_version, "probabilities": p.probabilities,
        "melanoma_probability": p.melanoma_probability, "predicted_class": p.predicted_class,
        "threshold": p.threshold, "flagged": p.flagged, "out_of_scope": p.out_of_scope,
        "created_at": p.created_at.isoformat()} for p in case.predictions]
    item["reviews"] = [r.to_json() for r in case.reviews]
    item["alerts"] = [{"recipient": a.recipient, "status": a.status, "attempts": a.attempts,
                       "created_at": a.created_at.isoformat(),
                       "sent_at": a.sent_at.isoformat() if a.sent_at else None} for a in case.alerts]
    return item


@router.post("/images/{sha256}/reviews", status_code=201,
             summary="login: store a review (201 with it; 422 on bad input)")
def post_review(request: Request, session: DbSession, user: CurrentUser, sha256: str,
                review: ReviewIn) -> JSONResponse:
    """Append a review; a browser session (not HTTP Basic) must send its CSRF token in X-CSRF-Token."""
    live = web_session(request, session)
    if not getattr(request.state, "basic_auth", False) and not security.csrf_matches(
            live.csrf if live else None, request.headers.get("x-csrf-token")):
        return JSONResponse({"detail": "X-CSRF-Token header missing or stale"}, status_code=403)
    image = image_or_404(session, sha256, request, user)
    try:
        stored = store_review(session, image, user, verdict=review.verdict,
                              diagnosis=review.diagnosis, note=review.note, now=now())
    except BadReview as exc:
        return JSONResponse({"detail": str(exc)}, status_code=422)
    session.commit()
    return JSONResponse(stored.to_json(), status_code=201)
