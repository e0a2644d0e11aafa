"""DICOM files: read in the one decode path (each image SOP class, each transfer syntax this install
decodes), refused with a reason when they hold nothing to screen; the patient and study kept at
intake, pseudonymised when asked; the listener's settings."""

from __future__ import annotations

import gc
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError
from pydicom import uid
from sqlalchemy import select

from db import dicom as dicom_queries
from db import readmodel
from db.schema import DicomInstance
from db.session import make_session_factory
from melanoscreen.settings import DicomSettings, Settings, describe_error
from model.imaging import DecodeError, decode_image, load_rgb
from scheduler.intake import Intake
from service.dicom import PSEUDONYM_PREFIX, pseudonym, pseudonym_key, pseudonymised, read_facts
from service.reasons import plain_reason
from tests.conftest import synthetic_jpeg, wait_until
from tests.dicom_fixtures import (
    BIRTH_DATE,
    PATIENT_ID,
    PATIENT_NAME,
    SOP_CLASSES,
    bomb_dataset,
    dicom_bytes,
    dicom_dataset,
    malformed_bytes,
    modality,
    multiframe_bytes,
    report_bytes,
    synthetic_pixels,
    waveform_bytes,
)

#: Transfer syntaxes whose decoding is exact; the lossy ones are checked within their bound.
#: (JPEG lossless and JPEG extended are decoded too, but no encoder here makes them.)
LOSSLESS = [uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian,
            uid.DeflatedExplicitVRLittleEndian, uid.RLELossless, uid.JPEG2000Lossless,
            uid.JPEGLSLossless]


@pytest.mark.parametrize("kind", sorted(SOP_CLASSES))
@pytest.mark.parametrize("syntax", LOSSLESS, ids=lambda s: s.keyword)
@pytest.mark.parametrize("grey", [False, True], ids=["colour", "grey"])
def test_each_image_class_and_lossless_syntax_decodes_to_its_pixels(
        kind: str, syntax: uid.UID, grey: bool) -> None:
    picture = np.asarray(load_rgb(dicom_bytes(dicom_dataset(5, kind=kind, syntax=syntax,
                                                            grey=grey))))
    expected = synthetic_pixels(5)
    if grey:
        expected = np.repeat(expected.mean(axis=2).astype(np.uint8)[..., None], 3, axis=2)
    assert picture.shape == (64, 64, 3)
    assert np.array_equal(picture, expected)


@pytest.mark.parametrize("grey", [False, True], ids=["colour", "grey"])
def test_a_jpeg_baseline_object_decodes_close_to_its_pixels(grey: bool) -> None:
    picture = np.asarray(load_rgb(dicom_bytes(dicom_dataset(6, syntax=uid.JPEGBaseline8Bit,
                                                            grey=grey)))).astype(int)
    expected = synthetic_pixels(6).astype(int)
    if grey:
        expected = np.repeat(expected.mean(axis=2).astype(int)[..., None], 3, axis=2)
    assert np.abs(picture - expected).mean() < 12  # JPEG's loss, not a colour-space mix-up


@pytest.mark.parametrize("grey", [False, True], ids=["colour", "grey"])
@pytest.mark.parametrize(("syntax", "worst", "mean"), [(uid.JPEGLSNearLossless, 2, 2.0),
                                                       (uid.JPEG2000, 255, 12.0)],
                         ids=["jpeg-ls-near-lossless", "jpeg-2000-lossy"])
def test_a_lossy_object_decodes_within_its_loss(syntax: uid.UID, worst: int, mean: float,
                                                grey: bool) -> None:
    """JPEG-LS near-lossless keeps every sample within its error bound (2); lossy JPEG 2000
    at 10:1 stays close on average, as JPEG baseline does (a colour-space mix-up would not)."""
    picture = np.asarray(load_rgb(dicom_bytes(dicom_dataset(7, syntax=syntax, grey=grey))))
    expected = synthetic_pixels(7).astype(int)
    if grey:
        expected = np.repeat(synthetic_pixels(7).mean(axis=2).astype(np.uint8)[..., None], 3,
                             axis=2).astype(int)
    difference = np.abs(picture.astype(int) - expected)
    assert difference.max() <= worst and difference.mean() < mean


