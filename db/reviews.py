"""Reviews: appending one, an image's reviews, the latest of each image, and the model's figures."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from db._sql import in_chunks
from db.predictions import latest_prediction
from db.schema import Image, Prediction, Review, User, Verdict


@dataclass(frozen=True)
class ReviewRow:
    """A review as shown and returned by the API."""

    id: int
    verdict: Verdict
    diagnosis: str | None
    note: str
    reviewer: str
    created_at: datetime
    model_version: str | None = None

    def to_json(self) -> dict[str, Any]:
        """Plain JSON values."""
        return {"id": self.id, "verdict": self.verdict.value, "diagnosis": self.diagnosis,
                "note": self.note, "reviewer": self.reviewer,
                "created_at": self.created_at.isoformat(), "model_version": self.model_version}

    def summary(self) -> dict[str, Any]:
        """The `review` field of `results --format json` and the API's list items."""
        return {"verdict": self.verdict.value, "diagnosis": self.diagnosis,
                "reviewer": self.reviewer, "reviewed_at": self.created_at.isoformat()}


def add_review(session: Session, image: Image, reviewer: User, *, verdict: Verdict,
               diagnosis: str | None, note: str, now: datetime) -> ReviewRow:
    """Append a review (never edited: a later one supersedes it) and take the image off the
    worklist's unreviewed group."""
    latest = latest_prediction(session, image.id)
    review = Review(image_id=image.id, reviewer_id=reviewer.id,
                    prediction_id=latest.id if latest else None, verdict=verdict,
                    diagnosis=diagnosis, note=note, created_at=now)
    session.add(review)
    session.execute(update(Image).where(Image.id == image.id)
                    .values(reviewed_at=now, needs_review=False))
    session.flush()
    return ReviewRow(review.id, verdict, diagnosis, note, reviewer.name, now,
                     latest.model_version if latest else None)


def reviews_of(session: Session, image_id: int) -> list[ReviewRow]:
    """Every review of an image, newest first."""
    rows = session.execute(
        select(Review, User.name, Prediction.model_version).join(User, User.id == Review.reviewer_id)
        .outerjoin(Prediction, Prediction.id == Review.prediction_id)
        .where(Review.image_id == image_id).order_by(Review.created_at.desc(), Review.id.desc()))
    return [ReviewRow(r.id, r.verdict, r.diagnosis, r.note, name, r.created_at, version)
            for r, name, version in rows]


def latest_reviews(session: Session, image_ids: Sequence[int]) -> dict[int, ReviewRow]:
    """The latest review of each of these images that has one."""
    found: dict[int, ReviewRow] = {}
    for chunk in in_chunks(image_ids):
        newest = (select(func.max(Review.id)).where(Review.image_id.in_(chunk))
                  .group_by(Review.image_id).scalar_subquery())
        rows = session.execute(select(Review, User.name).join(User, User.id == Review.reviewer_id)
                               .where(Review.id.in_(newest)))
        found.update((r.image_id, ReviewRow(r.id, r.verdict, r.diagnosis, r.note, name, r.created_at))
                     for r, name in rows)
    return found


def unreviewed_flagged_count(session: Session) -> int:
    """Flagged images nobody has reviewed since they were flagged."""
    return int(session.scalar(select(func.count()).select_from(Image)
                              .where(Image.needs_review.is_(True))) or 0)


def unreviewed_flagged_before(session: Session, before: datetime,
                              limit: int = 200) -> list[Image]:
    """Flagged images still unreviewed that were screened before `before`, highest probability first."""
    return list(session.scalars(
        select(Image).where(Image.needs_review.is_(True), Image.screened_at < before)
        .order_by(Image.melanoma_probability.desc(), Image.id).limit(limit)))


def reviewed_images(session: Session) -> list[Image]:
    """Every image with at least one review, oldest first (for `melanoscreen export`)."""
    has_review = select(Review.id).where(Review.image_id == Image.id).correlate(Image).exists()
    return list(session.scalars(select(Image).where(has_review).order_by(Image.received_at, Image.id)))


@dataclass
class VersionFigures:
    """How one model version fares against the reviewers' verdicts."""

    model_version: str
    alerts: int = 0  # flagged predictions
    reviewed: int = 0  # of those, with a review
    referred: int = 0  # of those reviewed, the latest verdict `refer`
    benign: int = 0  # of those reviewed, the latest verdict `benign`
    below_threshold_referred: int = 0  # not flagged, yet a reviewer said `refer`
    with_diagnosis: int = 0  # reviews giving a diagnosis
    diagnosis_agrees: int = 0  # ... equal to the predicted class

    @property
    def ppv(self) -> float | None:
        """Share of the reviewed alerts judged `refer` (positive predictive value)."""
        return self.referred / self.reviewed if self.reviewed else None

    @property
    def agreement(self) -> float | None:
        """Share of diagnoses equal to the predicted class."""
        return self.diagnosis_agrees / self.with_diagnosis if self.with_diagnosis else None


def performance(session: Session, model_version: str | None = None) -> list[VersionFigures]:
    """Per model version (only `model_version` when given), from each image's latest review of
    that version's prediction."""
    newest = select(func.max(Review.id)).where(Review.prediction_id.is_not(None))
    query = (select(Prediction.id, Prediction.model_version, Prediction.flagged,
                    Prediction.predicted_class)
             .where(or_(Prediction.flagged.is_(True), Prediction.id.in_(select(Review.prediction_id)))))
    if model_version is not None:
        newest = newest.join_from(Review, Prediction, Prediction.id == Review.prediction_id).where(
            Prediction.model_version == model_version)
        query = query.where(Prediction.model_version == model_version)
    latest = newest.group_by(Review.prediction_id).scalar_subquery()
    verdicts = {r.prediction_id: r for r in session.scalars(select(Review).where(Review.id.in_(latest)))}
    figures: dict[str, VersionFigures] = {}
    rows = session.execute(query)
    for prediction_id, version, flagged, predicted in rows:
        fig = figures.setdefault(version, VersionFigures(version))
        review = verdicts.get(prediction_id)
        if flagged:
            fig.alerts += 1
        if review is None:
            continue
        if flagged:
            fig.reviewed += 1
            fig.referred += review.verdict == Verdict.REFER
            fig.benign += review.verdict == Verdict.BENIGN
        elif review.verdict == Verdict.REFER:
            fig.below_threshold_referred += 1
        if review.diagnosis:
            fig.with_diagnosis += 1
            fig.diagnosis_agrees += review.diagnosis == predicted
    return sorted(figures.values(), key=lambda f: f.model_version)


def daily_counts(session: Session, since: datetime) -> list[tuple[date, int, int]]:
    """(day in UTC, images flagged, reviews written) per day since `since`, oldest first."""
    flagged = session.execute(select(Prediction.created_at).where(
        Prediction.flagged.is_(True), Prediction.created_at >= since))
    reviewed = session.execute(select(Review.created_at).where(Review.created_at >= since))
    days: dict[date, list[int]] = {}
    for (at,) in flagged:
        days.setdefault(at.date(), [0, 0])[0] += 1
    for (at,) in reviewed:
        days.setdefault(at.date(), [0, 0])[1] += 1
    return [(day, counts[0], counts[1]) for day, counts in sorted(days.items())]
