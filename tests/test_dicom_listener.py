"""The DICOM listener of a real `melanoscreen up`, with pynetdicom as the sending modality: C-ECHO,
unknown callers refused at association, C-STOREd objects screened once with their study, bad
objects rejected with reasons, a sender killed mid-association, no identifier in emails or logs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from email import policy
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import pytest
from pydicom import uid
from sqlalchemy import create_engine, text

from melanoscreen.cli.supervisor import free_port
from scheduler.listener import request_association
from tests.conftest import REPO, wait_until
from tests.dicom_fixtures import (
    BIRTH_DATE,
    PATIENT_ID,
    PATIENT_NAME,
    bomb_dataset,
    dicom_bytes,
    dicom_dataset,
    modality,
)

pytestmark = pytest.mark.slow

SYNTAXES = (uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian, uid.JPEGBaseline8Bit,
            uid.RLELossless, uid.JPEG2000Lossless, uid.JPEGLSLossless, uid.JPEGLSNearLossless,
            uid.JPEG2000)
KINDS = ("photographic", "microscopic", "secondary")


@dataclass
class RunningUp:
    """`melanoscreen up` with its listener on `port`."""

    data_dir: Path
    env: dict[str, str]
    port: int
    log: Path
    tmp: Path

    def rows(self, sql: str, **params: Any) -> list[Any]:
        """A read query on its database."""
        engine = create_engine(f"sqlite:///{self.data_dir / 'melanoscreen.db'}")
        try:
            with engine.connect() as connection:
                return list(connection.execute(text(sql), params))
        finally:
            engine.dispose()

    def screened_by_sop(self, sop_uids: list[str]) -> dict[str, list[str]]:
        """SOP instance UID -> statuses of the image rows recorded for it."""
        found: dict[str, list[str]] = {}
        for row in self.rows("SELECT d.sop_instance_uid, i.status FROM dicom_instances d "
                             "JOIN images i ON i.id = d.image_id"):
            if row[0] in sop_uids:
                found.setdefault(row[0], []).append(row[1])
        return found

    def results(self) -> list[dict[str, Any]]:
        """`melanoscreen results --format json`."""
        done = subprocess.run([sys.executable, "-m", "melanoscreen", "results", "--format", "json"],
                              env=self.env, capture_output=True, text=True, check=True,
                              timeout=120, cwd=self.tmp)
        return list(json.loads(done.stdout))


def _env(data_dir: Path, model: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MELANOSCREEN_")}
    env.update({"MELANOSCREEN_DATA_DIR": str(data_dir), "MELANOSCREEN_MODEL": str(model),
                "MELANOSCREEN_BATCH_DELAY": "0.1", "MELANOSCREEN_WORKER_CONCURRENCY": "1",
                "MELANOSCREEN_STABLE_SECONDS": "0.5", "MELANOSCREEN_RESCAN_INTERVAL": "2",
                "MELANOSCREEN_FLOWER_PORT": str(free_port()),
                "MELANOSCREEN_WEB_PORT": str(free_port()),
                "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def _echo(port: int, ae_title: str = "MODALITY1", called: str = "MELANOSCREEN",
          bind: str | None = None) -> str:
    """'ok' (C-ECHO answered), 'refused' (association rejected) or 'down'."""
    kwargs: dict[str, Any] = {"ae_title": called}
    if bind is not None:
        kwargs["bind_address"] = (bind, 0)
    assoc, refused = request_association(modality(ae_title), "127.0.0.1", port, **kwargs)
    if refused:
        return "refused"
    if not assoc.is_established:
        return "down"
    try:
        status = assoc.send_c_echo()
        return "ok" if status and status.Status == 0x0000 else "down"
    finally:
        assoc.release()


@pytest.fixture(scope="module")
def running_up(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[RunningUp]:
    """One `up` with the listener (peers MODALITY1 from loopback, PACS from anywhere, PINNED
    only from 127.0.0.3); every screened image alerts (threshold 0) into outbox/ `.eml` files."""
    tmp = tmp_path_factory.mktemp("dicom-up")
    data_dir = tmp / "data"
    port = free_port()
    env = _env(data_dir, tiny_model, MELANOSCREEN_DICOM_PORT=str(port),
               MELANOSCREEN_DICOM_PEERS="MODALITY1@127.0.0.1,PACS,PINNED@127.0.0.3",
               MELANOSCREEN_ALERT_THRESHOLD="0",
               MELANOSCREEN_ALERT_RECIPIENTS="derm@clinic.example")
    log = tmp / "up.log"
    with open(log, "wb") as out:
        up = subprocess.Popen([sys.executable, "-m", "melanoscreen", "up"], cwd=tmp, env=env,
                              stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: _echo(port) == "ok", timeout=180, interval=0.5,
                   message=f"the DICOM listener\n{log.read_text(errors='replace')[-3000:]}")
        yield RunningUp(data_dir, env, port, log, tmp)
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(timeout=90)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()


def test_echo_answers_and_callers_not_listed_are_refused_at_association(
        running_up: RunningUp) -> None:
    port = running_up.port
    assert _echo(port) == "ok"
    assert _echo(port, "PACS") == "ok"
    assert _echo(port, "INTRUDER") == "refused"
    assert _echo(port, "PINNED") == "refused"  # listed, but only from 127.0.0.3
    assert _echo(port, "PINNED", bind="127.0.0.3") == "ok"
    assert _echo(port, "MODALITY1", called="SOMEONE_ELSE") == "refused"
    assert "refused a DICOM association from AE title 'INTRUDER'" in running_up.log.read_text()
    # The container health check: an answer (here a refusal) from the listener is health.
    check = subprocess.run([sys.executable, "-m", "melanoscreen", "healthcheck", "dicom"],
                           env=running_up.env, capture_output=True, text=True, timeout=120,
                           cwd=running_up.tmp)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "'HEALTHCHECK'" not in running_up.log.read_text()  # probes are not logged as refusals


def test_stored_objects_are_screened_once_with_their_study_and_bad_ones_rejected_with_reasons(
        running_up: RunningUp) -> None:
    studies = [uid.generate_uid(), uid.generate_uid()]
    good = [dicom_dataset(100 + n, kind=KINDS[n % 3], syntax=SYNTAXES[n % len(SYNTAXES)],
                          grey=n % 4 == 3, study_uid=studies[n % 2], accession=f"ACC{n:04d}")
            for n in range(20)]
    bomb = bomb_dataset()
    malformed = dicom_dataset(98)
    malformed.PixelData = malformed.PixelData[: len(malformed.PixelData) // 2]
    assoc = modality("MODALITY1").associate("127.0.0.1", running_up.port, ae_title="MELANOSCREEN")
    assert assoc.is_established
    try:
        statuses = [assoc.send_c_store(ds).Status for ds in [*good, bomb, malformed]]
    finally:
        assoc.release()
    assert statuses == [0x0000] * 22  # stored: the worker, not the network, judges the pixels
    wanted = {str(ds.SOPInstanceUID): ds for ds in good}
    bad = {str(bomb.SOPInstanceUID): "too many pixels: DICOM 60000x60000x1",
           str(malformed.SOPInstanceUID): "DICOM pixel data cannot be decoded"}

    def finished() -> list[dict[str, Any]] | None:
        rows = [r for r in running_up.results() if r["sop_instance_uid"] in {*wanted, *bad}]
        final = [r for r in rows if r["status"] in ("screened", "rejected", "failed")]
        return rows if len(final) == 22 else None

    rows = wait_until(finished, timeout=300, interval=1.0, message="22 stored objects finished")
    by_sop = {row["sop_instance_uid"]: row for row in rows}
    assert len(by_sop) == len(rows) == 22  # each object once
    for sop, ds in wanted.items():
        row = by_sop[sop]
        assert row["status"] == "screened", row
        assert row["study_uid"] == ds.StudyInstanceUID and row["patient_id"] == PATIENT_ID
        assert row["source"].startswith("dicom/MODALITY1/") and row["source"].endswith(".dcm")
    for sop, reason in bad.items():
        assert by_sop[sop]["status"] == "rejected"
        assert by_sop[sop]["reason"].startswith(reason), by_sop[sop]


def test_a_sender_killed_mid_association_loses_nothing_acknowledged_and_a_retry_stores_once(
        running_up: RunningUp, tmp_path: Path) -> None:
    files = []
    for n in range(10):
        path = tmp_path / f"big-{n}.dcm"
        # ~430 KB each: the kill lands while an object is on the wire, most likely.
        path.write_bytes(dicom_bytes(dicom_dataset(300 + n, size=(384, 384), accession="ACCBIG")))
        files.append(path)
    sender = subprocess.Popen([sys.executable, str(REPO / "tests" / "dicom_sender.py"),
                               str(running_up.port), "MODALITY1", "MELANOSCREEN",
                               *map(str, files)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    acknowledged = []
    assert sender.stdout is not None
    for line in sender.stdout:
        if line.startswith("stored "):
            acknowledged.append(line.split()[1])
        if len(acknowledged) == 3:
            sender.kill()
            break
    sender.wait(timeout=60)
    assert len(acknowledged) == 3, "the sender stopped before three acknowledgements"
    sops = {path.name: _sop_of(path) for path in files}
    # Every object acknowledged before the kill is screened.
    wait_until(lambda: all(running_up.screened_by_sop([sops[n]]).get(sops[n]) == ["screened"]
                           for n in acknowledged), timeout=300, interval=1.0,
               message="the acknowledged objects screened")
    # The sender retries everything (as a modality does whose objects were not all confirmed).
    resend = subprocess.run([sys.executable, str(REPO / "tests" / "dicom_sender.py"),
                             str(running_up.port), "MODALITY1", "MELANOSCREEN",
                             *map(str, files)], capture_output=True, text=True, cwd=REPO,
                            timeout=300)
    assert resend.returncode == 0, resend.stdout + resend.stderr
    every = list(sops.values())
    wait_until(lambda: (lambda found: len(found) == 10 and all(
        s == ["screened"] for s in found.values()))(running_up.screened_by_sop(every)),
        timeout=300, interval=1.0, message="every object screened exactly once")
    duplicates = running_up.rows(
        "SELECT COUNT(*) FROM duplicates u JOIN dicom_instances d ON d.image_id = u.image_id "
        "WHERE d.accession_number = 'ACCBIG'")[0][0]
    assert duplicates >= 3  # the retried objects were recorded as duplicates, not screened again
    # Nothing half-written is left visible in the inbox.
    folder = running_up.data_dir / "inbox" / "dicom" / "MODALITY1"
    wait_until(lambda: not any(folder.iterdir()), timeout=60,
               message=f"an empty listener folder: {sorted(p.name for p in folder.iterdir())}")


def _sop_of(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_no_patient_identifier_reaches_an_email_or_the_log(running_up: RunningUp) -> None:
    outbox = running_up.data_dir / "outbox"
    emails = wait_until(lambda: sorted(outbox.glob("*.eml")) if outbox.is_dir() and any(
        outbox.glob("*.eml")) else None, timeout=300, interval=1.0, message="alert emails")
    raw_markers = [PATIENT_ID, PATIENT_NAME, PATIENT_NAME.split("^")[0] + "^", BIRTH_DATE]
    words = ["Quentin", "Jane", "Doe", BIRTH_DATE, "1961"]
    named_by_accession = False
    for path in emails:
        raw = path.read_bytes()
        for marker in raw_markers:
            assert marker.encode() not in raw, (path.name, marker)
        message = BytesParser(policy=policy.default).parsebytes(raw)
        shown = " ".join(str(value) for value in message.values())
        for part in message.walk():
            if part.get_content_type() in ("text/plain", "text/html"):
                shown += part.get_content()
            elif not part.is_multipart():
                assert part.get_content_type() in ("image/png", "image/jpeg"), \
                    part.get_content_type()  # a picture, never the DICOM object
        for word in words:
            # Whole words: a generated SOP instance UID may hold "1961" among its digits.
            assert not re.search(rf"\b{re.escape(word)}\b", shown), (path.name, word)
        named_by_accession |= "accession ACC" in shown
    assert named_by_accession
    log = running_up.log.read_text(errors="replace")
    for marker in [*raw_markers, *words[:3]]:
        assert marker not in log, marker


def test_pseudonymised_listening_stores_neither_name_nor_patient_id(
        tmp_path: Path, tiny_model: Path) -> None:
    """The listener alone, pseudonymising: what it writes into the inbox keeps no identifier."""
    port = free_port()
    data_dir = tmp_path / "data"
    env = _env(data_dir, tiny_model, MELANOSCREEN_DICOM_PORT=str(port),
               MELANOSCREEN_DICOM_PEERS="MODALITY1", MELANOSCREEN_DICOM_PSEUDONYMISE="true")
    log = tmp_path / "dicom.log"
    with open(log, "wb") as out:
        listener = subprocess.Popen([sys.executable, "-m", "melanoscreen", "dicom"], cwd=tmp_path,
                                    env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: _echo(port) == "ok", timeout=120, interval=0.5,
                   message=f"the listener\n{log.read_text(errors='replace')}")
        ds = dicom_dataset(400)
        assoc = modality().associate("127.0.0.1", port, ae_title="MELANOSCREEN")
        try:
            assert assoc.send_c_store(ds).Status == 0x0000
        finally:
            assoc.release()
        stored = list((data_dir / "inbox" / "dicom" / "MODALITY1").glob("*.dcm"))
        assert len(stored) == 1
        raw = stored[0].read_bytes()
        for marker in (PATIENT_ID, "Doe^Jane", BIRTH_DATE):
            assert marker.encode() not in raw
        assert ds.SOPInstanceUID.encode() in raw and b"anon-" in raw
        key = data_dir / "dicom.key"
        assert key.stat().st_mode & 0o777 == 0o600
    finally:
        listener.send_signal(signal.SIGTERM)
        assert listener.wait(timeout=60) == 0
