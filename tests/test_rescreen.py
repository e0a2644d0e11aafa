"""Re-screening with a new model version: a real pipeline (Redis, worker and watcher processes)
screens with one tiny model, the worker restarts with another, and `melanoscreen rescreen` gives
each screened image one more prediction; alerts only on a new flag (marked "re-screen", received
by a real SMTP server), idempotent; a lost flag is listed in the digest (both databases)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path

import pytest
from mail_fixtures import LOOPBACK, RecordingHandler, smtp_server, synthetic_lesion
from sqlalchemy.orm import Session, sessionmaker

from db.schema import Image, ImageStatus, Prediction
from db.session import make_session_factory
from model.card import ModelCard, card_path_for
from service.digest_message import render_digest_text
from service.digests import build_digest_content
from tests.conftest import RedisServer, Service, start_service, synthetic_jpeg, wait_until

DOCTOR = "derm@clinic.example"


@pytest.fixture(scope="module")
def second_model(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """The tiny model's weights under another version: what a new release looks like here."""
    folder = tmp_path_factory.mktemp("model-2")
    path = folder / "tiny-2.keras"
    shutil.copyfile(tiny_model, path)
    card = ModelCard.read(card_path_for(tiny_model))
    card.version = "tiny-test-2"
    card.write(card_path_for(path))
    return path


@pytest.fixture(scope="module")
def mail() -> Iterator[tuple[RecordingHandler, int]]:
    handler = RecordingHandler()
    with smtp_server(handler) as controller:
        yield handler, controller.port


@pytest.fixture(scope="module")
def rescreen_service(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer,
                     tiny_model: Path, mail: tuple[RecordingHandler, int]) -> Iterator[Service]:
    """Worker and watcher with the first model and threshold 1 (nothing is flagged)."""
    broker = redis_server.url.rsplit("/", 1)[0] + "/7"
    running = start_service(
        tmp_path_factory.mktemp("rescreen"), broker, tiny_model, names=("worker", "watch"),
        extra_env={"MELANOSCREEN_ALERT_RECIPIENTS": DOCTOR,
                   "MELANOSCREEN_ALERT_THRESHOLD": "1.0",
                   "MELANOSCREEN_SMTP_HOST": LOOPBACK,
                   "MELANOSCREEN_SMTP_PORT": str(mail[1]),
                   "MELANOSCREEN_SMTP_SECURITY": "none", "MELANOSCREEN_SMTP_TIMEOUT": "5"})
    yield running
    running.stop_all()


def cli(service: Service, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "melanoscreen", *args], env=service.env,
                          cwd=service.data_dir, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_rescreen_keeps_both_predictions_alerts_on_new_flags_only_and_is_idempotent(
        rescreen_service: Service, second_model: Path, mail: tuple[RecordingHandler, int]) -> None:
    service, handler = rescreen_service, mail[0]
    sources = ["clinic-a/one.jpg", "clinic-a/two.jpg", "clinic-b/three.jpg"]
    for seed, source in enumerate(sources):
        service.drop(source, synthetic_jpeg(6100 + seed, (96, 96)))
    service.wait_finished("clinic-", 3)
    assert handler.messages == []  # threshold 1: nothing flagged by the first model

    # A new release: the worker restarts on it, and the clinic now alerts on everything.
    service.env["MELANOSCREEN_MODEL"] = str(second_model)
    service.env["MELANOSCREEN_ALERT_THRESHOLD"] = "0.0"
    service.start("worker")

    dry = cli(service, "rescreen", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "3 screened image(s) would be re-screened with model tiny-test-2" in dry.stdout
    first = cli(service, "rescreen", "--source-prefix", "clinic-a/")
    assert first.returncode == 0, first.stderr
    assert "re-screened 2 of 2 image(s) with model tiny-test-2" in first.stdout
    assert "re-screening" in first.stderr  # the progress bar
    rest = cli(service, "rescreen")
    assert rest.returncode == 0, rest.stderr
    assert "re-screened 1 of 1 image(s)" in rest.stdout
    again = cli(service, "rescreen")
    assert again.returncode == 0 and "0 screened image(s) are re-screened" in again.stdout

    results = json.loads(cli(service, "results", "--format", "json").stdout)
    assert {r["source"] for r in results} == set(sources)
    for row in results:
        assert row["model_version"] == "tiny-test-2" and row["status"] == "screened"
        assert row["model_versions"] == ["tiny-test-1", "tiny-test-2"]  # once per version
        assert row["flagged"] is True and row["flag_changed"] is True
    counts = service.rows("SELECT image_id, model_version, COUNT(*) AS n FROM predictions "
                          "GROUP BY image_id, model_version")
    assert len(counts) == 6 and all(c.n == 1 for c in counts)

    def alerts() -> list[str] | None:
        with handler.lock:
            subjects = [str(m.message["Subject"]) for m in handler.messages]
        named = [s for s in subjects for source in sources if source in s or "more" in s]
        return subjects if len(named) >= 2 else None

    subjects = wait_until(alerts, timeout=120, message="re-screen alerts")
    assert all(s.startswith("[re-screen] Melanoma suspected") for s in subjects), subjects
    body = handler.messages[0].message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "Re-screen: the current model version (tiny-test-2)" in body
    # No second alert comes for images already alerted.
    sent = service.rows("SELECT COUNT(*) AS n FROM outbox WHERE label = 're-screen'")[0].n
    assert sent == 2  # one per batch: clinic-a's two, then clinic-b's one


@pytest.fixture
def sessions(database_url: str) -> Iterator[sessionmaker[Session]]:
    factory = make_session_factory(database_url)
    yield factory
    factory.kw["bind"].dispose()


def test_a_flag_lost_in_a_rescreen_is_listed_in_the_next_digest(
        sessions: sessionmaker[Session], tmp_path: Path) -> None:
    at = datetime(2026, 11, 19, 12, 0, tzinfo=UTC)
    with sessions.begin() as s:
        location = tmp_path / "x.jpg"
        location.write_bytes(synthetic_lesion(1, size=64))
        image = Image(sha256=uuid.uuid4().hex * 2, source="clinic-a/was-flagged.jpg", size_bytes=1,
                      location=str(location), status=ImageStatus.SCREENED, attempts=1,
                      received_at=at - timedelta(days=20), screened_at=at)
        s.add(image)
        s.flush()
        for version, p, when in (("v1", 0.7, at - timedelta(days=20)), ("v2", 0.1, at)):
            s.add(Prediction(image_id=image.id, model_version=version, threshold=0.3,
                             probabilities={"melanoma": p}, melanoma_probability=p,
                             predicted_class="nevus", flagged=p >= 0.3, seconds=0.01,
                             created_at=when))
    with sessions.begin() as s:
        content = build_digest_content(s, date(2026, 11, 20), time(7, 0), "UTC")
        other = build_digest_content(s, date(2026, 11, 20), time(7, 0), "UTC",
                                     keep=lambda source: source.startswith("clinic-b/"))
    assert [(lost.source, lost.earlier_version, lost.model_version)
            for lost in content.lost_flags] == [("clinic-a/was-flagged.jpg", "v1", "v2")]
    text = render_digest_text(content)
    assert "No longer flagged after a re-screen (1)" in text
    assert "clinic-a/was-flagged.jpg: p 0.700 (v1) -> 0.100 (v2)" in text
    assert other.lost_flags == []
