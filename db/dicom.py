"""The patient and study of images that came as DICOM: recorded at intake, read by the read
model (`results`, the API) and the case page (a patient's other images)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from sqlalchemy import bindparam, insert, select
from sqlalchemy.orm import Session

from db._sql import in_chunks
from db.schema import DicomInstance, Image

#: The columns a caller may give `add_instance` (every other column of the row is ours).
FIELDS = ("patient_id", "patient_name", "study_uid", "series_uid", "sop_instance_uid",
          "sop_class_uid", "accession_number", "body_part", "anatomic_region", "laterality",
          "acquired_at", "pseudonymised")


#: Built once: a statement made per call costs more than the INSERT it makes.
_INSERT_INSTANCE = insert(DicomInstance)
_IMAGE_OF_SOP_INSTANCE = (select(DicomInstance.image_id)
                          .where(DicomInstance.sop_instance_uid == bindparam("sop_instance_uid"))
                          .order_by(DicomInstance.image_id).limit(1))


def add_instance(session: Session, image_id: int, **values: object) -> None:
    """Record the DICOM facts of a new image (in the intake's transaction), at once: one
    INSERT, so a locked or full database fails here (the intake's flush, without its cost)."""
    unknown = set(values) - set(FIELDS)
    if unknown:
        raise TypeError(f"not a DICOM instance column: {', '.join(sorted(unknown))}")
    row = dict.fromkeys(FIELDS)
    row.update(values, image_id=image_id, pseudonymised=bool(values.get("pseudonymised")))
    session.execute(_INSERT_INSTANCE, [row])


def image_of_sop_instance(session: Session, sop_instance_uid: str) -> Image | None:
    """The image recorded for this DICOM object (its SOP instance UID), if there is one."""
    image_id = session.execute(_IMAGE_OF_SOP_INSTANCE,
                               {"sop_instance_uid": sop_instance_uid}).scalar()
    return None if image_id is None else session.get(Image, image_id)


def instances_of(session: Session, image_ids: Iterable[int]) -> dict[int, DicomInstance]:
    """image id -> its DICOM facts, for those of these images that came as DICOM."""
    found: dict[int, DicomInstance] = {}
    for chunk in in_chunks(list(image_ids)):
        for instance in session.scalars(select(DicomInstance)
                                        .where(DicomInstance.image_id.in_(chunk))):
            found[instance.image_id] = instance
    return found


def other_images_of_patient(session: Session, image_id: int, *,
                            limit: int = 50) -> Sequence[tuple[Image, DicomInstance]]:
    """The patient's other DICOM images (newest acquisition first), with their facts; none when
    the image has no DICOM patient ID."""
    patient = session.scalar(select(DicomInstance.patient_id)
                             .where(DicomInstance.image_id == image_id))
    if not patient:
        return []
    query = (select(Image, DicomInstance).join(DicomInstance, DicomInstance.image_id == Image.id)
             .where(DicomInstance.patient_id == patient, Image.id != image_id)
             .order_by(DicomInstance.acquired_at.desc(), Image.received_at.desc(), Image.id.desc())
             .limit(limit))
    return list(session.execute(query).tuples())
