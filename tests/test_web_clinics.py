"""The review app and a reviewer's clinics: a reviewer given clinics (`users set-prefixes`) sees theirs by
default, and images whose flag a re-screen changed are marked on the worklist and case page."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update
from web_fixtures import LiveApp, live_app

from db import images
from db.schema import Image, ImageStatus

__all__ = ["live_app"]  # the fixture, used by name below


def test_a_reviewers_worklist_shows_their_clinics_unless_they_ask_for_all(
        live_app: LiveApp) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MELANOSCREEN_")}
    env["MELANOSCREEN_DATABASE_URL"] = str(live_app.sessions.kw["bind"].url.render_as_string(
        hide_password=False))
    env["MELANOSCREEN_DATA_DIR"] = str(live_app.store.parent / "data")
    done = subprocess.run([sys.executable, "-m", "melanoscreen", "users", "set-prefixes", "ann",
                           "clinic-a/patient-3/", "clinic-a/patient-4/"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    client = live_app.login("ann")
    page = client.get("/").text
    assert "Your clinics: clinic-a/patient-3/, clinic-a/patient-4/" in page
    assert "patient-3/mole.jpg" in page and "patient-4/nevus.jpg" in page
    assert "patient-17" not in page and "waiting.jpg" not in page
    everything = client.get("/", params={"all": "1"}).text
    assert "patient-17" in everything and "waiting.jpg" in everything
    # Another account without prefixes sees everything as before.
    assert "patient-17" in live_app.login("root").get("/").text


def test_a_flag_changed_by_a_rescreen_is_marked_on_the_worklist_and_the_case_page(
        live_app: LiveApp) -> None:
    with live_app.sessions.begin() as session:
        image = session.scalars(select(Image).where(
            Image.source == "clinic-a/patient-4/nevus.jpg")).one()
        when = datetime.now(UTC)
        session.execute(update(Image).where(Image.id == image.id).values(status=ImageStatus.QUEUED))
        images.claim_images(session, [image.id], token="r", now=when,
                             stale_before=when - timedelta(hours=1), max_attempts=5)
        images.finish_screened(session, image.id, token="r", now=when, model_version="tiny-2",
                                probabilities={"melanoma": 0.8, "nevus": 0.2},
                                melanoma_probability=0.8, predicted_class="melanoma",
                                threshold=0.5, seconds=0.01, flagged=True)
        sha = image.sha256
    client = live_app.login("ann")
    row = next(line for line in client.get("/").text.split("<tr") if "patient-4/nevus.jpg" in line)
    assert "re-screen: flag gained" in row
    case = client.get(f"/images/{sha}").text
    assert "Flagged by tiny-2; tiny-1 did not flag it" in case
