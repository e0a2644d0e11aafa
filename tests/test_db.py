"""The schema through its migrations, on SQLite and (when configured) PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from db import queries
from db.migrate import upgrade
from db.schema import utcnow
from db.session import make_session_factory


@pytest.fixture
def sessions(database_url: str) -> Iterator[sessionmaker[Session]]:
    """A session factory on the migrated database."""
    factory = make_session_factory(database_url)
    yield factory
    factory.kw["bind"].dispose()


def _image(session: Session, sha: str = "a" * 64, source: str = "x.jpg") -> int:
    return queries.add_image(session, sha256=sha, source=source, size_bytes=10,
                             location=f"/store/{sha}.jpg", received_at=utcnow()).id


def test_migrations_create_the_tables_and_run_again_harmlessly(database_url: str) -> None:
    upgrade(database_url)
    engine = create_engine(database_url)
    names = set(inspect(engine).get_table_names())
    engine.dispose()
    assert {"images", "duplicates", "predictions", "alembic_version"} <= names


def test_sqlite_runs_in_wal_mode(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'wal.db'}"
    upgrade(url)
    with make_session_factory(url).begin() as session:
        assert session.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert (session.execute(text("PRAGMA busy_timeout")).scalar() or 0) >= 1000


def test_a_content_is_stored_once_and_duplicates_point_to_it(
        sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        first = _image(session)
        queries.add_duplicate(session, image_id=first, source="again.jpg",
                              location="/dups/again.jpg", received_at=utcnow())
    with pytest.raises(IntegrityError), sessions.begin() as session:
        _image(session, source="other-name.jpg")
    with sessions.begin() as session:
        assert queries.duplicate_count(session) == 1
        assert queries.find_image_by_sha256(session, "a" * 64).id == first  # type: ignore[union-attr]


def test_a_claim_is_held_by_one_delivery_and_a_prediction_written_once(
        sessions: sessionmaker[Session]) -> None:
    now = utcnow()
    with sessions.begin() as session:
        image_id = _image(session)
    claim: dict[str, Any] = dict(now=now, stale_before=now - timedelta(minutes=5), max_attempts=3)
    with sessions.begin() as session:
        assert [i.id for i in queries.claim_images(session, [image_id], token="a", **claim)] == [
            image_id]
    with sessions.begin() as session:
        assert queries.claim_images(session, [image_id], token="b", **claim) == []
        # The same delivery, redelivered after its worker died, takes its claim back.
        assert len(queries.claim_images(session, [image_id], token="a", **claim)) == 1
    finish: dict[str, Any] = dict(now=now, model_version="v1", probabilities={"melanoma": 0.7, "nevus": 0.3},
                  melanoma_probability=0.7, predicted_class="melanoma", threshold=0.5, seconds=0.01)
    with sessions.begin() as session:
        assert queries.finish_screened(session, image_id, token="b", **finish) is None
        prediction = queries.finish_screened(session, image_id, token="a", **finish)
        assert prediction is not None and prediction.flagged
    with sessions.begin() as session:
        assert queries.finish_screened(session, image_id, token="a", **finish) is None
        assert queries.status_counts(session) == {"screened": 1}
        assert queries.flagged_count(session) == 1
        [row] = queries.results(session, flagged_only=True)
        assert row.status == "screened" and row.melanoma_probability == pytest.approx(0.7)
        assert row.received_at.tzinfo is not None


def test_the_sweep_finds_only_work_left_too_long(sessions: sessionmaker[Session]) -> None:
    now = utcnow()
    with sessions.begin() as session:
        old = _image(session, sha="b" * 64, source="old.jpg")
        fresh = _image(session, sha="c" * 64, source="fresh.jpg")
        queries.mark_enqueued(session, [old], now - timedelta(minutes=20))
        queries.mark_enqueued(session, [fresh], now)
    with sessions.begin() as session:
        assert queries.stale_image_ids(session, before=now - timedelta(minutes=10)) == [old]


def test_images_past_their_attempts_become_failed(sessions: sessionmaker[Session]) -> None:
    now = utcnow()
    with sessions.begin() as session:
        image_id = _image(session)
    for token in ("t1", "t2"):
        with sessions.begin() as session:
            queries.claim_images(session, [image_id], token=token, now=now,
                                 stale_before=now + timedelta(seconds=1), max_attempts=2)
    with sessions.begin() as session:
        assert queries.claim_images(session, [image_id], token="t3", now=now,
                                    stale_before=now + timedelta(seconds=1), max_attempts=2) == []
        assert queries.status_counts(session) == {"failed": 1}
