"""Images and their life: intake, claims, finishing, the sweep, re-screens, reminders, counts."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import CursorResult, and_, bindparam, func, or_, select, update
from sqlalchemy.orm import Session

from db._sql import escape_like, in_chunks
from db.predictions import latest_prediction_id
from db.schema import Duplicate, Image, ImageStatus, Prediction

#: Built once: the intake asks it for every file.
_IMAGE_BY_SHA256 = select(Image).where(Image.sha256 == bindparam("sha256"))


def find_image_by_sha256(session: Session, sha256: str) -> Image | None:
    """The image with this content, if it is known."""
    return session.scalars(_IMAGE_BY_SHA256, {"sha256": sha256}).one_or_none()


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
                    seconds: float, flagged: bool, out_of_scope: bool = False,
                    scope_distance: float | None = None) -> Prediction | None:
    """Store the prediction if this token still holds the claim; None if someone else won.

    `flagged` is the service's answer (`service.flags`), stored as given.
    """
    result: CursorResult[Any] = session.execute(  # type: ignore[assignment]
        update(Image)
        .where(Image.id == image_id, Image.status == ImageStatus.SCREENING, Image.claim_token == token)
        .values(status=ImageStatus.SCREENED, screened_at=now, claim_token=None, reason=None)
    )
    won = result.rowcount
    if won != 1:
        return None
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


def images_by_ids(session: Session, ids: Sequence[int]) -> list[Image]:
    """These images, by id."""
    return list(session.scalars(select(Image).where(Image.id.in_(ids)))) if ids else []


def due_for_escalation(session: Session, *, screened_before: datetime,
                       limit: int = 500) -> list[tuple[Image, Prediction]]:
    """Flagged images still waiting for a review, screened before `screened_before`, that have
    had no reminder yet; each with its latest prediction, oldest first."""
    return [(image, prediction) for image, prediction in session.execute(
        select(Image, Prediction)
        .join(Prediction, Prediction.id == latest_prediction_id())
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
        query = query.where(Image.source.like(f"{escape_like(source_prefix)}%", escape="\\"))
    if only_unreviewed:
        query = query.where(Image.reviewed_at.is_(None))
    return list(session.scalars(query.order_by(Image.received_at, Image.id)))


def queue_for_rescreen(session: Session, image_ids: Sequence[int], now: datetime) -> int:
    """Hand screened images back to `queued` (attempts from zero) for the worker to screen with
    its model; the claim test is in the UPDATE, so only `screened` ones move. How many moved."""
    moved = 0
    for chunk in in_chunks(image_ids):
        result: CursorResult[Any] = session.execute(  # type: ignore[assignment]
            update(Image)
            .where(Image.id.in_(chunk), Image.status == ImageStatus.SCREENED)
            .values(status=ImageStatus.QUEUED, attempts=0, enqueued_at=now, claim_token=None)
        )
        moved += result.rowcount
    return moved


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


def keep_review_state(session: Session, image_id: int) -> None:
    """After a re-screen that did not change the flag: a review given before still counts."""
    session.execute(update(Image).where(Image.id == image_id).values(
        needs_review=and_(Image.flagged, Image.reviewed_at.is_(None))))


def reopen_escalation(session: Session, image_id: int) -> None:
    """A new flag (a re-screen) gets its own reminder when it too waits for a review."""
    session.execute(update(Image).where(Image.id == image_id).values(escalated_at=None))


def count_in_status(session: Session, image_ids: Sequence[int],
                    statuses: Sequence[ImageStatus]) -> int:
    """How many of these images are in one of `statuses`."""
    count = 0
    for chunk in in_chunks(image_ids):
        count += int(session.scalar(select(func.count()).select_from(Image).where(
            Image.id.in_(chunk), Image.status.in_(statuses))) or 0)
    return count
