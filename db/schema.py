"""The database schema (SQLAlchemy 2 declarative); every change here is an Alembic revision."""

from __future__ import annotations

from datetime import UTC, date, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class ImageStatus(StrEnum):
    """Where an image is in the pipeline; the last three are final."""

    QUEUED = "queued"
    SCREENING = "screening"
    SCREENED = "screened"
    REJECTED = "rejected"
    FAILED = "failed"


class OutboxKind(StrEnum):
    """What an outbox message is."""

    ALERT = "alert"
    DIGEST = "digest"


class OutboxStatus(StrEnum):
    """Where an outbox message is; `sent` and `failed` are final (until `alerts retry`)."""

    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"


def _enum_column(enum: type[StrEnum]) -> Enum:
    """Stored as the values' text in a VARCHAR(16), as before the enums existed; the CHECK
    constraints stay the named ones of the migrations."""
    return Enum(enum, native_enum=False, create_constraint=False, length=16,
                values_callable=lambda members: [member.value for member in members],
                validate_strings=True)


def _in(enum: type[StrEnum]) -> str:
    """`status IN ('queued', ...)`: the CHECK constraint's text, from the enum."""
    return "IN (" + ", ".join(f"'{member.value}'" for member in enum) + ")"

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, on SQLite (naive storage) and PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base with stable constraint names (Alembic needs them)."""

    metadata = MetaData(naming_convention=NAMING)


class Verdict(StrEnum):
    """A dermatologist's verdict on an image."""

    REFER = "refer"  # biopsy or excision recommended
    BENIGN = "benign"  # no action
    NOT_ASSESSABLE = "not_assessable"  # the image is unusable


class Role(StrEnum):
    """What a review-app account may do: admins also manage accounts."""

    REVIEWER = "reviewer"
    ADMIN = "admin"


class Image(Base):
    """One distinct image content (by SHA-256), as it arrived and where it is now."""

    __tablename__ = "images"
    __table_args__ = (
        CheckConstraint(f"status {_in(ImageStatus)}", name="status"),
        # The worklist's order: unreviewed flagged images first, highest probability first.
        Index("ix_images_worklist", "needs_review", "melanoma_probability", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    source: Mapped[str] = mapped_column(String(1024))  # the name it arrived under, inbox-relative
    size_bytes: Mapped[int] = mapped_column(Integer)
    location: Mapped[str] = mapped_column(String(1024))  # absolute path of the file now
    status: Mapped[ImageStatus] = mapped_column(_enum_column(ImageStatus), default=ImageStatus.QUEUED,
                                                index=True)
    reason: Mapped[str | None] = mapped_column(Text, default=None)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    claim_token: Mapped[str | None] = mapped_column(String(64), default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    screened_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    # The latest prediction's answer and the latest review, copied here so that the worklist
    # filters and pages on indexed columns of one table (revision 0004).
    melanoma_probability: Mapped[float | None] = mapped_column(Float, default=None)
    flagged: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false(), index=True)
    reviewed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None, index=True)
    #: flagged and not reviewed since it was last screened: the worklist's first group.
    needs_review: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    #: When the one reminder about this flagged, unreviewed image was written (revision 0005).
    escalated_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)

    predictions: Mapped[list[Prediction]] = relationship(back_populates="image")
    duplicates: Mapped[list[Duplicate]] = relationship(back_populates="image")


class Duplicate(Base):
    """A later arrival of content already known; the file is kept aside, never screened again."""

    __tablename__ = "duplicates"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), index=True)
    source: Mapped[str] = mapped_column(String(1024))
    location: Mapped[str] = mapped_column(String(1024))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    image: Mapped[Image] = relationship(back_populates="duplicates")


class Prediction(Base):
    """The model's answer for one image; at most one per image and model version."""

    __tablename__ = "predictions"
    __table_args__ = (UniqueConstraint("image_id", "model_version", name="uq_predictions_image"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), index=True)
    model_version: Mapped[str] = mapped_column(String(128))
    probabilities: Mapped[dict[str, Any]] = mapped_column(JSON)  # class name -> probability, 9
    melanoma_probability: Mapped[float] = mapped_column(Float)
    predicted_class: Mapped[str] = mapped_column(String(64))
    threshold: Mapped[float] = mapped_column(Float)
    flagged: Mapped[bool] = mapped_column(Boolean, index=True)  # p >= threshold and in scope
    #: Not like a dermoscopic lesion image (the model's scope rule): its class scores mean
    #: nothing, so it is never flagged; the probabilities are kept all the same.
    out_of_scope: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    #: How unlike the training images it is (model.scope); None for a model without that output.
    scope_distance: Mapped[float | None] = mapped_column(Float, default=None)
    seconds: Mapped[float] = mapped_column(Float)  # wall time per image: batch time / batch size
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    image: Mapped[Image] = relationship(back_populates="predictions")


