"""Queries of issue 11 (escalation, re-screening, reviewers' clinics): each takes the session
first and never commits."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import CursorResult, and_, func, select, update
from sqlalchemy.orm import Session

from db.schema import Image, ImageStatus, Prediction, Review


def _latest_prediction_id() -> Any:
    """Correlated subquery: the id of an image's latest prediction."""
    return (select(func.max(Prediction.id)).where(Prediction.image_id == Image.id)
            .correlate(Image).scalar_subquery())


def due_for_escalation(session: Session, *, screened_before: datetime,
                       limit: int = 500) -> list[tuple[Image, Prediction]]:
    """Flagged images still waiting for a review, screened before `screened_before`, that have
    had no reminder yet; each with its latest prediction, oldest first."""
    return [(image, prediction) for image, prediction in session.execute(
        select(Image, Prediction)
        .join(Prediction, Prediction.id == _latest_prediction_id())
        .where(Image.status == ImageStatus.SCREENED, Image.flagged.is_(True),
               Image.needs_review.is_(True), Image.escalated_at.is_(None),
               Image.screened_at <= screened_before)
        .order_by(Image.screened_at, Image.id).limit(limit)
    ).tuples()]


def take_escalation(session: Session, image_id: int, now: datetime) -> bool:
    """Mark the image's one reminder as written; False when another run took it first (or it was
    reviewed meanwhile): the test is in the UPDATE, so of two runs exactly one gets True."""
    result: CursorResult[Any] = session.execute(  # type: ignore[assignment]
        update(Image)
        .where(Image.id == image_id, Image.escalated_at.is_(None), Image.needs_review.is_(True))
        .values(escalated_at=now)
    )
    return result.rowcount == 1