def test_a_dicom_file_on_disk_gives_the_model_input(tmp_path: Path) -> None:
    path = tmp_path / "lesion.dcm"
    path.write_bytes(dicom_bytes(dicom_dataset(7)))
    tensor = decode_image(path, (32, 32))
    assert tensor.shape == (32, 32, 3) and tensor.dtype == np.float32


@pytest.mark.parametrize(("make", "starts"), [
    (report_bytes, "DICOM object without pixel data (Basic Text SR Storage)"),
    (waveform_bytes, "DICOM object without pixel data (12-lead ECG Waveform Storage)"),
    (multiframe_bytes, "multi-frame DICOM object (Secondary Capture Image Storage, 3 frames)"),
    (lambda: dicom_bytes(bomb_dataset()), "too many pixels: DICOM 60000x60000x1"),
    (malformed_bytes, "DICOM pixel data cannot be decoded"),
    (lambda: b"\0" * 128 + b"DICM" + b"\xff" * 40, "DICOM object without pixel data"),
], ids=["report", "waveform", "multi-frame", "pixel-bomb", "truncated-pixels", "garbage-header"])
def test_objects_with_nothing_to_screen_are_refused_with_a_reason(make, starts: str) -> None:
    with pytest.raises(DecodeError) as refused:
        load_rgb(make())
    assert refused.value.reason.startswith(starts), refused.value.reason
    assert len(refused.value.reason) < 400 and "\n" not in refused.value.reason
    assert plain_reason(refused.value.reason) != refused.value.reason  # said in plain words


def test_the_pixel_limit_counts_every_frame_from_the_header_before_any_decode() -> None:
    # 10 frames of 1000x1000 claimed over 8 bytes of pixel data: a decode would fail differently.
    ds = dicom_dataset(8)
    ds.Rows = ds.Columns = 1000
    ds.NumberOfFrames = 10
    ds.PixelData = b"\0" * 8
    with pytest.raises(DecodeError, match=r"^too many pixels: DICOM 1000x1000x10 frame"):
        load_rgb(dicom_bytes(ds), max_pixels=5_000_000)


def test_a_jpeg_codestream_larger_than_its_header_says_is_refused_before_decoding() -> None:
    small = dicom_dataset(17, syntax=uid.JPEGBaseline8Bit)  # a 64x64 JPEG...
    small.Rows = small.Columns = 32  # ...in an image that says 32x32 (within the pixel limit)
    with pytest.raises(DecodeError, match="does not match its header"):
        load_rgb(dicom_bytes(small))


def test_the_facts_of_an_object_are_read_without_its_pixels(tmp_path: Path) -> None:
    ds = dicom_dataset(9, study_uid="1.2.3.4", accession="A-77")
    path = tmp_path / "x.dcm"
    path.write_bytes(dicom_bytes(ds))
    with open(path, "rb") as handle:
        facts = read_facts(handle)
    assert facts is not None
    assert (facts.patient_id, facts.patient_name, facts.study_uid, facts.accession_number) == (
        PATIENT_ID, PATIENT_NAME, "1.2.3.4", "A-77")
    assert facts.sop_instance_uid == ds.SOPInstanceUID
    assert facts.sop_class_uid == uid.VLPhotographicImageStorage
    assert (facts.body_part, facts.anatomic_region, facts.laterality) == ("ARM", "Arm", "L")
    assert facts.acquired_at == "2026-12-04 10:15:30"


def test_a_pseudonym_is_a_keyed_hash_stable_per_key(tmp_path: Path) -> None:
    key = pseudonym_key(tmp_path / "dicom.key")
    assert stat.S_IMODE(os.stat(tmp_path / "dicom.key").st_mode) == 0o600
    assert pseudonym_key(tmp_path / "dicom.key") == key  # kept, not made anew
    first = pseudonym(PATIENT_ID, key)
    assert first == pseudonym(PATIENT_ID, key) and first.startswith(PSEUDONYM_PREFIX)
    assert PATIENT_ID not in first
    assert first != pseudonym(PATIENT_ID, b"another key" * 4)
    assert first != pseudonym("PAT-4712-XYZ", key)


