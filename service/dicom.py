"""DICOM at intake: the patient and study facts of a DICOM file, and pseudonymisation.

TensorFlow-free (pydicom only): the watcher's intake and the listener use it. The pixels are
the worker's (`model.dicom`, through the one decode path of `model.imaging`).

Pseudonymised intake keeps, of the patient, only a keyed hash of the patient ID (HMAC-SHA-256
with a key kept in the data folder, 0600): the same patient gets the same pseudonym, so a
patient's images stay together, and nobody without the key can test a guessed ID against it.
Names, birth dates and the other patient identifiers are dropped.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import IO, Any

logger = logging.getLogger(__name__)

#: The DICOM file preamble (128 bytes) is followed by these four bytes (PS3.10 7.1).
MAGIC = b"DICM"
MAGIC_OFFSET = 128
#: What a pseudonym starts with, so nobody takes it for the hospital's own patient ID.
PSEUDONYM_PREFIX = "anon-"
#: Patient elements that identify someone, dropped by pseudonymisation (PS3.15 E.1-1's patient
#: module): the ID is replaced by its keyed hash, these go.
IDENTIFYING_KEYWORDS = (
    "PatientName", "PatientBirthDate", "PatientBirthTime", "PatientBirthName",
    "OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames", "PatientAddress",
    "PatientMotherBirthName", "PatientTelephoneNumbers", "MilitaryRank", "ReferringPhysicianName",
    "IssuerOfPatientID", "PatientComments", "MedicalRecordLocator", "EthnicGroup",
    "PatientInsurancePlanCodeSequence", "ResponsiblePerson", "PersonName",
)


@dataclass(frozen=True)
class DicomFacts:
    """What the service keeps of a DICOM image's patient and study (the columns of
    `dicom_instances`); every field may be missing from a real object."""

    patient_id: str | None = None
    patient_name: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    sop_instance_uid: str | None = None
    sop_class_uid: str | None = None
    accession_number: str | None = None
    body_part: str | None = None
    anatomic_region: str | None = None
    laterality: str | None = None
    acquired_at: str | None = None
    pseudonymised: bool = False

    def columns(self) -> dict[str, Any]:
        """The facts as `db.dicom.add_instance` takes them."""
        return asdict(self)


def preload() -> None:
    """Import the DICOM reader now (about 0.3 s of a core), at a service's start, so that the
    first DICOM image received does not wait for it."""
    import pydicom  # noqa: F401
    from pydicom import encaps, filereader  # noqa: F401


def starts_like_dicom(head: bytes) -> bool:
    """Whether a file starting with `head` (its first 132 bytes) is a DICOM file."""
    return head[MAGIC_OFFSET:MAGIC_OFFSET + len(MAGIC)] == MAGIC


def _text(dataset: Any, keyword: str, limit: int) -> str | None:
    value = dataset.get(keyword)
    if value is None:
        return None
    text = " ".join(str(value).split())
    return text[:limit] or None


def _acquired(dataset: Any) -> str | None:
    """`2026-12-04 10:15:30` from AcquisitionDateTime, else the acquisition, content or
    series date and time (the modality's clock, as the object gives it)."""
    stamp = _text(dataset, "AcquisitionDateTime", 32)
    if stamp is None:
        for date_kw, time_kw in (("AcquisitionDate", "AcquisitionTime"),
                                 ("ContentDate", "ContentTime"), ("SeriesDate", "SeriesTime"),
                                 ("StudyDate", "StudyTime")):
            day = _text(dataset, date_kw, 8)
            if day:
                stamp = day + (_text(dataset, time_kw, 13) or "")
                break
    if not stamp or len(stamp) < 8 or not stamp[:8].isdigit():
        return None
    text = f"{stamp[:4]}-{stamp[4:6]}-{stamp[6:8]}"
    clock = stamp[8:14]
    if len(clock) >= 4 and clock.isdigit():
        text += f" {clock[:2]}:{clock[2:4]}" + (f":{clock[4:6]}" if len(clock) >= 6 else "")
    return text


def _region(dataset: Any) -> str | None:
    """The anatomic region's meaning (its first code), with its modifiers."""
    sequence = dataset.get("AnatomicRegionSequence")
    if not sequence:
        return None
    item = sequence[0]
    words = _text(item, "CodeMeaning", 128) or _text(item, "CodeValue", 64)
    modifiers = item.get("AnatomicRegionModifierSequence") or []
    extra = [m for m in (_text(mod, "CodeMeaning", 64) for mod in modifiers) if m]
    if words and extra:
        words = f"{words} ({', '.join(extra)})"
    return words[:256] if words else None


def facts_of(dataset: Any) -> DicomFacts:
    """The patient and study facts of a pydicom dataset."""
    meta = getattr(dataset, "file_meta", None)
    sop_class = _text(dataset, "SOPClassUID", 64) or (
        _text(meta, "MediaStorageSOPClassUID", 64) if meta is not None else None)
    sop_instance = _text(dataset, "SOPInstanceUID", 64) or (
        _text(meta, "MediaStorageSOPInstanceUID", 64) if meta is not None else None)
    return DicomFacts(
        patient_id=_text(dataset, "PatientID", 128),
        patient_name=_text(dataset, "PatientName", 256),
        study_uid=_text(dataset, "StudyInstanceUID", 64),
        series_uid=_text(dataset, "SeriesInstanceUID", 64),
        sop_instance_uid=sop_instance, sop_class_uid=sop_class,
        accession_number=_text(dataset, "AccessionNumber", 64),
        body_part=_text(dataset, "BodyPartExamined", 64),
        anatomic_region=_region(dataset),
        laterality=_text(dataset, "ImageLaterality", 16) or _text(dataset, "Laterality", 16),
        acquired_at=_acquired(dataset))


def read_facts(stream: IO[bytes]) -> DicomFacts | None:
    """The facts of the DICOM file open in `stream` (read from its start, pixels skipped);
    None when its header cannot be read (the worker rejects it with the reason)."""
    import pydicom

    try:
        stream.seek(0)
        dataset = pydicom.dcmread(stream, stop_before_pixels=True)
        return facts_of(dataset)
    except Exception as exc:  # a hostile header can fail the parser in any way
        logger.info("DICOM header not readable at intake (%s); the worker will say why",
                    type(exc).__name__)
        return None


def pseudonym(patient_id: str, key: bytes) -> str:
    """`anon-` and the first 32 hex digits of HMAC-SHA-256(key, patient ID)."""
    digest = hmac.new(key, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()
    return PSEUDONYM_PREFIX + digest[:32]


def pseudonymised(facts: DicomFacts, key: bytes) -> DicomFacts:
    """`facts` with the patient ID replaced by its pseudonym and the name dropped."""
    if facts.pseudonymised:
        return facts
    patient = facts.patient_id
    if patient is not None and not patient.startswith(PSEUDONYM_PREFIX):
        patient = pseudonym(patient, key)
    return replace(facts, patient_id=patient, patient_name=None, pseudonymised=True)


def pseudonymise_dataset(dataset: Any, key: bytes) -> None:
    """Drop the patient's identifying elements from a pydicom dataset and replace its patient
    ID by the pseudonym (in place): what the listener stores keeps no identifier."""
    patient = _text(dataset, "PatientID", 128)
    for keyword in IDENTIFYING_KEYWORDS:
        if keyword in dataset:
            delattr(dataset, keyword)
    if patient is not None and not patient.startswith(PSEUDONYM_PREFIX):
        dataset.PatientID = pseudonym(patient, key)
    dataset.PatientIdentityRemoved = "YES"


def pseudonym_key(path: Path) -> bytes:
    """The pseudonyms' key in `path` (32 random bytes, 0600), made on first use and kept."""
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        key = b""
    if len(key) >= 32:
        return key
    fresh = secrets.token_bytes(32)
    partial = path.with_name(f".{path.name}.{os.getpid()}.part")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, fresh)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        # Never replace a key another process made meanwhile: the pseudonyms must not change.
        os.link(partial, path)
    except FileExistsError:
        pass
    finally:
        partial.unlink(missing_ok=True)
    return path.read_bytes()
