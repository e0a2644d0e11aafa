"""Reviews: the case page's form (any logged-in user; CSRF-checked; append-only; audited)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, HTTPException, Request, Response
from fastapi.responses import RedirectResponse
from pydantic import ValidationError

from service.reviews import BadReview, store_review
from web.deps import CheckedForm, CurrentUser, DbSession, base_path, image_or_404, now
from web.schemas import ReviewIn

router = APIRouter(tags=["reviews"])


@router.post("/images/{sha256}/reviews", summary="login: save a review (form)", dependencies=[CheckedForm])
def review_form(request: Request, session: DbSession, user: CurrentUser, sha256: str,
                verdict: Annotated[str, Form()], diagnosis: Annotated[str, Form()] = "",
                note: Annotated[str, Form()] = "") -> Response:
    """Store the form's review and go back to the case page."""
    image = image_or_404(session, sha256, request, user)
    try:
        review = ReviewIn(verdict=verdict, diagnosis=diagnosis or None, note=note)  # type: ignore[arg-type]
        store_review(session, image, user, verdict=review.verdict, diagnosis=review.diagnosis,
                     note=review.note, now=now())
        session.commit()  # so the case page the redirect shows sees it
    except (ValidationError, BadReview) as exc:
        raise HTTPException(422, f"review not stored: {exc}") from None
    return RedirectResponse(f"{base_path(request)}/images/{image.sha256}#reviews", status_code=303)
