"""Predictions: an image's latest, the one before it, and its history of flags."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db._sql import in_chunks
from db.schema import Image, Prediction


def latest_prediction_id() -> Any:
    """Correlated subquery: the id of an image's latest prediction."""
    return (select(func.max(Prediction.id)).where(Prediction.image_id == Image.id)
            .correlate(Image).scalar_subquery())


def latest_predictions(session: Session, image_ids: Sequence[int]) -> dict[int, Prediction]:
    """The latest prediction of each of these images that has one."""
    found: dict[int, Prediction] = {}
    for chunk in in_chunks(image_ids):
        newest = (select(func.max(Prediction.id)).where(Prediction.image_id.in_(chunk))
                  .group_by(Prediction.image_id).scalar_subquery())
        found.update((p.image_id, p) for p in
                     session.scalars(select(Prediction).where(Prediction.id.in_(newest))))
    return found


def latest_prediction(session: Session, image_id: int) -> Prediction | None:
    """The image's latest prediction, if it has one."""
    return session.scalars(select(Prediction).where(Prediction.image_id == image_id)
                           .order_by(Prediction.id.desc()).limit(1)).one_or_none()


def predicted_by(session: Session, image_ids: Sequence[int], model_version: str) -> set[int]:
    """Which of these images already have a prediction by `model_version`."""
    found: set[int] = set()
    for chunk in in_chunks(image_ids):
        found.update(session.scalars(select(Prediction.image_id).where(
            Prediction.image_id.in_(chunk), Prediction.model_version == model_version)))
    return found


def previous_predictions(session: Session, predictions: Sequence[Prediction]) -> dict[int, Prediction]:
    """For each of these (new) predictions, the image's prediction just before it, by image id."""
    found: dict[int, Prediction] = {}
    newest = {p.image_id: p.id for p in predictions}
    for chunk in in_chunks(list(newest)):
        for before in session.scalars(
                select(Prediction).where(Prediction.image_id.in_(chunk)).order_by(Prediction.id)):
            if before.id < newest[before.image_id]:
                found[before.image_id] = before  # ascending: the last one kept is the latest
    return found


def flag_history(session: Session, image_ids: Sequence[int]) -> dict[int, list[tuple[str, bool]]]:
    """(model version, flagged) of every prediction of each image, oldest first."""
    history: dict[int, list[tuple[str, bool]]] = {}
    for chunk in in_chunks(image_ids):
        for image_id, version, flagged in session.execute(
                select(Prediction.image_id, Prediction.model_version, Prediction.flagged)
                .where(Prediction.image_id.in_(chunk)).order_by(Prediction.id)):
            history.setdefault(image_id, []).append((version, bool(flagged)))
    return history
