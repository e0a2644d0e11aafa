"""The worklist: a filtered, paged walk of the images in review order, and the clinics to filter by.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, func, or_, select
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