def rescreen_candidates(session: Session, *, model_version: str, since: datetime | None = None,
                        until: datetime | None = None, source_prefix: str | None = None,
                        only_unreviewed: bool = False) -> list[int]:
    """Ids of screened images with no prediction by `model_version` yet (received in
    [since, until)), oldest first: what `melanoscreen rescreen` queues."""
    has_version = (select(Prediction.id)
                   .where(Prediction.image_id == Image.id, Prediction.model_version == model_version)
                   .correlate(Image).exists())
    query = select(Image.id).where(Image.status == ImageStatus.SCREENED, ~has_version)
    if since is not None:
        query = query.where(Image.received_at >= since)
    if until is not None:
        query = query.where(Image.received_at < until)
    if source_prefix:
        escaped = (source_prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_"))
        query = query.where(Image.source.like(f"{escaped}%", escape="\\"))
    if only_unreviewed:
        query = query.where(Image.reviewed_at.is_(None))
    return list(session.scalars(query.order_by(Image.received_at, Image.id)))


def queue_for_rescreen(session: Session, image_ids: Sequence[int], now: datetime) -> int:
    """Hand screened images back to `queued` (attempts from zero) for the worker to screen with
    its model; the claim test is in the UPDATE, so only `screened` ones move. How many moved."""
    moved = 0
    for start in range(0, len(image_ids), 500):  # SQLite's bound-parameter limit
        chunk = list(image_ids[start:start + 500])
        result: CursorResult[Any] = session.execute(  # type: ignore[assignment]
            update(Image)
            .where(Image.id.in_(chunk), Image.status == ImageStatus.SCREENED)
            .values(status=ImageStatus.QUEUED, attempts=0, enqueued_at=now, claim_token=None)
        )
        moved += result.rowcount
    return moved


def predicted_by(session: Session, image_ids: Sequence[int], model_version: str) -> set[int]:
    """Which of these images already have a prediction by `model_version`."""
    if not image_ids:
        return set()
    return set(session.scalars(select(Prediction.image_id).where(
        Prediction.image_id.in_(image_ids), Prediction.model_version == model_version)))


def finish_unchanged(session: Session, image_id: int, *, token: str) -> bool:
    """Put a claimed image that this model version already screened back to `screened`, with no
    new prediction (one per image and version): a re-screen that is not owed."""
    result: CursorResult[Any] = session.execute(  # type: ignore[assignment]
        update(Image)
        .where(Image.id == image_id, Image.status == ImageStatus.SCREENING,
               Image.claim_token == token)
        .values(status=ImageStatus.SCREENED, claim_token=None)
    )
    return result.rowcount == 1


def previous_predictions(session: Session, predictions: Sequence[Prediction]) -> dict[int, Prediction]:
    """For each of these (new) predictions, the image's prediction just before it, by image id."""
    found: dict[int, Prediction] = {}
    newest = {p.image_id: p.id for p in predictions}
    image_ids = list(newest)
    for start in range(0, len(image_ids), 500):  # SQLite's bound-parameter limit
        for before in session.scalars(
                select(Prediction).where(Prediction.image_id.in_(image_ids[start:start + 500]))
                .order_by(Prediction.id)):
            if before.id < newest[before.image_id]:
                found[before.image_id] = before  # ascending: the last one kept is the latest
    return found


def keep_review_state(session: Session, image_id: int) -> None:
    """After a re-screen that did not change the flag: a review given before still counts."""
    session.execute(update(Image).where(Image.id == image_id).values(
        needs_review=and_(Image.flagged, Image.reviewed_at.is_(None))))


def reopen_escalation(session: Session, image_id: int) -> None:
    """A new flag (a re-screen) gets its own reminder when it too waits for a review."""
    session.execute(update(Image).where(Image.id == image_id).values(escalated_at=None))


def flag_history(session: Session, image_ids: Sequence[int]) -> dict[int, list[tuple[str, bool]]]:
    """(model version, flagged) of every prediction of each image, oldest first."""
    history: dict[int, list[tuple[str, bool]]] = {}
    for start in range(0, len(image_ids), 500):
        chunk = list(image_ids[start:start + 500])
        for image_id, version, flagged in session.execute(
                select(Prediction.image_id, Prediction.model_version, Prediction.flagged)
                .where(Prediction.image_id.in_(chunk)).order_by(Prediction.id)):
            history.setdefault(image_id, []).append((version, bool(flagged)))
    return history


def lost_flags_in_period(session: Session, start: datetime,
                         end: datetime) -> list[tuple[Image, Prediction, Prediction]]:
    """Re-screens in [start, end) that no longer flag an image the version before flagged:
    (image, the new prediction, the earlier flagged one), by source; for the digest."""
    screened_again = (select(Prediction.image_id).group_by(Prediction.image_id)
                      .having(func.count() > 1))
    unflagged = list(session.scalars(
        select(Prediction).where(Prediction.created_at >= start, Prediction.created_at < end,
                                 Prediction.flagged.is_(False),
                                 Prediction.image_id.in_(screened_again))))
    earlier = previous_predictions(session, unflagged)
    lost = [(session.get_one(Image, p.image_id), p, earlier[p.image_id])
            for p in unflagged if p.image_id in earlier and earlier[p.image_id].flagged]
    return sorted(lost, key=lambda row: row[0].source)


def reviewed_images(session: Session) -> list[Image]:
    """Every image with at least one review, oldest first (for `melanoscreen export`)."""
    has_review = select(Review.id).where(Review.image_id == Image.id).correlate(Image).exists()
    return list(session.scalars(select(Image).where(has_review).order_by(Image.received_at, Image.id)))


def count_in_status(session: Session, image_ids: Sequence[int],
                    statuses: Sequence[ImageStatus]) -> int:
    """How many of these images are in one of `statuses`."""
    count = 0
    for start in range(0, len(image_ids), 500):
        chunk = list(image_ids[start:start + 500])
        count += int(session.scalar(select(func.count()).select_from(Image).where(
            Image.id.in_(chunk), Image.status.in_(statuses))) or 0)
    return count
