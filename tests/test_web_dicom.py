"""The review app with DICOM images: the case page's study (clinical facts first, the patient's
other images, identifiers last), the worker's picture of a DICOM image, the API's new fields."""

from __future__ import annotations

import hashlib
import io
from datetime import UTC, datetime, timedelta
from pathlib import Path

from PIL import Image
from web_fixtures import PASSWORD, LiveApp, live_app

from db import dicom as dicom_queries
from db import images
from service.pictures import store_thumbnail
from tests.dicom_fixtures import dicom_bytes, dicom_dataset, synthetic_pixels

__all__ = ["live_app"]  # the fixture, used by name below

HOSTILE_PATIENT = "<script>alert(1)</script>^Eve"


def _seed_dicom(app: LiveApp, seed: int, *, patient: str, name: str, body_part: str,
                minutes: int) -> str:
    """A DICOM image in the store with its row, its facts, and the worker's picture and
    thumbnail (the latter made as the worker makes it, from the object's pixels)."""
    data = dicom_bytes(dicom_dataset(seed))
    sha = hashlib.sha256(data).hexdigest()
    path = app.store / f"{sha}.dcm"
    path.write_bytes(data)
    previews = app.overlays.with_name("previews")
    previews.mkdir(exist_ok=True)
    Image.fromarray(synthetic_pixels(seed)).save(previews / f"{sha}.jpg")
    assert store_thumbnail(path, sha, app.thumbnails) is not None
    when = datetime.now(UTC) - timedelta(minutes=minutes)
    with app.sessions.begin() as session:
        image = images.add_image(session, sha256=sha, source=f"dicom/PACS/{seed}.dcm",
                                 size_bytes=len(data), location=str(path), received_at=when)
        session.flush()
        dicom_queries.add_instance(session, image.id, patient_id=patient, patient_name=name,
                                   study_uid=f"1.2.826.{seed}", series_uid=f"1.2.826.{seed}.1",
                                   sop_instance_uid=f"1.2.826.{seed}.1.1",
                                   accession_number=f"ACC{seed}", body_part=body_part,
                                   anatomic_region="Upper arm", laterality="L",
                                   acquired_at=f"2026-12-0{seed % 9 + 1} 10:15:30")
    return sha


def test_the_case_page_shows_the_study_facts_first_the_patients_other_images_and_ids_last(
        live_app: LiveApp) -> None:
    first = _seed_dicom(live_app, 1, patient="P-1", name=HOSTILE_PATIENT, body_part="ARM",
                        minutes=5)
    second = _seed_dicom(live_app, 2, patient="P-1", name=HOSTILE_PATIENT, body_part="BACK",
                         minutes=4)
    stranger = _seed_dicom(live_app, 3, patient="P-2", name="Other^Person", body_part="LEG",
                           minutes=3)
    client = live_app.login()
    page = client.get(f"/images/{first}").text
    assert "<h2>Study</h2>" in page and "ACC1" in page and "Upper arm" in page
    assert page.index("Body part") < page.index("Other images of this patient") \
        < page.index("Audit log of this image") < page.index("Patient ID")  # identifiers last
    assert f"/images/{second}" in page and f"/images/{stranger}" not in page
    assert "<script>alert(1)" not in page and "&lt;script&gt;" in page  # escaped
    picture = client.get(f"/images/{first}/file")
    assert picture.status_code == 200 and picture.headers["content-type"] == "image/jpeg"
    thumb = client.get(f"/images/{first}/thumbnail")
    assert thumb.status_code == 200 and Image.open(io.BytesIO(thumb.content)).format == "JPEG"
    # A picture file's page has no study block.
    assert "<h2>Study</h2>" not in client.get(f"/images/{live_app.flagged}").text


def test_the_api_carries_patient_study_and_sop_instance_or_nulls(live_app: LiveApp) -> None:
    sha = _seed_dicom(live_app, 4, patient="P-4", name="A^B", body_part="ARM", minutes=1)
    client = live_app.client()
    one = client.get(f"/api/images/{sha}", auth=("ann", PASSWORD)).json()
    assert (one["patient_id"], one["study_uid"], one["sop_instance_uid"]) == (
        "P-4", "1.2.826.4", "1.2.826.4.1.1")
    listed = client.get("/api/images", params={"limit": 100}, auth=("ann", PASSWORD)).json()
    by_sha = {item["sha256"]: item for item in listed["items"]}
    assert by_sha[sha]["study_uid"] == "1.2.826.4"
    jpeg = by_sha[live_app.flagged]
    assert (jpeg["patient_id"], jpeg["study_uid"], jpeg["sop_instance_uid"]) == (None, None, None)


def test_a_dicom_image_without_a_picture_yet_is_not_shown_raw(live_app: LiveApp) -> None:
    sha = _seed_dicom(live_app, 5, patient="P-5", name="A^B", body_part="ARM", minutes=1)
    (live_app.overlays.with_name("previews") / f"{sha}.jpg").unlink()
    answer = live_app.login().get(f"/images/{sha}/file")
    assert answer.status_code == 404  # never the DICOM object itself
    assert Path(live_app.store / f"{sha}.dcm").exists()