def _intake(tmp_path: Path, database_url: str, **dicom: object) -> tuple[Settings, Intake]:
    settings = Settings(_env_file=None, data_dir=tmp_path / "data",  # type: ignore[call-arg]
                        database_url=database_url, dicom=DicomSettings(**dicom))  # type: ignore[arg-type]
    settings.inbox_dir.mkdir(parents=True, exist_ok=True)
    return settings, Intake(settings, make_session_factory(database_url))


def test_intake_keeps_the_patient_and_study_beside_a_dicom_image(
        tmp_path: Path, database_url: str) -> None:
    settings, intake = _intake(tmp_path, database_url)
    study = uid.generate_uid()
    for seed in (10, 11):
        (settings.inbox_dir / f"{seed}.dcm").write_bytes(
            dicom_bytes(dicom_dataset(seed, study_uid=study)))
    (settings.inbox_dir / "photo.jpg").write_bytes(synthetic_jpeg(12))
    ids = [intake.take(settings.inbox_dir / name) for name in ("10.dcm", "11.dcm", "photo.jpg")]
    assert all(ids)
    with intake.sessions.begin() as session:
        rows = {row.source: row for row in readmodel.results(session)}
        assert rows["10.dcm"].study_uid == study and rows["10.dcm"].patient_id == PATIENT_ID
        assert rows["10.dcm"].sop_instance_uid
        assert (rows["photo.jpg"].patient_id, rows["photo.jpg"].study_uid,
                rows["photo.jpg"].sop_instance_uid) == (None, None, None)
        others = dicom_queries.other_images_of_patient(session, ids[0])  # type: ignore[arg-type]
        assert [image.source for image, _ in others] == ["11.dcm"]
        assert dicom_queries.other_images_of_patient(session, ids[2]) == []  # type: ignore[arg-type]
        assert set(rows["10.dcm"].to_json()) >= {"patient_id", "study_uid", "sop_instance_uid"}


def test_pseudonymised_intake_keeps_no_name_and_only_a_keyed_hash(
        tmp_path: Path, database_url: str) -> None:
    settings, intake = _intake(tmp_path, database_url, pseudonymise=True)
    (settings.inbox_dir / "a.dcm").write_bytes(dicom_bytes(dicom_dataset(13)))
    (settings.inbox_dir / "b.dcm").write_bytes(dicom_bytes(dicom_dataset(14)))
    first = intake.take(settings.inbox_dir / "a.dcm")
    intake.take(settings.inbox_dir / "b.dcm")
    key = pseudonym_key(settings.dicom_key_file)
    with intake.sessions.begin() as session:
        stored = list(session.scalars(select(DicomInstance)))
        assert len(stored) == 2
        for row in stored:
            assert row.patient_id == pseudonym(PATIENT_ID, key) and row.pseudonymised
            assert row.patient_name is None
            values = " ".join(str(getattr(row, c.key)) for c in DicomInstance.__table__.columns)
            assert PATIENT_ID not in values and "Doe" not in values and BIRTH_DATE not in values
        # The patient's images stay together under the pseudonym.
        assert len(dicom_queries.other_images_of_patient(session, first)) == 1  # type: ignore[arg-type]


