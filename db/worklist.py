"""The worklist: a filtered, paged walk of the images in review order, and the clinics to filter by.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, false, func, or_, select
from sqlalchemy.orm import Session

from db._sql import escape_like
from db.schema import Image, ImageStatus


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
        query = query.where(Image.source.like(escape_like(where.clinic.strip("/")) + "/%",
                                              escape="\\"))
    if where.search:
        query = query.where(Image.source.like("%" + escape_like(where.search) + "%",
                                              escape="\\"))
    if where.prefixes:
        query = query.where(or_(*(Image.source.like(escape_like(p) + "%", escape="\\")
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


def clinics(session: Session, limit: int = 200) -> list[str]:
    """The inbox's top-level subfolders that images arrived under (for the clinic filter)."""
    # The text before the first '/', in SQL: one pass, no names sent to Python.
    slash = (func.strpos(Image.source, "/") if session.get_bind().dialect.name == "postgresql"
             else func.instr(Image.source, "/"))
    folder = func.substr(Image.source, 1, slash - 1)
    return list(session.scalars(select(folder).where(slash > 1).group_by(folder)
                                .order_by(folder).limit(limit)))


def _visible(query: Select[Any], prefixes: tuple[str, ...]) -> Select[Any]:
    if prefixes:
        query = query.where(or_(*(Image.source.like(escape_like(p) + "%", escape="\\")
                                  for p in prefixes)))
    return query


def _after(image: Image) -> Any:
    """Rows after this image in the worklist's order (needs_review, probability, id; all descending)."""
    same = Image.needs_review.is_(bool(image.needs_review))
    return or_(Image.needs_review.is_(False) if image.needs_review else false(),
               same & (Image.melanoma_probability < image.melanoma_probability),
               same & (Image.melanoma_probability == image.melanoma_probability) & (Image.id < image.id))


def _before(image: Image) -> Any:
    """Rows before this image in the worklist's order."""
    same = Image.needs_review.is_(bool(image.needs_review))
    return or_(false() if image.needs_review else Image.needs_review.is_(True),
               same & (Image.melanoma_probability > image.melanoma_probability),
               same & (Image.melanoma_probability == image.melanoma_probability) & (Image.id > image.id))


_FORWARD = (Image.needs_review.desc(), Image.melanoma_probability.desc(), Image.id.desc())
_BACKWARD = (Image.needs_review.asc(), Image.melanoma_probability.asc(), Image.id.asc())


def neighbours(session: Session, image: Image,
               prefixes: tuple[str, ...] = ()) -> tuple[Image | None, Image | None]:
    """The screened images just before and just after this one in the worklist's order (the
    case page's previous and next), among sources under `prefixes` when given; (None, None)
    for an image without a probability (not screened, rejected)."""
    if image.melanoma_probability is None:
        return None, None
    screened = _visible(select(Image).where(Image.melanoma_probability.is_not(None)), prefixes)
    before = session.scalars(screened.where(_before(image)).order_by(*_BACKWARD).limit(1)).first()
    after = session.scalars(screened.where(_after(image)).order_by(*_FORWARD).limit(1)).first()
    return before, after


def next_unreviewed(session: Session, image: Image | None,
                    prefixes: tuple[str, ...] = ()) -> Image | None:
    """The flagged unreviewed image to read after this one: the next in the worklist's order
    (highest probability first), else the first from the top; None when none is left."""
    waiting = _visible(select(Image).where(Image.needs_review.is_(True)), prefixes)
    if image is not None:
        waiting = waiting.where(Image.id != image.id)
        if image.melanoma_probability is not None:
            later = session.scalars(waiting.where(
                or_(Image.melanoma_probability < image.melanoma_probability,
                    (Image.melanoma_probability == image.melanoma_probability) & (Image.id < image.id)))
                .order_by(*_FORWARD).limit(1)).first()
            if later is not None:
                return later
    return session.scalars(waiting.order_by(*_FORWARD).limit(1)).first()


def unreviewed_count(session: Session, prefixes: tuple[str, ...] = ()) -> int:
    """How many flagged images under `prefixes` wait for a review."""
    return int(session.scalar(_visible(select(func.count()).select_from(Image)
                                       .where(Image.needs_review.is_(True)), prefixes)) or 0)
