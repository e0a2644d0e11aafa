"""The review app under a real uvicorn on loopback, over a migrated database with seeded images."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import uvicorn
from sqlalchemy.orm import Session, sessionmaker

from db import accounts, images
from db.schema import Role
from db.session import make_session_factory
from service.accounts import hash_password
from tests.conftest import synthetic_jpeg
from tests.mail_fixtures import free_port
from web.app import create_app
from web.deps import WebConfig

PASSWORD = "correct horse battery"
CLASSES = ("actinic keratosis", "basal cell carcinoma", "dermatofibroma", "melanoma", "nevus",
           "pigmented benign keratosis", "seborrheic keratosis", "squamous cell carcinoma",
           "vascular lesion")


def seed_image(sessions: sessionmaker[Session], folder: Path, *, source: str, seed: int,
               melanoma: float | None, threshold: float = 0.5,
               received_at: datetime | None = None) -> str:
    """An image file and its row, screened with this melanoma probability (None: still queued)."""
    content = synthetic_jpeg(seed)
    import hashlib

    sha = hashlib.sha256(content).hexdigest()
    path = folder / f"{sha}.jpg"
    path.write_bytes(content)
    when = received_at or datetime.now(UTC)
    with sessions.begin() as session:
        image = images.add_image(session, sha256=sha, source=source, size_bytes=len(content),
                                  location=str(path), received_at=when)
        if melanoma is not None:
            images.claim_images(session, [image.id], token="t", now=when,
                                 stale_before=when - timedelta(hours=1), max_attempts=5)
            rest = (1.0 - melanoma) / (len(CLASSES) - 1)
            probabilities = {c: (melanoma if c == "melanoma" else rest) for c in CLASSES}
            predicted = max(probabilities, key=lambda c: probabilities[c])
            images.finish_screened(session, image.id, token="t", now=when, model_version="tiny-1",
                                    probabilities=probabilities, melanoma_probability=melanoma,
                                    predicted_class=predicted, threshold=threshold, seconds=0.01,
                                    flagged=melanoma >= threshold)
    return sha


def add_account(sessions: sessionmaker[Session], name: str, role: Role = Role.REVIEWER) -> None:
    """An account with the shared test password."""
    with sessions.begin() as session:
        accounts.add_user(session, name=name, email=f"{name}@clinic.example", role=role,
                         password_hash=hash_password(PASSWORD), now=datetime.now(UTC))



@dataclass
class LiveApp:
    """A running review app and what it was seeded with."""

    url: str
    sessions: sessionmaker[Session]
    store: Path
    overlays: Path
    flagged: str  # sha256 of the highest flagged image
    hostile: str  # sha256 of an image whose name is HTML
    thumbnails: Path  # where the app finds the thumbnails the worker stored

    def client(self) -> httpx.Client:
        """A fresh client (no cookies) against the app."""
        return httpx.Client(base_url=self.url, follow_redirects=False, timeout=30)

    def login(self, name: str = "ann", password: str = PASSWORD) -> httpx.Client:
        """A client with a logged-in session."""
        client = self.client()
        token = csrf_of(client.get("/login").text)
        answer = client.post("/login", data={"name": name, "password": password,
                                             "csrf_token": token, "next": "/"})
        assert answer.status_code == 303, answer.text
        # The session lives at its own secret path, where its cookie is scoped: the client's
        # requests go there from now on.
        client.base_url = httpx.URL(self.url + answer.headers["location"].rstrip("/"))
        return client


def csrf_of(page: str) -> str:
    """The CSRF token in a page's first form."""
    found = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert found, "no CSRF token in the page"
    return found.group(1)


HOSTILE_NAME = 'clinic-b/<script>alert(1)</script><img src=x onerror=alert(2)>.jpg'


@pytest.fixture
def live_app(request: pytest.FixtureRequest, tmp_path: Path, database_url: str) -> Iterator[LiveApp]:
    """The app under uvicorn on a free loopback port, with a reviewer `ann` and an admin `root`."""
    sessions = make_session_factory(database_url)
    store, overlays, thumbnails = tmp_path / "store", tmp_path / "overlays", tmp_path / "thumbnails"
    store.mkdir()
    overlays.mkdir()
    base = datetime.now(UTC) - timedelta(days=2)
    flagged = seed_image(sessions, store, source="clinic-a/patient-17/lesion2.jpg", seed=1, melanoma=0.91,
                         received_at=base)
    seed_image(sessions, store, source="clinic-a/patient-3/mole.jpg", seed=2, melanoma=0.62,
               received_at=base + timedelta(minutes=1))
    seed_image(sessions, store, source="clinic-a/patient-4/nevus.jpg", seed=3, melanoma=0.05,
               received_at=base + timedelta(minutes=2))
    hostile = seed_image(sessions, store, source=HOSTILE_NAME, seed=4, melanoma=0.7,
                         received_at=base + timedelta(minutes=3))
    seed_image(sessions, store, source="waiting.jpg", seed=5, melanoma=None)
    add_account(sessions, "ann")
    add_account(sessions, "root", Role.ADMIN)
    config = WebConfig(database_url=database_url, secret="test-secret-" + "x" * 40,
                       overlays_dir=overlays, thumbnails_dir=thumbnails, session_seconds=3600,
                       # WebConfig fields a test module sets differently (WEB_CONFIG there).
                       **getattr(request.module, "WEB_CONFIG", {}))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(config), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the app did not start"
        time.sleep(0.05)
    try:
        yield LiveApp(f"http://127.0.0.1:{port}", sessions, store, overlays, flagged, hostile,
                      thumbnails)
    finally:
        server.should_exit = True
        thread.join(10)
        sessions.kw["bind"].dispose()
