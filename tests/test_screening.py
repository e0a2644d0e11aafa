"""The screening batch in process: its dependencies (sessions, the model, the settings) are
passed in; a real tiny model, a migrated SQLite database and real files."""

from __future__ import annotations

import stat
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db import images, readmodel
from db.migrate import upgrade
from db.schema import AlertImage, Image, ImageStatus, OutboxKind, OutboxMessage, Prediction, utcnow
from db.session import make_session_factory
from melanoscreen.settings import AlertSettings, Settings
from service.screening import screen_batch, sweep_stale
from tests.conftest import synthetic_jpeg

if TYPE_CHECKING:
    from model.inference import Classifier

DOCTORS = ["dr.a@clinic.example", "dr.b@clinic.example"]


@pytest.fixture(scope="module")
def classifier(tiny_model: Path) -> Classifier:
    """The tiny model, loaded in this process (the worker loads it in its pool process)."""
    from model.inference import Classifier

    return Classifier(tiny_model)


class Loader:
    """Hands out the model and counts how often screening asked for it."""

    def __init__(self, classifier: Classifier) -> None:
        self.classifier = classifier
        self.calls = 0

    def __call__(self) -> Classifier:
        self.calls += 1
        return self.classifier


def make_settings(tmp_path: Path, alert: AlertSettings | None = None) -> Settings:
    return Settings(_env_file=None, data_dir=tmp_path / "data",  # type: ignore[call-arg]
                    database_url=f"sqlite:///{tmp_path / 'screening.db'}",
                    alert=alert or AlertSettings())


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    url = make_settings(tmp_path).database
    upgrade(url)
    factory = make_session_factory(url)
    yield factory
    factory.kw["bind"].dispose()


