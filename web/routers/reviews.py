"""Reviews: the case page's form (any logged-in user; CSRF-checked; append-only; audited)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, HTTPException, Request, Response
from fastapi.responses import RedirectResponse
from pydantic import ValidationError

from db import audit, predictions, reviews
from db.schema import Image, User
from web.deps import CheckedForm, CurrentUser, DbSession, now
from web.routers.images import image_or_404
from web.schemas import ReviewIn

router = APIRouter(tags=["reviews"])


class BadReview(ValueError):
    """A review that cannot be stored (an unknown verdict or diagnosis)."""


def store_review(session: DbSession, image: Image, user: User, review: ReviewIn) -> reviews.ReviewRow:
    """Append the review and its audit entry; commit, so the next page sees it."""
    latest = predictions.latest_prediction(session, image.id)
    if review.diagnosis is not None and (latest is None or review.diagnosis not in latest.probabilities):
        known = ", ".join(sorted(latest.probabilities)) if latest else "none (not screened)"
        raise BadReview(f"diagnosis: must be one of the model's classes ({known}) or null")
    stored = reviews.add_review(session, image, user, verdict=review.verdict,
                                diagnosis=review.diagnosis, note=review.note, now=now())
    audit.audit(session, user=user, username=user.name, action="review", now=stored.created_at,
                  image_id=image.id, detail=f"verdict {stored.verdict.value}"
                  + (f", diagnosis {stored.diagnosis}" if stored.diagnosis else ""))
    session.commit()
    return stored


@router.post("/images/{sha256}/reviews", summary="login: save a review (form)", dependencies=[CheckedForm])
def review_form(request: Request, session: DbSession, user: CurrentUser, sha256: str,
                verdict: Annotated[str, Form()], diagnosis: Annotated[str, Form()] = "",
                note: Annotated[str, Form()] = "") -> Response:
    """Store the form's review and go back to the case page."""
    image = image_or_404(session, sha256)
    try:
        review = ReviewIn(verdict=verdict, diagnosis=diagnosis or None, note=note)  # type: ignore[arg-type]
        store_review(session, image, user, review)
    except (ValidationError, BadReview) as exc:
        raise HTTPException(422, f"review not stored: {exc}") from None
    return RedirectResponse(f"/images/{image.sha256}#reviews", status_code=303)
