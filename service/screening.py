"""Screen a batch of images: claim rows, decode, one forward pass, write everything in one transaction."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session, sessionmaker

from db import images
from db.predictions import predicted_by, previous_predictions
from db.schema import Prediction, utcnow
from melanoscreen.settings import Settings
from service.alerts import AlertTarget, write_routed_alerts
from service.flags import flag_of
from service.pictures import jpeg_frames, store_pictures

if TYPE_CHECKING:
    from model.inference import Classifier

logger = logging.getLogger(__name__)

#: The label of an alert raised by a re-screen (its subject starts with "[re-screen]").
RESCREEN = "re-screen"


@dataclass(frozen=True)
class BatchOutcome:
    """What one task did."""

    screened: int = 0
    rejected: int = 0
    skipped: int = 0  # already finished, or claimed by another delivery
    flagged: tuple[int, ...] = ()  # image ids whose melanoma probability reached the threshold
    alerts: tuple[int, ...] = ()  # outbox ids of the alert messages written for them
    out_of_scope: tuple[int, ...] = ()  # image ids not like a dermoscopic image (flagged all the
    # same when they reach the threshold: their alert says the score may be unreliable)


def quarantine(path: Path, quarantine_dir: Path, reason: str) -> Path:
    """Move an unreadable file aside (atomic rename in the data folder) with its reason beside it."""
    quarantine_dir.mkdir(parents=True, exist_ok=True)
    target = quarantine_dir / path.name
    counter = 1
    while target.exists():
        target = quarantine_dir / f"{path.stem}-{counter}{path.suffix}"
        counter += 1
    if path.exists():
        os.rename(path, target)
    else:
        target = path  # nothing to move (already gone): keep the last known place
    (quarantine_dir / f"{target.name}.reason.txt").write_text(reason + "\n")
    return target


def screen_batch(sessions: sessionmaker[Session], load_classifier: Callable[[], Classifier],
                 image_ids: list[int], *, token: str, settings: Settings) -> BatchOutcome:
    """Screen the given images; safe to call again with the same ids (nothing is screened twice).

    `load_classifier` is called only when there is work, so a redelivered batch whose images
    are all finished never loads the model.
    """
    from model.imaging import DecodeError

    now = utcnow()
    with sessions.begin() as session:
        claimed = images.claim_images(
            session, image_ids, token=token, now=now,
            stale_before=now - timedelta(seconds=settings.sweep.lease),
            max_attempts=settings.max_attempts)
        work = [(image.id, Path(image.location)) for image in claimed]
        sources = {image.id: image.source for image in claimed}
        shas = {image.id: image.sha256 for image in claimed}
    skipped = len(set(image_ids)) - len(work)
    if not work:
        return BatchOutcome(skipped=skipped)

    try:
        classifier = load_classifier()
        with sessions.begin() as session:
            # A re-screen queued for a version that already screened the image (another worker's
            # model, a second `rescreen`): one prediction per image and version, so nothing new.
            done = predicted_by(session, [i for i, _ in work], classifier.version)
            for image_id in done:
                images.finish_unchanged(session, image_id, token=token)
        work = [(image_id, path) for image_id, path in work if image_id not in done]
        skipped += len(done)
        if not work:
            return BatchOutcome(skipped=skipped)
        started = time.perf_counter()
        # A JPEG-baseline DICOM object is screened (and pictured, below) as the JPEG file it
        # holds: the same picture dropped as a file or sent by DICOM gets the same score.
        frames = jpeg_frames(work)
        answers = classifier.predict([frames.get(image_id, path) for image_id, path in work],
                                     batch_size=max(len(work), 1))
        per_image = (time.perf_counter() - started) / len(work)
    except Exception:
        with sessions.begin() as session:
            images.release_claims(session, [image_id for image_id, _ in work], token=token)
        raise

    threshold = settings.alert.threshold
    if threshold is None:
        threshold = classifier.threshold
    # Files move before the commit: if the commit is lost, the retry finds them in quarantine.
    moved: dict[int, Path] = {}
    for (image_id, path), answer in zip(work, answers, strict=True):
        if isinstance(answer, DecodeError):
            moved[image_id] = quarantine(path, settings.quarantine_dir, answer.reason)
            logger.warning("image %d rejected: %s", image_id, answer.reason)

    screened = rejected = 0
    flagged: list[AlertTarget] = []
    new_flags: list[AlertTarget] = []  # flagged by this version, not by the one before
    predictions: list[Prediction] = []
    alerts: list[int] = []
    out_of_scope: list[int] = []
    finished = utcnow()
    with sessions.begin() as session:
        for (image_id, _path), answer in zip(work, answers, strict=True):
            if isinstance(answer, DecodeError):
                rejected += images.finish_rejected(
                    session, image_id, token=token, now=finished, reason=answer.reason,
                    location=str(moved[image_id]))
                continue
            flag = flag_of(answer.melanoma_probability, threshold, out_of_scope=answer.out_of_scope)
            prediction = images.finish_screened(
                session, image_id, token=token, now=finished, model_version=classifier.version,
                probabilities=dict(zip(classifier.classes, answer.probabilities, strict=True)),
                melanoma_probability=answer.melanoma_probability,
                predicted_class=answer.predicted_class, threshold=threshold, seconds=per_image,
                flagged=flag.flagged, out_of_scope=answer.out_of_scope,
                scope_distance=answer.scope_distance)
            screened += prediction is not None
            if prediction is not None:
                predictions.append(prediction)
            if prediction is not None and prediction.out_of_scope:
                out_of_scope.append(image_id)
                logger.warning("image %d is not like a dermoscopic image (scope distance %.3g): "
                               "its score may be unreliable%s", image_id, answer.scope_distance,
                               "; alerted as an unusual picture" if prediction.flagged else "")
        flagged, new_flags = _first_and_new_flags(session, predictions)
        # Same transaction as the predictions: a flag is never stored without its alert.
        alerts, untold = write_routed_alerts(session, flagged, sources, settings=settings,
                                             threshold=threshold)
        rescreen_alerts, untold_again = write_routed_alerts(
            session, new_flags, sources, settings=settings, threshold=threshold, label=RESCREEN)
        alerts += rescreen_alerts
        untold += untold_again
    if untold:
        logger.warning("%d flagged image(s) recorded; no MELANOSCREEN_ALERT_RECIPIENTS to tell",
                       untold)
    # Once, here, for the review app's lists and case page: it streams the stored files and
    # never decodes.
    screened_ids = {prediction.image_id for prediction in predictions}
    for image_id, path in work:
        if image_id not in moved:
            try:
                store_pictures(path, shas[image_id], settings.thumbnails_dir,
                               settings.previews_dir / f"{shas[image_id]}.jpg"
                               if image_id in screened_ids else None, frames.get(image_id))
            except Exception:  # a picture for people must never fail the screening
                logger.exception("no pictures for image %d", image_id)
    lost = len(work) - screened - rejected
    return BatchOutcome(screened=screened, rejected=rejected, skipped=skipped + lost,
                        flagged=tuple(p.image_id for p in predictions if p.flagged),
                        alerts=tuple(alerts), out_of_scope=tuple(out_of_scope))


def _first_and_new_flags(session: Session, predictions: list[Prediction]
                         ) -> tuple[list[AlertTarget], list[AlertTarget]]:
    """The flagged among new predictions: (first screens, re-screens whose flag is new). A
    re-screen that keeps the flag alerts no one again and keeps the image's review; one that
    loses it goes to the next digest."""
    before = previous_predictions(session, predictions)
    first: list[AlertTarget] = []
    new: list[AlertTarget] = []
    for prediction in predictions:
        item = AlertTarget(prediction.image_id, prediction.id, prediction.melanoma_probability,
                           unusual=prediction.flagged and prediction.out_of_scope)
        earlier = before.get(prediction.image_id)
        if earlier is None:
            if prediction.flagged:
                first.append(item)
        elif prediction.flagged and not earlier.flagged:
            new.append(item)
            images.reopen_escalation(session, prediction.image_id)
        elif prediction.flagged == earlier.flagged:
            images.keep_review_state(session, prediction.image_id)
    return first, new


def sweep_stale(sessions: sessionmaker[Session], *, stale_after: float,
                batch_size: int, lease: float | None = None) -> list[list[int]]:
    """Ids of images left `queued` too long or `screening` past their claim's `lease`, in
    batches, marked as re-enqueued now."""
    now = utcnow()
    with sessions.begin() as session:
        ids = images.stale_image_ids(
            session, before=now - timedelta(seconds=stale_after),
            lease_before=None if lease is None else now - timedelta(seconds=lease))
        images.mark_enqueued(session, ids, now)
    return [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]