def add_images(sessions: sessionmaker[Session], folder: Path,
               contents: dict[str, bytes]) -> dict[str, int]:
    """Stored files and their `queued` rows, as the watcher leaves them."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = {}
    with sessions.begin() as session:
        for name, content in contents.items():
            location = folder / f"{uuid.uuid4().hex}-{Path(name).name}"
            location.write_bytes(content)
            ids[name] = images.add_image(session, sha256=uuid.uuid4().hex * 2, source=name,
                                          size_bytes=len(content), location=str(location),
                                          received_at=utcnow()).id
    return ids


def test_a_batch_is_screened_and_unreadable_files_are_quarantined_with_their_reason(
        sessions: sessionmaker[Session], classifier: Classifier, tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    good = synthetic_jpeg(1)
    ids = add_images(sessions, tmp_path / "store", {
        "a.jpg": good, "truncated.jpg": good[: len(good) // 2], "b.jpg": synthetic_jpeg(2)})
    loader = Loader(classifier)

    outcome = screen_batch(sessions, loader, list(ids.values()), token="t1", settings=settings)

    assert (outcome.screened, outcome.rejected, outcome.skipped) == (2, 1, 0)
    with sessions.begin() as session:
        rows = {i.source: i for i in session.scalars(select(Image))}
        predictions = list(session.scalars(select(Prediction)))
    assert {name: rows[name].status for name in ids} == {
        "a.jpg": ImageStatus.SCREENED, "truncated.jpg": ImageStatus.REJECTED,
        "b.jpg": ImageStatus.SCREENED}
    assert sorted(p.image_id for p in predictions) == [ids["a.jpg"], ids["b.jpg"]]
    for prediction in predictions:
        assert prediction.model_version == classifier.version
        assert prediction.threshold == pytest.approx(classifier.threshold)  # the card's
        assert sum(prediction.probabilities.values()) == pytest.approx(1.0, abs=1e-4)
    rejected = rows["truncated.jpg"]
    kept = Path(rejected.location)
    assert kept.parent == settings.quarantine_dir and kept.read_bytes() == good[: len(good) // 2]
    assert rejected.reason and "truncated" in rejected.reason
    assert "truncated" in kept.with_name(kept.name + ".reason.txt").read_text()
    assert loader.calls == 1
    # Each screened image's thumbnail is made once, here, for the review app; none for the other.
    thumbnails = {p.name for p in settings.thumbnails_dir.iterdir()}
    assert thumbnails == {f"{rows[name].sha256}.jpg" for name in ("a.jpg", "b.jpg")}
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in settings.thumbnails_dir.iterdir())


def test_a_redelivered_batch_skips_finished_images_without_loading_the_model(
        sessions: sessionmaker[Session], classifier: Classifier, tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    ids = list(add_images(sessions, tmp_path / "store", {"a.jpg": synthetic_jpeg(3)}).values())
    screen_batch(sessions, Loader(classifier), ids, token="first", settings=settings)
    again = Loader(classifier)

    outcome = screen_batch(sessions, again, ids, token="second", settings=settings)

    assert (outcome.screened, outcome.skipped) == (0, 1)
    assert again.calls == 0
    with sessions.begin() as session:
        assert len(list(session.scalars(select(Prediction)))) == 1


def test_flagged_images_get_one_alert_row_per_recipient_in_the_same_transaction(
        sessions: sessionmaker[Session], classifier: Classifier, tmp_path: Path) -> None:
    settings = make_settings(tmp_path, AlertSettings(threshold=0.0, recipients=DOCTORS))
    ids = add_images(sessions, tmp_path / "store",
                     {"clinic/x.jpg": synthetic_jpeg(4), "clinic/y.jpg": synthetic_jpeg(5)})

    outcome = screen_batch(sessions, Loader(classifier), list(ids.values()), token="t",
                           settings=settings)

    assert sorted(outcome.flagged) == sorted(ids.values())
    with sessions.begin() as session:
        messages = list(session.scalars(select(OutboxMessage).order_by(OutboxMessage.recipient)))
        links = list(session.scalars(select(AlertImage)))
    assert [m.id for m in messages] == sorted(outcome.alerts)
    assert [m.recipient for m in messages] == DOCTORS
    assert all(m.kind is OutboxKind.ALERT and m.raw is None for m in messages)  # composed on delivery
    assert messages[0].message_id != messages[1].message_id
    assert all(m.subject.startswith("Melanoma suspected in 2 images") for m in messages)
    assert len(links) == 4  # both images, for each recipient's message


def test_without_recipients_a_flag_is_recorded_and_no_alert_written(
        sessions: sessionmaker[Session], classifier: Classifier, tmp_path: Path) -> None:
    settings = make_settings(tmp_path, AlertSettings(threshold=0.0))
    ids = list(add_images(sessions, tmp_path / "store", {"z.jpg": synthetic_jpeg(6)}).values())
    outcome = screen_batch(sessions, Loader(classifier), ids, token="t", settings=settings)
    assert outcome.flagged == tuple(ids) and outcome.alerts == ()
    with sessions.begin() as session:
        assert session.scalars(select(OutboxMessage)).first() is None
        assert images.flagged_count(session) == 1


def test_a_model_that_cannot_load_hands_the_claims_back(
        sessions: sessionmaker[Session], tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    ids = list(add_images(sessions, tmp_path / "store", {"a.jpg": synthetic_jpeg(7)}).values())

    def unavailable() -> Classifier:
        raise OSError("model file not found")

    load: Callable[[], Classifier] = unavailable
    with pytest.raises(OSError):
        screen_batch(sessions, load, ids, token="t", settings=settings)
    with sessions.begin() as session:
        [image] = session.scalars(select(Image))
        assert image.status is ImageStatus.QUEUED and image.claim_token is None
        # The retry takes it again (one attempt used).
        assert image.attempts == 1


def test_the_sweep_hands_out_stale_work_in_batches(
        sessions: sessionmaker[Session], tmp_path: Path) -> None:
    ids = list(add_images(sessions, tmp_path / "store",
                          {f"{n}.jpg": synthetic_jpeg(10 + n) for n in range(5)}).values())
    assert sweep_stale(sessions, stale_after=3600, batch_size=2) == []  # nothing old enough
    assert sweep_stale(sessions, stale_after=0.0, batch_size=2) == [ids[:2], ids[2:4], ids[4:]]


def test_an_out_of_scope_image_at_the_threshold_is_flagged_in_its_own_unusual_picture_alert(
        sessions: sessionmaker[Session], tiny_scoped_model: Path, tmp_path: Path) -> None:
    from model.inference import Classifier
    from model.inference import Prediction as Answer

    classifier = Classifier(tiny_scoped_model)
    settings = make_settings(tmp_path, AlertSettings(threshold=0.0, recipients=DOCTORS))
    contents = {"clinic/lesion.jpg": synthetic_jpeg(21), "clinic/not-a-lesion.jpg": synthetic_jpeg(22)}
    ids = add_images(sessions, tmp_path / "store", contents)
    with sessions.begin() as session:
        paths = {image.source: Path(image.location) for image in session.scalars(select(Image))}
    # Where the two pictures lie from the "training" features; the scope limit goes between them,
    # so one batch holds one image of each kind.
    answers = classifier.predict([paths[name] for name in contents])
    assert all(isinstance(a, Answer) and a.scope_distance is not None for a in answers)
    distances = {name: a.scope_distance for name, a in zip(contents, answers, strict=True)
                 if isinstance(a, Answer) and a.scope_distance is not None}
    near, far = sorted(distances, key=lambda name: distances[name])
    assert distances[near] < distances[far]
    classifier.card.out_of_scope_distance = (distances[near] + distances[far]) / 2

    outcome = screen_batch(sessions, Loader(classifier), list(ids.values()), token="t",
                           settings=settings)

    assert outcome.out_of_scope == (ids[far],)
    # Threshold 0: everything is flagged, out of scope too (never silence a melanoma).
    assert sorted(outcome.flagged) == sorted(ids.values())
    with sessions.begin() as session:
        predictions = {p.image_id: p for p in session.scalars(select(Prediction))}
        linked = {link.image_id for link in session.scalars(select(AlertImage))}
        messages = list(session.scalars(select(OutboxMessage)))
        [row] = [r for r in readmodel.results(session) if r.source == far]
    out = predictions[ids[far]]
    assert out.out_of_scope and out.flagged
    assert out.scope_distance == pytest.approx(distances[far], rel=1e-5)
    assert sum(out.probabilities.values()) == pytest.approx(1.0, abs=1e-4)  # kept, all nine
    assert settings.alert.threshold is not None
    assert out.melanoma_probability >= settings.alert.threshold
    assert not predictions[ids[near]].out_of_scope and predictions[ids[near]].flagged
    assert linked == {ids[near], ids[far]}
    # Two alerts per recipient: the suspected melanoma, and the unusual picture on its own, whose
    # subject never says "melanoma suspected".
    assert len(messages) == 2 * len(DOCTORS)
    unusual = [m for m in messages if far in m.subject]
    assert len(unusual) == len(DOCTORS)
    assert all(m.subject.startswith("Unusual picture: needs a look") for m in unusual)
    assert all(near not in m.subject and "Melanoma suspected" not in m.subject for m in unusual)
    assert all(m.subject.startswith("Melanoma suspected") for m in messages if near in m.subject)
    assert row.to_json()["out_of_scope"] is True and row.to_json()["flagged"] is True


def test_a_model_without_a_scope_output_marks_nothing_out_of_scope(
        sessions: sessionmaker[Session], classifier: Classifier, tmp_path: Path) -> None:
    settings = make_settings(tmp_path, AlertSettings(threshold=0.0))
    ids = list(add_images(sessions, tmp_path / "store", {"a.jpg": synthetic_jpeg(23)}).values())
    outcome = screen_batch(sessions, Loader(classifier), ids, token="t", settings=settings)
    assert outcome.out_of_scope == () and outcome.flagged == tuple(ids)
    with sessions.begin() as session:
        [prediction] = session.scalars(select(Prediction))
    assert prediction.out_of_scope is False and prediction.scope_distance is None
