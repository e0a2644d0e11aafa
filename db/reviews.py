"""The review app's queries: accounts, the worklist, a case, reviews, the audit log, figures.

Each function takes the session first and never commits (the caller owns the transaction).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import Select, func, or_, select, update
from sqlalchemy.orm import Session

from db.schema import (
    AlertImage,
    AuditEvent,
    DeliveryAttempt,
    Duplicate,
    Image,
    ImageStatus,
    OutboxMessage,
    Prediction,
    Review,
    Role,
    User,
    Verdict,
)

#: Wrong passwords in a row after which an account is locked, and for how long.
MAX_FAILED_LOGINS = 5
LOCK_FOR = timedelta(minutes=15)


# ---- accounts ---------------------------------------------------------------------------------

def find_user(session: Session, name: str) -> User | None:
    """The account with this name, if any."""
    return session.scalars(select(User).where(User.name == name)).one_or_none()


def add_user(session: Session, *, name: str, email: str, role: Role, password_hash: str,
             now: datetime) -> User:
    """A new active account; flushed, so it has its id (a taken name raises IntegrityError)."""
    user = User(name=name, email=email, role=role, password_hash=password_hash, active=True,
                failed_logins=0, created_at=now)
    session.add(user)
    session.flush()
    return user


def list_users(session: Session) -> list[User]:
    """Every account, by name."""
    return list(session.scalars(select(User).order_by(User.name)))


def is_locked(user: User, now: datetime) -> bool:
    """Whether too many wrong passwords in a row keep this account out for now."""
    return user.locked_until is not None and user.locked_until > now


def record_login_failure(session: Session, user: User, now: datetime) -> None:
    """One more wrong password; the fifth in a row locks the account for LOCK_FOR."""
    user.failed_logins += 1
    if user.failed_logins >= MAX_FAILED_LOGINS:
        user.locked_until = now + LOCK_FOR
        user.failed_logins = 0
    session.flush()


def record_login_success(session: Session, user: User) -> None:
    """A right password: the count of failures starts again."""
    if user.failed_logins or user.locked_until is not None:
        user.failed_logins = 0
        user.locked_until = None
        session.flush()


# ---- the audit log ----------------------------------------------------------------------------

def audit(session: Session, *, user: User | None, username: str, action: str, now: datetime,
          image_id: int | None = None, detail: str | None = None) -> None:
    """Write who did what, when."""
    session.add(AuditEvent(at=now, user_id=user.id if user else None, username=username,
                           action=action, image_id=image_id, detail=detail))
    session.flush()


@dataclass(frozen=True)
class AuditRow:
    """One audit entry, with the image's sha256 and name when it is about one."""

    at: datetime
    username: str
    action: str
    detail: str | None
    sha256: str | None
    source: str | None


def audit_page(session: Session, *, limit: int, offset: int,
               sha256: str | None = None) -> list[AuditRow]:
    """Audit entries, newest first (of one image when `sha256` is given)."""
    query = (select(AuditEvent, Image.sha256, Image.source)
             .outerjoin(Image, Image.id == AuditEvent.image_id)
             .order_by(AuditEvent.at.desc(), AuditEvent.id.desc()).limit(limit).offset(offset))
    if sha256 is not None:
        query = query.where(Image.sha256 == sha256)
    return [AuditRow(event.at, event.username, event.action, event.detail, sha, source)
            for event, sha, source in session.execute(query)]


# ---- reviews ----------------------------------------------------------------------------------

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
    if not image_ids:
        return {}
    newest = (select(func.max(Review.id)).where(Review.image_id.in_(image_ids))
              .group_by(Review.image_id).scalar_subquery())
    rows = session.execute(select(Review, User.name).join(User, User.id == Review.reviewer_id)
                           .where(Review.id.in_(newest)))
    return {r.image_id: ReviewRow(r.id, r.verdict, r.diagnosis, r.note, name, r.created_at)
            for r, name in rows}


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


# ---- the worklist -----------------------------------------------------------------------------

@dataclass(frozen=True)
class WorklistFilter:
    """What the worklist shows: every field None means no filter."""

    status: ImageStatus | None = None
    flagged: bool | None = None
    reviewed: bool | None = None
    received_from: datetime | None = None
    received_before: datetime | None = None
    clinic: str | None = None  # an inbox subfolder: sources under "clinic/"
    search: str | None = None  # a part of the source name
    #: Sources starting with any of these (a reviewer's clinics, as in MELANOSCREEN_ALERT_ROUTES).
    prefixes: tuple[str, ...] = ()


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _filtered(query: Select[Any], where: WorklistFilter) -> Select[Any]:
    if where.status is not None:
        query = query.where(Image.status == where.status)
    if where.flagged is not None:
        query = query.where(Image.flagged.is_(where.flagged))
    if where.reviewed is not None:
        query = query.where(Image.reviewed_at.is_not(None) if where.reviewed
                            else Image.reviewed_at.is_(None))
    if where.received_from is not None:
        query = query.where(Image.received_at >= where.received_from)
    if where.received_before is not None:
        query = query.where(Image.received_at < where.received_before)
    if where.clinic:
        query = query.where(Image.source.like(_escape_like(where.clinic.strip("/")) + "/%",
                                              escape="\\"))
    if where.search:
        query = query.where(Image.source.like("%" + _escape_like(where.search) + "%",
                                              escape="\\"))
    if where.prefixes:
        query = query.where(or_(*(Image.source.like(_escape_like(p) + "%", escape="\\")
                                  for p in where.prefixes)))
    return query


