"""Re-screening: a new model version looks again at screened images, each image once per version.

The images are chosen in the database, queued there batch by batch (commit, then enqueue: a lost
message is found by the sweep) and sent by the caller's `send_batch`, so this module never
imports the queue's producer. Waiting for the workers is a second, optional step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from db import images, predictions
from db.schema import ImageStatus, utcnow

#: How often (seconds) `wait_for_rescreen` looks at the images' statuses.
POLL_SECONDS = 0.5


class ModelCardError(ValueError):
    """The model's card cannot be read, so its version is unknown."""


@dataclass(frozen=True)
class Selection:
    """Which screened images to look at again (every one when nothing is set)."""

    since: datetime | None = None  # received at or after
    until: datetime | None = None  # received before
    source_prefix: str | None = None  # inbox-relative name starts with this
    only_unreviewed: bool = False


@dataclass(frozen=True)
class Rescreen:
    """What `queue_rescreen` chose and queued."""

    version: str
    image_ids: list[int]  # every matching image that has no prediction by `version`
    queued: int = 0  # 0 on a dry run


def model_version(model_path: Path | None) -> str:
    """The version in the card of the model at `model_path` (else the shipped model), read
    without TensorFlow; `ModelCardError` naming the path when the card cannot be read."""
    from model.card import ModelCard, card_path_for, shipped_model_path

    path = model_path or shipped_model_path()
    try:
        return ModelCard.read(card_path_for(path)).version
    except (OSError, ValueError, KeyError) as exc:
        raise ModelCardError(f"cannot read the model card of {path}: {exc}") from exc


def queue_rescreen(sessions: sessionmaker[Session], selection: Selection, *, version: str,
                   batch_size: int, dry_run: bool = False,
                   connect: Callable[[], Callable[[Sequence[int]], None]]) -> Rescreen:
    """Choose the screened images of `selection` that `version` has not screened and, unless
    `dry_run`, queue them in batches of `batch_size`. `connect` is called only when there is
    something to send, and returns the function that sends one batch of ids to the workers."""
    with sessions.begin() as session:
        ids = images.rescreen_candidates(session, model_version=version, since=selection.since,
                                          until=selection.until,
                                          source_prefix=selection.source_prefix,
                                          only_unreviewed=selection.only_unreviewed)
    if dry_run or not ids:
        return Rescreen(version, ids)
    send_batch = connect()
    queued = 0
    for start in range(0, len(ids), batch_size):
        batch = ids[start:start + batch_size]
        # Committed before it is sent (commit, then enqueue): a lost message is found by the sweep.
        with sessions.begin() as session:
            queued += images.queue_for_rescreen(session, batch, utcnow())
        send_batch(batch)
    return Rescreen(version, ids, queued)


def wait_for_rescreen(sessions: sessionmaker[Session], rescreen: Rescreen,
                      on_progress: Callable[[int], None] | None = None,
                      poll_seconds: float = POLL_SECONDS) -> int:
    """Wait until no image of `rescreen` is queued or screening; `on_progress(n)` is told each
    time n more are done. Returns how many of them now have a prediction by its version (the
    rest were rejected, failed, or screened by a worker that runs another model)."""
    ids = rescreen.image_ids
    waiting = (ImageStatus.QUEUED, ImageStatus.SCREENING)
    done = 0
    while done < len(ids):
        time.sleep(poll_seconds)
        with sessions.begin() as session:
            left = images.count_in_status(session, ids, waiting)
        now_done = len(ids) - left
        if on_progress is not None:
            on_progress(now_done - done)
        done = now_done
    with sessions.begin() as session:
        return len(predictions.predicted_by(session, ids, rescreen.version))
