"""The other images of the same patient and lesion, read from the inbox path
(`clinic/patient/lesion/file` or `clinic/patient/file`): the case page shows them side by side.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from db._sql import escape_like
from db.readmodel import ImageRow, image_rows
from db.schema import Image

#: The most other images the case page shows of one patient.
RELATED_LIMIT = 24


def patient_folder(source: str) -> str | None:
    """The `clinic/patient/` part of a source name, or None when the name has no such folders."""
    parts = source.split("/")
    return "/".join(parts[:2]) + "/" if len(parts) >= 3 and all(parts[:2]) else None


def lesion_folder(source: str) -> str | None:
    """The `clinic/patient/lesion/` part of a source name, or None when it has no lesion folder."""
    parts = source.split("/")
    return "/".join(parts[:3]) + "/" if len(parts) >= 4 and all(parts[:3]) else None


@dataclass(frozen=True)
class PatientImages:
    """The other images of one image's patient: `same_lesion` first, then the patient's rest."""

    patient: str | None  # `clinic/patient/`, None when the name carries no patient
    lesion: str | None  # `clinic/patient/lesion/`, None when the name carries no lesion folder
    same_lesion: list[ImageRow] = field(default_factory=list)
    other_lesions: list[ImageRow] = field(default_factory=list)
    more: bool = False  # there are more than the page shows


def other_images_of_patient(session: Session, image: Image, prefixes: tuple[str, ...] = (),
                            limit: int = RELATED_LIMIT) -> PatientImages:
    """The other images whose names put them under this image's patient folder (among sources
    under `prefixes` when given), oldest first, with their latest prediction and review."""
    patient, lesion = patient_folder(image.source), lesion_folder(image.source)
    if patient is None:
        return PatientImages(None, None)
    query = select(Image).where(Image.source.like(escape_like(patient) + "%", escape="\\"),
                                Image.id != image.id)
    if prefixes:
        query = query.where(or_(*(Image.source.like(escape_like(p) + "%", escape="\\")
                                  for p in prefixes)))
    found = list(session.scalars(query.order_by(Image.received_at, Image.id).limit(limit + 1)))
    rows = image_rows(session, found[:limit])
    same = [row for row in rows if lesion is not None and row.source.startswith(lesion)]
    rest = [row for row in rows if not (lesion is not None and row.source.startswith(lesion))]
    return PatientImages(patient, lesion, same, rest, more=len(found) > limit)
