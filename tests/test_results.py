"""`melanoscreen results` and `status` on a seeded SQLite database, as a user runs them: the
out_of_scope field, and probabilities written so they never read like the threshold."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from db.migrate import upgrade
from db.schema import Image, ImageStatus, Prediction, utcnow
from db.session import make_session_factory
from service.flags import flag_of

REPO = Path(__file__).resolve().parent.parent
TRUNCATED = "corrupt or truncated image: image file is truncated (0 bytes not processed)"


def add(session: Session, source: str, *, p: float | None, threshold: float = 0.05,
        out_of_scope: bool = False, minutes: int = 0, reason: str | None = None) -> None:
    at = utcnow() - timedelta(minutes=60 - minutes)
    status = (ImageStatus.REJECTED if reason else
              ImageStatus.SCREENED if p is not None else ImageStatus.QUEUED)
    image = Image(sha256=uuid.uuid4().hex * 2, source=source, size_bytes=1, location="/nowhere",
                  status=status, reason=reason,
                  received_at=at, attempts=1, screened_at=at if p is not None else None)
    session.add(image)
    session.flush()
    if p is not None:
        session.add(Prediction(
            image_id=image.id, model_version="v2", probabilities={"melanoma": p, "nevus": 1 - p},
            melanoma_probability=p, predicted_class="nevus", threshold=threshold,
            flagged=flag_of(p, threshold, out_of_scope=out_of_scope).flagged, out_of_scope=out_of_scope,
            scope_distance=9.0 if out_of_scope else 0.8, seconds=0.01, created_at=at))


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A data folder whose database holds a close call, two out-of-scope pictures (one above the
    threshold, one below) and a queued one."""
    folder = tmp_path / "data"
    folder.mkdir()
    url = f"sqlite:///{folder / 'melanoscreen.db'}"
    upgrade(url)
    sessions = make_session_factory(url)
    with sessions.begin() as session:
        add(session, "clinic/close-call.jpg", p=0.0503, minutes=1)
        add(session, "clinic/letter-scan.jpg", p=0.97, out_of_scope=True, minutes=2)
        add(session, "clinic/waiting.jpg", p=None, minutes=3)
        add(session, "clinic/blurred-photo.jpg", p=0.01, out_of_scope=True, minutes=4)
        add(session, "clinic/half-copied.jpg", p=None, minutes=5, reason=TRUNCATED)
        add(session, "clinic/notes.txt", p=None, minutes=6, reason="not an image Pillow can read")
    sessions.kw["bind"].dispose()
    return folder


def melanoscreen(data_dir: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MELANOSCREEN_")}
    env.update(MELANOSCREEN_DATA_DIR=str(data_dir),
               MELANOSCREEN_DATABASE_URL=f"sqlite:///{data_dir / 'melanoscreen.db'}",
               MELANOSCREEN_BROKER_URL="redis://127.0.0.1:1/0")
    done = subprocess.run([sys.executable, "-m", "melanoscreen", *args], env=env, cwd=data_dir,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_results_json_adds_out_of_scope_and_keeps_raw_probabilities(data_dir: Path) -> None:
    rows = {r["source"]: r for r in json.loads(melanoscreen(data_dir, "results", "--format", "json"))}
    close, scan, waiting = (rows[f"clinic/{n}.jpg"] for n in ("close-call", "letter-scan", "waiting"))
    assert close["melanoma_probability"] == pytest.approx(0.0503) and close["flagged"] is True
    assert close["out_of_scope"] is False
    # Never silence a melanoma: out of scope and above the threshold is flagged all the same.
    assert scan["out_of_scope"] is True and scan["flagged"] is True
    assert rows["clinic/blurred-photo.jpg"]["flagged"] is False
    assert scan["melanoma_probability"] == pytest.approx(0.97)  # recorded all the same
    assert waiting["out_of_scope"] is None and waiting["flagged"] is None
    assert set(close) >= {"sha256", "source", "status", "reason", "received_at", "screened_at",
                          "predicted_class", "melanoma_probability", "flagged", "model_version"}
    flagged = json.loads(melanoscreen(data_dir, "results", "--flagged", "--format", "json"))
    # Highest melanoma probability first.
    assert [r["source"] for r in flagged] == ["clinic/letter-scan.jpg", "clinic/close-call.jpg"]


def test_results_csv_and_table_write_p_so_it_never_reads_like_the_threshold(data_dir: Path) -> None:
    table = list(csv.DictReader(io.StringIO(melanoscreen(data_dir, "results", "--format", "csv"))))
    by_source = {row["source"]: row for row in table}
    assert list(table[0])[-7:] == ["out_of_scope", "review", "model_versions", "flag_changed",
                                   "patient_id", "study_uid", "sop_instance_uid"]
    assert by_source["clinic/close-call.jpg"]["review"] == ""
    assert by_source["clinic/close-call.jpg"]["melanoma_probability"] == "0.0503"
    assert by_source["clinic/close-call.jpg"]["out_of_scope"] == "False"
    assert by_source["clinic/letter-scan.jpg"]["out_of_scope"] == "True"

    lines = melanoscreen(data_dir, "results").splitlines()
    [close] = [line for line in lines if "close-call" in line]
    [scan] = [line for line in lines if "letter-scan" in line]
    assert "0.0503" in close and close.endswith("ALERT")
    assert "0.970" in scan and "ALERT (Unusual picture: needs a look)" in scan
    assert "Melanoma suspected" not in scan
    [blurred] = [line for line in lines if "blurred-photo" in line]
    assert "OUT OF SCOPE" in blurred and "ALERT" not in blurred


def test_results_are_newest_first_with_zoned_times_and_whole_reasons_in_plain_words(
        data_dir: Path) -> None:
    """`results` listed the oldest first, with times that named no zone and reasons cut at 26
    characters in Pillow's words; the JSON keeps its keys and the recorded reason."""
    rows = json.loads(melanoscreen(data_dir, "results", "--format", "json"))
    assert [r["source"] for r in rows][:3] == ["clinic/notes.txt", "clinic/half-copied.jpg",
                                               "clinic/blurred-photo.jpg"]
    assert rows[1]["reason"] == TRUNCATED and rows[0]["received_at"].endswith("+00:00")

    lines = melanoscreen(data_dir, "results").splitlines()
    body = [line for line in lines[2:] if line.strip()]
    assert "notes.txt" in body[0] and "half-copied" in body[1] and "close-call" in body[-1]
    assert re.match(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\+00:00 ", body[0])
    [notes] = [line for line in lines if "notes.txt" in line]
    assert notes.endswith("not an image file, or a kind of image this service cannot read")
    [half] = [line for line in lines if "half-copied" in line]
    assert "damaged or incomplete" in half and "Pillow" not in half and "truncated (0" not in half

    table = list(csv.DictReader(io.StringIO(melanoscreen(data_dir, "results", "--format", "csv"))))
    assert table[0]["source"] == "clinic/notes.txt"
    assert table[0]["reason"] == "not an image file, or a kind of image this service cannot read"


def test_status_json_counts_out_of_scope_images_under_a_new_key(data_dir: Path) -> None:
    report = json.loads(melanoscreen(data_dir, "status", "--json"))
    assert report["out_of_scope"] == 2 and report["flagged"] == 2
    assert report["counts"] == {"screened": 3, "queued": 1, "rejected": 2}