def test_an_unreadable_dicom_header_is_taken_without_facts_for_the_worker_to_reject(
        tmp_path: Path, database_url: str) -> None:
    settings, intake = _intake(tmp_path, database_url)
    (settings.inbox_dir / "bad.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 40)
    image_id = intake.take(settings.inbox_dir / "bad.dcm")
    assert image_id is not None
    with intake.sessions.begin() as session:
        assert dicom_queries.instances_of(session, [image_id]) == {}


def test_pseudonymising_facts_twice_changes_nothing() -> None:
    from service.dicom import DicomFacts

    once = pseudonymised(DicomFacts(patient_id="P1", patient_name="A^B"), b"k" * 32)
    assert pseudonymised(once, b"k" * 32) == once and once.patient_name is None


@pytest.mark.parametrize(("peers", "expected"), [
    ("MODALITY1@127.0.0.1, PACS", [("MODALITY1", "127.0.0.1"), ("PACS", None)]),
    ("DERMO CAM@::1", [("DERMO CAM", "::1")]),
    ("", []),
])
def test_peers_are_ae_titles_with_optional_addresses(peers: str, expected: list[object]) -> None:
    dicom = DicomSettings(peers=peers)  # type: ignore[arg-type]
    assert [(p.ae_title, p.address) for p in dicom.peers] == expected


def test_a_peer_is_allowed_only_from_its_address() -> None:
    dicom = DicomSettings(peers="MODALITY1@10.0.0.5,PACS")  # type: ignore[arg-type]
    assert dicom.allows("MODALITY1", "10.0.0.5") and not dicom.allows("MODALITY1", "10.0.0.6")
    assert dicom.allows("PACS", "192.0.2.1") and not dicom.allows("OTHER", "10.0.0.5")


@pytest.mark.parametrize(("name", "value"), [
    ("MELANOSCREEN_DICOM_PEERS", "MODALITY1@not-an-address"),
    ("MELANOSCREEN_DICOM_PEERS", "A_TITLE_MUCH_TOO_LONG_FOR_DICOM"),
    ("MELANOSCREEN_DICOM_PORT", "70000"),
    ("MELANOSCREEN_DICOM_AE_TITLE", "BACK\\SLASH"),
    ("MELANOSCREEN_DICOM_ADDRESS", "everywhere"),
    ("MELANOSCREEN_DICOM_PSEUDONYMISE", "maybe"),
])
def test_a_bad_dicom_setting_is_one_line_naming_it(
        name: str, value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as error:
        Settings(_env_file=None)  # type: ignore[call-arg]
    assert describe_error(error.value).startswith(name + ":")


@pytest.mark.parametrize(("env", "named"), [
    ({}, "MELANOSCREEN_DICOM_PORT"),
    ({"MELANOSCREEN_DICOM_PORT": "11112"}, "MELANOSCREEN_DICOM_PEERS"),
    ({"MELANOSCREEN_DICOM_PORT": "11112", "MELANOSCREEN_DICOM_PEERS": "PACS@300.1.1.1"},
     "MELANOSCREEN_DICOM_PEERS"),
])
def test_the_listener_refuses_to_start_without_a_port_or_peers(
        tmp_path: Path, env: dict[str, str], named: str) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MELANOSCREEN_")}
    clean.update(env, MELANOSCREEN_DATA_DIR=str(tmp_path / "data"))
    done = subprocess.run([sys.executable, "-m", "melanoscreen", "dicom"], env=clean, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {named}:"), done.stderr


def test_one_object_resent_in_another_transfer_syntax_is_a_duplicate(
        tmp_path: Path, database_url: str) -> None:
    settings, intake = _intake(tmp_path, database_url)
    ds = dicom_dataset(15)
    (settings.inbox_dir / "first.dcm").write_bytes(dicom_bytes(ds))
    ds.file_meta.TransferSyntaxUID = uid.ImplicitVRLittleEndian
    (settings.inbox_dir / "again.dcm").write_bytes(dicom_bytes(ds))
    assert intake.take(settings.inbox_dir / "first.dcm") is not None
    assert intake.take(settings.inbox_dir / "again.dcm") is None  # recorded as a duplicate
    with intake.sessions.begin() as session:
        assert [row.source for row in readmodel.results(session)] == ["first.dcm"]
        assert len(session.scalars(select(DicomInstance)).all()) == 1


def test_the_compose_deployment_has_the_listener_off_by_default_and_on_loopback() -> None:
    import yaml

    from tests.conftest import REPO

    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    listener = services["dicom"]
    assert listener["profiles"] == ["dicom"]  # started only with --profile dicom
    assert listener["command"] == "melanoscreen dicom"
    assert all(str(port).startswith("127.0.0.1:") for port in listener["ports"])
    assert all("profiles" not in service for name, service in services.items() if name != "dicom")


def test_a_dicom_file_recovered_from_the_store_keeps_its_study(
        tmp_path: Path, database_url: str) -> None:
    import hashlib

    settings, intake = _intake(tmp_path, database_url)
    data = dicom_bytes(dicom_dataset(16, study_uid="1.2.3.16"))
    sha = hashlib.sha256(data).hexdigest()
    stored = settings.store_dir / sha[:2] / f"{sha}.dcm"  # moved, then killed before the commit
    stored.parent.mkdir(parents=True)
    stored.write_bytes(data)
    [image_id] = intake.recover_store()
    with intake.sessions.begin() as session:
        assert dicom_queries.instances_of(session, [image_id])[image_id].study_uid == "1.2.3.16"


def test_the_listener_never_writes_through_a_link_planted_in_a_shared_inbox(
        tmp_path: Path) -> None:
    """Another user of a shared inbox makes `dicom` a link to a folder of theirs: the object is
    not written there (the sender is told to retry), and a real folder takes it."""
    from scheduler.listener import Listener

    inbox, theirs = tmp_path / "inbox", tmp_path / "theirs"
    inbox.mkdir()
    theirs.mkdir()
    (inbox / "dicom").symlink_to(theirs, target_is_directory=True)
    listener = Listener(DicomSettings(peers="CAM"), inbox,  # type: ignore[arg-type]
                        lambda: b"k" * 32, max_bytes=1 << 20)
    with pytest.raises(OSError, match="not a folder of its own"):
        listener.write("CAM", "1.2.3", b"object")
    assert list(theirs.rglob("*")) == []

    (inbox / "dicom").unlink()
    written = listener.write("CAM", "1.2.3", b"object")
    assert written.read_bytes() == b"object" and not written.is_symlink()
    assert written.parent.parent == inbox / "dicom"


@pytest.mark.parametrize("instance", ["1.2.3.4", "1.2.840.10008.5.1.4.1.1.77.1.4.12345"])
def test_the_listener_writes_the_file_meta_pydicom_writes(instance: str) -> None:
    """The file meta written by hand for each received object is byte for byte the group that
    pydicom writes for pynetdicom's own `Event.file_meta`, odd and even UID lengths alike."""
    from io import BytesIO

    from pydicom.filewriter import write_file_meta_info
    from pynetdicom.dsutils import create_file_meta

    from scheduler.listener import file_meta

    expected = BytesIO()
    write_file_meta_info(expected, create_file_meta(
        sop_class_uid=uid.UID(uid.VLPhotographicImageStorage), sop_instance_uid=uid.UID(instance),
        transfer_syntax=uid.UID(uid.JPEGBaseline8Bit)), enforce_standard=True)
    assert file_meta(uid.VLPhotographicImageStorage, instance,
                     uid.JPEGBaseline8Bit) == expected.getvalue()
    with pytest.raises(UnicodeEncodeError):
        file_meta(uid.VLPhotographicImageStorage, "1.2.\u00e9", uid.JPEGBaseline8Bit)


@pytest.mark.parametrize(("sop_class", "instance", "message_id", "status"), [
    (uid.VLPhotographicImageStorage, "1.2.3.4", 1, 0x0000),
    (uid.SecondaryCaptureImageStorage, "1.2.840.10008.5.1.4.1.1.77.1.4.12345", 65535, 0xA700),
    (None, None, 7, 0xC000),
])
def test_the_listener_answers_a_store_with_the_command_pynetdicom_encodes(
        sop_class: str | None, instance: str | None, message_id: int, status: int) -> None:
    """The C-STORE response written by hand is byte for byte the P-DATA that pynetdicom builds
    for the same response, odd and even UID lengths and missing UIDs alike."""
    from pynetdicom.dimse_messages import C_STORE_RSP
    from pynetdicom.dimse_primitives import C_STORE

    from scheduler.listener import store_response_command

    response = C_STORE()
    response.MessageIDBeingRespondedTo = message_id
    response.Status = status
    if sop_class is not None:
        response.AffectedSOPClassUID = sop_class
    if instance is not None:
        response.AffectedSOPInstanceUID = instance
    message = C_STORE_RSP()
    message.primitive_to_message(response)
    [pdata] = message.encode_msg(3, 16384)
    command = store_response_command(sop_class, message_id, status, instance)
    assert pdata.presentation_data_value_list == [(3, b"\x03" + command)]
    with pytest.raises(UnicodeEncodeError):  # such a response goes pynetdicom's way instead
        store_response_command("1.2.\u00e9", message_id, status, instance)


@pytest.mark.parametrize("syntax", [uid.JPEGBaseline8Bit, uid.ExplicitVRLittleEndian])
def test_the_worker_keeps_a_preview_and_a_thumbnail_of_a_dicom_image(
        tmp_path: Path, syntax: uid.UID) -> None:
    """A DICOM image's preview is a JPEG a browser shows (a JPEG-baseline object's own frame, as
    it stands) with the image's pixels, beside a thumbnail; a plain JPEG keeps a thumbnail only;
    a header over the pixel limit leaves neither and raises nothing."""
    from PIL import Image
    from pydicom.encaps import generate_frames

    from service.pictures import THUMBNAIL_PX, store_pictures

    ds = dicom_dataset(5, size=(200, 150), syntax=syntax)
    location = tmp_path / "object.dcm"
    location.write_bytes(dicom_bytes(ds))
    thumbnails, preview = tmp_path / "thumbnails", tmp_path / "previews" / "object.jpg"
    store_pictures(location, "a" * 64, thumbnails, preview)

    with Image.open(preview) as shown:
        assert shown.format == "JPEG" and shown.size == (200, 150)
        # Compared at 1/10 scale: JPEG's loss is in the synthetic noise, not in the picture.
        seen = shown.convert("RGB").resize((20, 15), Image.Resampling.BOX)
    truth = load_rgb(location).resize((20, 15), Image.Resampling.BOX)
    difference = np.abs(np.asarray(seen, np.int16) - np.asarray(truth, np.int16))
    assert float(difference.mean()) < 3.0
    if syntax == uid.JPEGBaseline8Bit:
        assert preview.read_bytes() == next(generate_frames(ds.PixelData, number_of_frames=1))
    [thumbnail] = thumbnails.rglob("*.jpg")
    with Image.open(thumbnail) as small:
        assert max(small.size) <= THUMBNAIL_PX
    assert stat.S_IMODE(preview.stat().st_mode) == 0o600

    jpeg = tmp_path / "plain.jpg"
    jpeg.write_bytes(synthetic_jpeg(3))
    store_pictures(jpeg, "b" * 64, thumbnails, tmp_path / "previews" / "plain.jpg")
    assert len(list(thumbnails.rglob("*.jpg"))) == 2
    assert not (tmp_path / "previews" / "plain.jpg").exists()

    bomb = tmp_path / "bomb.dcm"
    bomb.write_bytes(dicom_bytes(bomb_dataset()))
    store_pictures(bomb, "c" * 64, thumbnails, tmp_path / "previews" / "bomb.jpg")
    assert not (tmp_path / "previews" / "bomb.jpg").exists()
    assert len(list(thumbnails.rglob("*.jpg"))) == 2


@pytest.fixture
def listening(tmp_path: Path) -> Iterator[tuple[int, Path, Any]]:
    """A listener in this process on a free loopback port (peer CAM), objects over 300 kB
    refused: (port, inbox, listener)."""
    from melanoscreen.cli.supervisor import free_port
    from scheduler.listener import Listener

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    port = free_port()
    listener = Listener(DicomSettings(peers="CAM", port=port), inbox,  # type: ignore[arg-type]
                        lambda: b"k" * 32, max_bytes=300_000)
    listener.start()
    try:
        yield port, inbox, listener
    finally:
        listener.stop()


def test_a_pdu_longer_than_the_listener_takes_closes_the_connection_before_it_is_read(
        listening: tuple[int, Path, Any], caplog: pytest.LogCaptureFixture) -> None:
    """Anyone may open a connection: an association request that claims 64 MiB is not read
    into memory; the connection is closed after the first bytes, and others are served."""
    import socket as sockets
    import struct

    from scheduler.listener import MAX_PDU_BYTES

    port, _inbox, _listener = listening
    claimed = 64 << 20
    with sockets.create_connection(("127.0.0.1", port), timeout=30) as stranger:
        stranger.sendall(struct.pack(">BBL", 0x01, 0, claimed))
        sent, closed = 0, False
        try:
            while sent < claimed:
                stranger.sendall(b"\0" * 65536)
                sent += 65536
        except (BrokenPipeError, ConnectionResetError):
            closed = True
    assert closed and sent <= 4 * MAX_PDU_BYTES  # refused long before 64 MiB arrived
    assert any("a PDU of 67108864 bytes" in r.getMessage() for r in caplog.records)

    assoc = modality("CAM").associate("127.0.0.1", port, ae_title="MELANOSCREEN")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()


def test_a_refusal_that_closes_the_connection_before_the_caller_looks_is_still_a_refusal(
        listening: tuple[int, Path, Any]) -> None:
    """pynetdicom's requesting thread looks at the connection only after sending its request;
    when the refusal has already arrived and closed the connection, pynetdicom reports a failed
    connection. Here the requesting thread is held (in its own EVT_REQUESTED handler) until the
    refusal has closed the connection: the health probe must still see an answer."""
    import threading

    from pynetdicom import evt

    from melanoscreen.cli.supervisor import free_port
    from scheduler.listener import probe, request_association

    port, _inbox, _listener = listening
    closed = threading.Event()

    def hold(event: Any) -> None:
        assert closed.wait(timeout=30), "the refusal never closed the connection"

    stranger = modality("STRANGER")
    handlers = [(evt.EVT_REQUESTED, hold), (evt.EVT_CONN_CLOSE, lambda event: closed.set())]
    plain = stranger.associate("127.0.0.1", port, ae_title="MELANOSCREEN",
                               evt_handlers=handlers)
    assert not plain.is_rejected and not plain.is_established  # what pynetdicom alone reports
    closed.clear()
    assoc, refused = request_association(stranger, "127.0.0.1", port, ae_title="MELANOSCREEN",
                                         evt_handlers=handlers)
    assert refused and not assoc.is_established
    assert probe("127.0.0.1", port, "MELANOSCREEN", timeout=30)  # refused: an answer
    assoc, refused = request_association(modality("CAM"), "127.0.0.1", port,
                                         ae_title="MELANOSCREEN")
    assert assoc.is_established and not refused
    assoc.release()
    assert not probe("127.0.0.1", free_port(), "MELANOSCREEN", timeout=5)  # nobody there


def test_an_object_over_the_size_limit_is_stopped_while_it_arrives(
        listening: tuple[int, Path, Any]) -> None:
    """A 2.4 MB object to a listener that takes 300 kB: the association is aborted before the
    object is whole (nothing written); the objects before it stay stored, a new association
    is served."""
    port, inbox, _listener = listening
    small, large = dicom_dataset(41), dicom_dataset(42, size=(1000, 800))
    assoc = modality("CAM").associate("127.0.0.1", port, ae_title="MELANOSCREEN")
    assert assoc.send_c_store(small).Status == 0
    answer = assoc.send_c_store(large)
    assert not answer  # no status: the association was aborted while the object arrived
    wait_until(lambda: assoc.is_aborted, message="the association aborted")
    stored = sorted(p.name for p in inbox.rglob("*.dcm"))
    assert stored == [f"{small.SOPInstanceUID}.dcm"]

    again = modality("CAM").associate("127.0.0.1", port, ae_title="MELANOSCREEN")
    assert again.send_c_store(dicom_dataset(43)).Status == 0
    again.release()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts descriptors in /proc")
def test_an_association_that_ends_leaves_no_descriptor_of_its_own_open(
        listening: tuple[int, Path, Any]) -> None:
    """Each association's connection waits on its socket and a wake-up pipe rather than
    polling; the pipe is closed when the association ends, released or aborted by the sender,
    so a listener that serves associations all day holds no more descriptors than at start."""
    port, _inbox, listener = listening

    def open_descriptors() -> int:
        return len(os.listdir("/proc/self/fd"))

    def idle() -> bool:
        return not listener.server.active_associations

    first = modality("CAM").associate("127.0.0.1", port, ae_title="MELANOSCREEN")
    assert first.send_c_echo().Status == 0  # whatever pynetdicom opens once, it opens now
    first.release()
    wait_until(idle, message="the first association ended")
    before = open_descriptors()
    gc.disable()  # closed as each association ends, not whenever the collector finds them
    try:
        for number in range(6):
            assoc = modality("CAM").associate("127.0.0.1", port, ae_title="MELANOSCREEN")
            assert assoc.send_c_store(dicom_dataset(60 + number)).Status == 0
            if number % 2:
                assoc.abort()
            else:
                assoc.release()
        wait_until(lambda: idle() and open_descriptors() <= before, timeout=10,
                   message="every association ended and its descriptors closed")
    finally:
        gc.enable()
