"""Reviews: a dermatologist's verdict on an image, appended (never edited) and audited.
TensorFlow-free; the web form and the JSON API both call `store_review`."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import Session

from db import audit, reviews
from db.predictions import latest_prediction
from db.schema import Image, User, Verdict


class BadReview(ValueError):
    """A review that cannot be stored (an unknown verdict or diagnosis)."""


def store_review(session: Session, image: Image, user: User, *, verdict: Verdict,
                 diagnosis: str | None, note: str, now: datetime) -> reviews.ReviewRow:
    """Append the review and its audit entry; the diagnosis must be one of the model's classes.
    The caller commits."""
    latest = latest_prediction(session, image.id)
    if diagnosis is not None and (latest is None or diagnosis not in latest.probabilities):
        known = ", ".join(sorted(latest.probabilities)) if latest else "none (not screened)"
        raise BadReview(f"diagnosis: must be one of the model's classes ({known}) or null")
    stored = reviews.add_review(session, image, user, verdict=verdict, diagnosis=diagnosis,
                                note=note, now=now)
    audit.audit(session, user=user, username=user.name, action="review", now=stored.created_at,
                image_id=image.id, detail=f"verdict {stored.verdict.value}"
                + (f", diagnosis {stored.diagnosis}" if stored.diagnosis else ""))
    return stored