class OutboxMessage(Base):
    """One email to one recipient: written in the transaction that decided it, sent afterwards.

    Alerts are composed on first delivery (the Grad-CAM overlay needs the model) and the bytes
    kept in `raw`, so every retry sends the same message with the same Message-ID.
    """

    __tablename__ = "outbox"
    __table_args__ = (
        CheckConstraint(f"kind {_in(OutboxKind)}", name="kind"),
        CheckConstraint(f"status {_in(OutboxStatus)}", name="status"),
        UniqueConstraint("message_id", "recipient", name="uq_outbox_message_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[OutboxKind] = mapped_column(_enum_column(OutboxKind))
    recipient: Mapped[str] = mapped_column(String(320))
    message_id: Mapped[str] = mapped_column(String(255))  # "<...@...>", the same on every resend
    subject: Mapped[str] = mapped_column(Text)
    status: Mapped[OutboxStatus] = mapped_column(_enum_column(OutboxStatus),
                                                 default=OutboxStatus.PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    raw: Mapped[bytes | None] = mapped_column(LargeBinary, default=None)  # RFC 5322 bytes
    digest_date: Mapped[date | None] = mapped_column(Date, default=None)
    #: Why an alert is sent beside the first one: 're-screen' (a new model's new flag) or
    #: 'reminder' (still unreviewed); None: a first alert (revision 0005).
    label: Mapped[str | None] = mapped_column(String(32), default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    claim_token: Mapped[str | None] = mapped_column(String(64), default=None)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)


class AlertImage(Base):
    """Which flagged images (and predictions) one alert message is about."""

    __tablename__ = "alert_images"

    outbox_id: Mapped[int] = mapped_column(ForeignKey("outbox.id"), primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), primary_key=True, index=True)
    prediction_id: Mapped[int] = mapped_column(ForeignKey("predictions.id"))


class Digest(Base):
    """One row per digest date, inserted before anything is sent: the exactly-once guard."""

    __tablename__ = "digests"

    day: Mapped[date] = mapped_column(Date, primary_key=True)
    period_start: Mapped[datetime] = mapped_column(UTCDateTime)
    period_end: Mapped[datetime] = mapped_column(UTCDateTime)
    recipients: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class DeliveryAttempt(Base):
    """Every try to hand an outbox message over: when, how it ended, the server's words."""

    __tablename__ = "delivery_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    outbox_id: Mapped[int] = mapped_column(ForeignKey("outbox.id"), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    outcome: Mapped[str] = mapped_column(String(16))  # sent, deferred, rejected, error
    detail: Mapped[str | None] = mapped_column(Text, default=None)


class User(Base):
    """A review-app account; never deleted (reviews and the audit log name it), only disabled."""

    __tablename__ = "users"
    __table_args__ = (CheckConstraint(f"role {_in(Role)}", name="role"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    email: Mapped[str] = mapped_column(String(320))
    role: Mapped[Role] = mapped_column(_enum_column(Role), default=Role.REVIEWER)
    password_hash: Mapped[str] = mapped_column(String(255))  # argon2id, PHC string
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    #: Wrong passwords in a row; at 5 the account is locked until `locked_until`.
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    #: Source prefixes (clinics) the worklist shows by default, one per line; '' = every image.
    prefixes: Mapped[str] = mapped_column(Text, default="", server_default="")


class Review(Base):
    """A dermatologist's verdict on an image: append-only; a later one supersedes, both stay."""

    __tablename__ = "reviews"
    __table_args__ = (CheckConstraint(f"verdict {_in(Verdict)}", name="verdict"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), index=True)
    reviewer_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    #: The prediction the reviewer saw (the latest one), for the per-model-version figures.
    prediction_id: Mapped[int | None] = mapped_column(ForeignKey("predictions.id"), default=None)
    verdict: Mapped[Verdict] = mapped_column(_enum_column(Verdict))
    diagnosis: Mapped[str | None] = mapped_column(String(64), default=None)
    note: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class AuditEvent(Base):
    """Who did what, when, in the review app (page views, reviews, logins, account changes)."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), default=None)
    username: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(32))  # view_image, review, login, login_failed, ...
    image_id: Mapped[int | None] = mapped_column(ForeignKey("images.id"), default=None, index=True)
    detail: Mapped[str | None] = mapped_column(Text, default=None)


class WebSession(Base):
    """A review-app login, kept on the server so that logging out, a new password or a disabled
    account ends it; the browser holds only a random token, at a path only this session uses."""

    __tablename__ = "web_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: SHA-256 (hex) of the cookie's token: a copy of the table logs nobody in.
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    #: The secret path segment (`/s/<path_key>/`) the cookie is scoped to.
    path_key: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    csrf: Mapped[str] = mapped_column(String(64))
    #: SHA-256 (hex) of the user's password hash at login: a new password ends the session.
    credential_stamp: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class DicomInstance(Base):
    """The patient and study of an image that came as DICOM (one row per image, none for
    picture files). With pseudonymised intake `patient_id` is a keyed hash and the name is None.
    Acquisition time is the object's own text (`2026-12-04 10:15:30`): DICOM gives it on the
    modality's clock, with no zone."""

    __tablename__ = "dicom_instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), unique=True)
    patient_id: Mapped[str | None] = mapped_column(String(128), default=None, index=True)
    patient_name: Mapped[str | None] = mapped_column(String(256), default=None)
    study_uid: Mapped[str | None] = mapped_column(String(64), default=None, index=True)
    series_uid: Mapped[str | None] = mapped_column(String(64), default=None)
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64), default=None, index=True)
    sop_class_uid: Mapped[str | None] = mapped_column(String(64), default=None)
    accession_number: Mapped[str | None] = mapped_column(String(64), default=None)
    body_part: Mapped[str | None] = mapped_column(String(64), default=None)
    anatomic_region: Mapped[str | None] = mapped_column(String(256), default=None)
    laterality: Mapped[str | None] = mapped_column(String(16), default=None)
    acquired_at: Mapped[str | None] = mapped_column(String(32), default=None)
    pseudonymised: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
