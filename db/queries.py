"""Query functions: each takes the session first and never commits (the caller owns the transaction)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import CursorResult, and_, func, or_, select, update
from sqlalchemy.orm import Session

from db.clinics import flag_history
from db.schema import Duplicate, Image, ImageStatus, Prediction, Review, User


def find_image_by_sha256(session: Session, sha256: str) -> Image | None:
    """The image with this content, if it is known."""
    return session.scalars(select(Image).where(Image.sha256 == sha256)).one_or_none()


def add_image(session: Session, *, sha256: str, source: str, size_bytes: int, location: str,
              received_at: datetime) -> Image:
    """A new `queued` image; flushed, so it has its id."""
    image = Image(sha256=sha256, source=source, size_bytes=size_bytes, location=location,
                  status=ImageStatus.QUEUED, received_at=received_at, attempts=0)
    session.add(image)
    session.flush()
    return image


def add_duplicate(session: Session, *, image_id: int, source: str, location: str,
                  received_at: datetime) -> Duplicate:
    """Record a later arrival of a known content."""
    duplicate = Duplicate(image_id=image_id, source=source, location=location,
                          received_at=received_at)
    session.add(duplicate)
    session.flush()
    return duplicate


def mark_enqueued(session: Session, image_ids: Sequence[int], now: datetime) -> None:
    """Note when these images were last handed to the queue (the sweep's clock)."""
    if image_ids:
        session.execute(update(Image).where(Image.id.in_(image_ids)).values(enqueued_at=now))


def unenqueued_image_ids(session: Session, *, limit: int = 10_000) -> list[int]:
    """`queued` images never handed to the queue (committed, then the send failed or the
    watcher died): the watcher sends them at start and when the broker answers again."""
    return list(session.scalars(
        select(Image.id).where(Image.status == ImageStatus.QUEUED, Image.enqueued_at.is_(None))
        .order_by(Image.id).limit(limit)
    ))


def claim_images(session: Session, image_ids: Sequence[int], *, token: str, now: datetime,
                 stale_before: datetime, max_attempts: int) -> list[Image]:
    """Move `queued` images (or this token's own, or stale `screening` ones) to `screening`.

    The status test is part of the UPDATE, so two deliveries of the same ids cannot both claim
    an image. Images that used up their attempts become `failed`. Returns the claimed images.
    """
    if not image_ids:
        return []
    claimable = or_(
        Image.status == ImageStatus.QUEUED,
        and_(Image.status == ImageStatus.SCREENING,
             or_(Image.claim_token == token, Image.claimed_at < stale_before)),
    )
    session.execute(
        update(Image)
        .where(Image.id.in_(image_ids), claimable, Image.attempts >= max_attempts)
        .values(status=ImageStatus.FAILED, reason=f"gave up after {max_attempts} screening attempts",
                claim_token=None, screened_at=now)
    )
    session.execute(
        update(Image)
        .where(Image.id.in_(image_ids), claimable)
        .values(status=ImageStatus.SCREENING, claim_token=token, claimed_at=now,
                attempts=Image.attempts + 1)
    )
    return list(session.scalars(
        select(Image).where(Image.id.in_(image_ids), Image.status == ImageStatus.SCREENING,
                            Image.claim_token == token).order_by(Image.id)
    ))


def finish_screened(session: Session, image_id: int, *, token: str, now: datetime,
                    model_version: str, probabilities: dict[str, float],
                    melanoma_probability: float, predicted_class: str, threshold: float,
                    seconds: float, out_of_scope: bool = False,
                    scope_distance: float | None = None) -> Prediction | None:
    """Store the prediction if this token still holds the claim; None if someone else won.

    Flagged means p >= threshold *and* in scope: an image unlike a dermoscopic lesion image
    keeps its probabilities but is never flagged, because its class scores mean nothing.
    """
    result: CursorResult[Any] = session.execute(  # type: ignore[assignment]
        update(Image)
        .where(Image.id == image_id, Image.status == ImageStatus.SCREENING, Image.claim_token == token)
        .values(status=ImageStatus.SCREENED, screened_at=now, claim_token=None, reason=None)
    )
    won = result.rowcount
    if won != 1:
        return None
    flagged = melanoma_probability >= threshold and not out_of_scope
    # The worklist's columns: a new answer that flags the image asks for a (new) review.
    session.execute(update(Image).where(Image.id == image_id).values(
        melanoma_probability=melanoma_probability, flagged=flagged, needs_review=flagged))
    prediction = Prediction(
        image_id=image_id, model_version=model_version, probabilities=probabilities,
        melanoma_probability=melanoma_probability, predicted_class=predicted_class,
        threshold=threshold, flagged=flagged,
        out_of_scope=out_of_scope, scope_distance=scope_distance, seconds=seconds, created_at=now,
    )
    session.add(prediction)
    session.flush()
    return prediction


def finish_rejected(session: Session, image_id: int, *, token: str, now: datetime, reason: str,
                    location: str) -> bool:
    """Mark an unreadable image `rejected` with its reason and new location, if still claimed."""
    result: CursorResult[Any] = session.execute(  # type: ignore[assignment]
        update(Image)
        .where(Image.id == image_id, Image.status == ImageStatus.SCREENING, Image.claim_token == token)
        .values(status=ImageStatus.REJECTED, reason=reason, location=location, screened_at=now,
                claim_token=None)
    )
    return result.rowcount == 1


def release_claims(session: Session, image_ids: Sequence[int], *, token: str) -> None:
    """Hand claimed images back to `queued` (a transient failure: the retry takes them again)."""
    if image_ids:
        session.execute(
            update(Image)
            .where(Image.id.in_(image_ids), Image.status == ImageStatus.SCREENING, Image.claim_token == token)
            .values(status=ImageStatus.QUEUED, claim_token=None)
        )


def stale_image_ids(session: Session, *, before: datetime, lease_before: datetime | None = None,
                    limit: int = 10_000) -> list[int]:
    """Images still `queued` whose hand-over is older than `before`, or `screening` whose claim
    is older than `lease_before` (its lease ran out: the worker died), else `before`."""
    last_touch = func.coalesce(Image.claimed_at, Image.enqueued_at, Image.received_at)
    queued = and_(Image.status == ImageStatus.QUEUED,
                  func.coalesce(Image.enqueued_at, Image.received_at) < before)
    screening = and_(Image.status == ImageStatus.SCREENING,
                     last_touch < (before if lease_before is None else lease_before))
    return list(session.scalars(
        select(Image.id).where(or_(queued, screening)).order_by(Image.id).limit(limit)
    ))


def status_counts(session: Session) -> dict[str, int]:
    """Number of images per status."""
    rows = session.execute(select(Image.status, func.count()).group_by(Image.status))
    return {ImageStatus(status).value: int(count) for status, count in rows}


def flagged_count(session: Session) -> int:
    """Number of images whose prediction reached the alert threshold."""
    return int(session.scalar(
        select(func.count(func.distinct(Prediction.image_id))).where(Prediction.flagged)
    ) or 0)


def out_of_scope_count(session: Session) -> int:
    """Number of images a prediction marked out of scope (not like a dermoscopic image)."""
    return int(session.scalar(
        select(func.count(func.distinct(Prediction.image_id))).where(Prediction.out_of_scope)
    ) or 0)


def duplicate_count(session: Session) -> int:
    """Number of recorded duplicate arrivals."""
    return int(session.scalar(select(func.count()).select_from(Duplicate)) or 0)


@dataclass(frozen=True)
class ResultRow:
    """One image and its latest prediction, as `melanoscreen results` prints it."""

    sha256: str
    source: str
    status: ImageStatus
    reason: str | None
    received_at: datetime
    screened_at: datetime | None
    predicted_class: str | None
    melanoma_probability: float | None
    flagged: bool | None
    model_version: str | None
    out_of_scope: bool | None
    #: The latest review: None or {verdict, diagnosis, reviewer, reviewed_at} (revision 0004).
    review: dict[str, Any] | None = None
    #: The threshold the prediction was judged against: for writing p (not an output column).
    threshold: float | None = None
    #: Every model version that screened the image, oldest first (one prediction each), and
    #: whether the latest one's flag differs from the one before it (a re-screen changed it).
    model_versions: tuple[str, ...] = ()
    flag_changed: bool = False

    def to_json(self) -> dict[str, Any]:
        """Plain JSON values; times in ISO 8601."""
        return {
            "sha256": self.sha256, "source": self.source, "status": self.status.value,
            "reason": self.reason, "received_at": self.received_at.isoformat(),
            "screened_at": self.screened_at.isoformat() if self.screened_at else None,
            "predicted_class": self.predicted_class,
            "melanoma_probability": self.melanoma_probability, "flagged": self.flagged,
            "model_version": self.model_version, "out_of_scope": self.out_of_scope,
            "review": self.review, "model_versions": list(self.model_versions),
            "flag_changed": self.flag_changed,
        }


#: The output columns of `melanoscreen results` (JSON keys, CSV header), in order.
RESULT_COLUMNS = tuple(name for name in ResultRow.__dataclass_fields__ if name != "threshold")


def results(session: Session, *, since: datetime | None = None,
            flagged_only: bool = False) -> list[ResultRow]:
    """Every image (received at or after `since`) with its latest prediction, oldest first."""
    latest = (select(func.max(Prediction.id)).where(Prediction.image_id == Image.id)
              .correlate(Image).scalar_subquery())
    query = (select(Image, Prediction)
             .outerjoin(Prediction, Prediction.id == latest)
             .order_by(Image.received_at, Image.id))
    if since is not None:
        query = query.where(Image.received_at >= since)
    if flagged_only:
        query = query.where(Prediction.flagged.is_(True))
    found = list(session.execute(query))
    reviews = latest_review_summaries(session, [image.id for image, _ in found])
    history = flag_history(session, [image.id for image, _ in found])
    return [result_row(image, prediction, reviews.get(image.id), history.get(image.id, []))
            for image, prediction in found]


def result_row(image: Image, prediction: Prediction | None,
               review: dict[str, Any] | None = None,
               history: Sequence[tuple[str, bool]] = ()) -> ResultRow:
    """An image, its latest prediction and latest review (a summary) as one results row;
    `history`: (model version, flagged) of its predictions, oldest first."""
    return ResultRow(
        sha256=image.sha256, source=image.source, status=image.status, reason=image.reason,
        received_at=image.received_at, screened_at=image.screened_at,
        predicted_class=prediction.predicted_class if prediction else None,
        melanoma_probability=prediction.melanoma_probability if prediction else None,
        flagged=prediction.flagged if prediction else None,
        model_version=prediction.model_version if prediction else None,
        out_of_scope=prediction.out_of_scope if prediction else None,
        review=review,
        threshold=prediction.threshold if prediction else None,
        model_versions=tuple(version for version, _ in history),
        flag_changed=len(history) > 1 and history[-1][1] != history[-2][1],
    )


def latest_review_summaries(session: Session, image_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    """{verdict, diagnosis, reviewer, reviewed_at} of each image's latest review, by image id."""
    summaries: dict[int, dict[str, Any]] = {}
    # In chunks: SQLite limits the number of bound parameters of one statement.
    for start in range(0, len(image_ids), 500):
        chunk = image_ids[start:start + 500]
        newest = (select(func.max(Review.id)).where(Review.image_id.in_(chunk))
                  .group_by(Review.image_id).scalar_subquery())
        for review, name in session.execute(select(Review, User.name)
                                            .join(User, User.id == Review.reviewer_id)
                                            .where(Review.id.in_(newest))):
            summaries[review.image_id] = {
                "verdict": review.verdict.value, "diagnosis": review.diagnosis, "reviewer": name,
                "reviewed_at": review.created_at.isoformat()}
    return summaries
