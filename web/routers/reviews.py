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
                note: Annotated[str, Form()] = "", then: Annotated[str, Form()] = "") -> Response:
    """Store the form's review, then go back to the case page or, with `then=next`, on to the
    next unreviewed flagged case."""
    image = image_or_404(session, sha256, request, user)
    try:
        review = ReviewIn(verdict=verdict, diagnosis=diagnosis or None, note=note)  # type: ignore[arg-type]
        store_review(session, image, user, verdict=review.verdict, diagnosis=review.diagnosis,
                     note=review.note, now=now())
        session.commit()  # so the case page the redirect shows sees it
    except (ValidationError, BadReview) as exc:
        raise HTTPException(422, f"review not stored: {exc}") from None
    if then == "next":
        return RedirectResponse(f"{base_path(request)}/next?after={image.sha256}", status_code=303)
    return RedirectResponse(f"{base_path(request)}/images/{image.sha256}#reviews", status_code=303)
