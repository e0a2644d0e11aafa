"""The one read model of an image: the image, its latest prediction, its latest review and the
history of its predictions, as `results`, the worklist, the case page and the API show it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.dicom import instances_of
from db.predictions import flag_history, latest_prediction_id, latest_predictions
from db.reviews import ReviewRow, latest_reviews
from db.schema import DicomInstance, Image, ImageStatus, Prediction


@dataclass(frozen=True)
class ImageRow:
    """One image with its latest prediction, latest review and prediction history."""

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
    #: The latest review: None or {verdict, diagnosis, reviewer, reviewed_at}.
    review: dict[str, Any] | None = None
    #: The threshold the prediction was judged against: for writing p (not an output column).
    threshold: float | None = None
    #: Every model version that screened the image, oldest first (one prediction each), and
    #: whether the latest one's flag differs from the one before it (a re-screen changed it).
    model_versions: tuple[str, ...] = ()
    flag_changed: bool = False
    #: For an image that came as DICOM: its patient (a keyed hash with pseudonymised intake),
    #: study and SOP instance; None for picture files.
    patient_id: str | None = None
    study_uid: str | None = None
    sop_instance_uid: str | None = None
    #: The image, its latest prediction and latest review themselves (pages show more of them;
    #: not output columns).
    image: Image | None = None
    prediction: Prediction | None = None
    latest_review: ReviewRow | None = None

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
            "flag_changed": self.flag_changed, "patient_id": self.patient_id,
            "study_uid": self.study_uid, "sop_instance_uid": self.sop_instance_uid,
        }


#: The output columns of `melanoscreen results` (JSON keys, CSV header), in order.
RESULT_COLUMNS = ("sha256", "source", "status", "reason", "received_at", "screened_at",
                  "predicted_class", "melanoma_probability", "flagged", "model_version",
                  "out_of_scope", "review", "model_versions", "flag_changed", "patient_id",
                  "study_uid", "sop_instance_uid")


def flag_changed(history: Sequence[tuple[str, bool]]) -> bool:
    """Whether the latest of (model version, flagged) differs in its flag from the one before."""
    return len(history) > 1 and history[-1][1] != history[-2][1]


def image_row(image: Image, prediction: Prediction | None, review: ReviewRow | None = None,
              history: Sequence[tuple[str, bool]] = (),
              dicom: DicomInstance | None = None) -> ImageRow:
    """An image, its latest prediction and latest review as one row; `history`: (model
    version, flagged) of its predictions, oldest first; `dicom`: its patient and study."""
    return ImageRow(
        sha256=image.sha256, source=image.source, status=image.status, reason=image.reason,
        received_at=image.received_at, screened_at=image.screened_at,
        predicted_class=prediction.predicted_class if prediction else None,
        melanoma_probability=prediction.melanoma_probability if prediction else None,
        flagged=prediction.flagged if prediction else None,
        model_version=prediction.model_version if prediction else None,
        out_of_scope=prediction.out_of_scope if prediction else None,
        review=review.summary() if review else None,
        threshold=prediction.threshold if prediction else None,
        model_versions=tuple(version for version, _ in history),
        flag_changed=flag_changed(history),
        patient_id=dicom.patient_id if dicom else None,
        study_uid=dicom.study_uid if dicom else None,
        sop_instance_uid=dicom.sop_instance_uid if dicom else None,
        image=image, prediction=prediction, latest_review=review,
    )


def image_rows(session: Session, images: Sequence[Image],
               predictions: dict[int, Prediction] | None = None) -> list[ImageRow]:
    """The rows of these images, in their order (`predictions`: their latest, when known)."""
    ids = [image.id for image in images]
    if predictions is None:
        predictions = latest_predictions(session, ids)
    reviews = latest_reviews(session, ids)
    history = flag_history(session, ids)
    dicom = instances_of(session, ids)
    return [image_row(image, predictions.get(image.id), reviews.get(image.id),
                      history.get(image.id, []), dicom.get(image.id)) for image in images]


def results(session: Session, *, since: datetime | None = None,
            flagged_only: bool = False) -> list[ImageRow]:
    """Every image (received at or after `since`) with its latest prediction, newest first;
    with `flagged_only`, highest melanoma probability first (what to look at first, first)."""
    newest = (Image.received_at.desc(), Image.id.desc())
    query = (select(Image, Prediction)
             .outerjoin(Prediction, Prediction.id == latest_prediction_id())
             .order_by(*((Prediction.melanoma_probability.desc(), *newest) if flagged_only
                         else newest)))
    if since is not None:
        query = query.where(Image.received_at >= since)
    if flagged_only:
        query = query.where(Prediction.flagged.is_(True))
    found = list(session.execute(query).tuples())
    return image_rows(session, [image for image, _ in found],
                      {image.id: prediction for image, prediction in found if prediction is not None})


def image_row_of(session: Session, image: Image) -> ImageRow:
    """The row of one image."""
    return image_rows(session, [image])[0]