def worklist(session: Session, where: WorklistFilter, *, limit: int, offset: int) -> list[Image]:
    """A page of images: unreviewed flagged first, then the rest, highest probability first.

    The order is the columns of `ix_images_worklist` walked backwards, so a page is an index
    walk on both databases. Images without a probability (not screened, rejected) come after the
    screened rest on SQLite and before it on PostgreSQL (where NULL sorts high); an explicit
    NULLS LAST would cost PostgreSQL a sort of the whole table per page, since SQLite's indexes
    cannot say NULLS LAST and the schema keeps one index for both.
    """
    query = _filtered(select(Image), where).order_by(
        Image.needs_review.desc(), Image.melanoma_probability.desc(),
        Image.id.desc()).limit(limit).offset(offset)
    return list(session.scalars(query))


def worklist_count(session: Session, where: WorklistFilter) -> int:
    """How many images the filter matches."""
    return int(session.scalar(_filtered(select(func.count()).select_from(Image), where)) or 0)


def latest_predictions(session: Session, image_ids: Sequence[int]) -> dict[int, Prediction]:
    """The latest prediction of each of these images that has one."""
    if not image_ids:
        return {}
    newest = (select(func.max(Prediction.id)).where(Prediction.image_id.in_(image_ids))
              .group_by(Prediction.image_id).scalar_subquery())
    return {p.image_id: p for p in session.scalars(select(Prediction).where(Prediction.id.in_(newest)))}


def latest_prediction(session: Session, image_id: int) -> Prediction | None:
    """The image's latest prediction, if it has one."""
    return session.scalars(select(Prediction).where(Prediction.image_id == image_id)
                           .order_by(Prediction.id.desc()).limit(1)).one_or_none()


def clinics(session: Session, limit: int = 200) -> list[str]:
    """The inbox's top-level subfolders that images arrived under (for the clinic filter)."""
    # The text before the first '/', in SQL: one pass, no names sent to Python.
    slash = (func.strpos(Image.source, "/") if session.get_bind().dialect.name == "postgresql"
             else func.instr(Image.source, "/"))
    folder = func.substr(Image.source, 1, slash - 1)
    return list(session.scalars(select(folder).where(slash > 1).group_by(folder)
                                .order_by(folder).limit(limit)))


# ---- a case -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class AlertRow:
    """One alert email about an image, and its delivery."""

    recipient: str
    subject: str
    status: str
    attempts: int
    last_error: str | None
    created_at: datetime
    sent_at: datetime | None
    tries: list[tuple[datetime, str, str | None]] = field(default_factory=list)


@dataclass(frozen=True)
class Case:
    """Everything the case page shows about one image."""

    image: Image
    duplicates: list[Duplicate]
    predictions: list[Prediction]  # newest first, every model version
    alerts: list[AlertRow]
    reviews: list[ReviewRow]


def find_case(session: Session, sha256: str) -> Case | None:
    """The case of the image with this content, if it is known."""
    image = session.scalars(select(Image).where(Image.sha256 == sha256)).one_or_none()
    if image is None:
        return None
    duplicates = list(session.scalars(select(Duplicate).where(Duplicate.image_id == image.id)
                                      .order_by(Duplicate.received_at)))
    predictions = list(session.scalars(select(Prediction).where(Prediction.image_id == image.id)
                                       .order_by(Prediction.id.desc())))
    messages = list(session.scalars(
        select(OutboxMessage).join(AlertImage, AlertImage.outbox_id == OutboxMessage.id)
        .where(AlertImage.image_id == image.id).order_by(OutboxMessage.created_at, OutboxMessage.id)))
    tries: dict[int, list[tuple[datetime, str, str | None]]] = {}
    if messages:
        for attempt in session.scalars(select(DeliveryAttempt).where(
                DeliveryAttempt.outbox_id.in_([m.id for m in messages])).order_by(DeliveryAttempt.at)):
            tries.setdefault(attempt.outbox_id, []).append((attempt.at, attempt.outcome, attempt.detail))
    alerts = [AlertRow(m.recipient, m.subject, m.status.value, m.attempts, m.last_error,
                       m.created_at, m.sent_at, tries.get(m.id, [])) for m in messages]
    return Case(image, duplicates, predictions, alerts, reviews_of(session, image.id))


# ---- the model in use -------------------------------------------------------------------------

@dataclass
class VersionFigures:
    """How one model version fares against the reviewers' verdicts."""

    model_version: str
    alerts: int = 0  # flagged predictions
    reviewed: int = 0  # of those, with a review
    referred: int = 0  # of those reviewed, the latest verdict `refer`
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


def performance(session: Session) -> list[VersionFigures]:
    """Per model version, from each image's latest review of that version's prediction."""
    newest = (select(func.max(Review.id)).where(Review.prediction_id.is_not(None))
              .group_by(Review.prediction_id).scalar_subquery())
    verdicts = {r.prediction_id: r for r in session.scalars(select(Review).where(Review.id.in_(newest)))}
    figures: dict[str, VersionFigures] = {}
    rows = session.execute(select(Prediction.id, Prediction.model_version, Prediction.flagged,
                                  Prediction.predicted_class)
                           .where(or_(Prediction.flagged.is_(True),
                                      Prediction.id.in_(select(Review.prediction_id)))))
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


def images_by_ids(session: Session, ids: Sequence[int]) -> list[Image]:
    """These images, by id."""
    return list(session.scalars(select(Image).where(Image.id.in_(ids)))) if ids else []



