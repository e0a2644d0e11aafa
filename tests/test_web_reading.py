"""The case page as a reading station, in a real headless Chromium (Debian's) driven by
Playwright: three flagged cases reviewed in a row with the keys and "save and next", the image
zoomed and moved, the overlay toggled, the patient's other images found; and the same page
without JavaScript, where links, access keys and the overlay's checkbox do the work."""

from __future__ import annotations

import io
import os
import re
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import select
from web_fixtures import PASSWORD, LiveApp, live_app, seed_image

from db.schema import Image as ImageRow
from db.schema import Review

__all__ = ["live_app"]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None,
                                reason="headless Chromium is not installed (apt-get install chromium)")


def overlay_png(size: int = 64) -> bytes:
    """A stand-in for the worker's stored Grad-CAM overlay: a red blob on blue."""
    picture = Image.new("RGB", (size, size), (0, 0, 200))
    for x in range(size // 3, 2 * size // 3):
        for y in range(size // 3, 2 * size // 3):
            picture.putpixel((x, y), (220, 20, 20))
    out = io.BytesIO()
    picture.save(out, "PNG")
    return out.getvalue()


def launch(playwright: Any) -> Any:
    """Debian's Chromium, headless."""
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                      args=["--no-sandbox"] if os.geteuid() == 0 else [])


def log_in(page: Any, url: str) -> str:
    """Log `ann` in; the session's base address."""
    page.goto(f"{url}/")
    page.fill("input[name=name]", "ann")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(re.escape(url) + r"/s/[A-Za-z0-9_-]+/$"))
    return page.url.rstrip("/")


def sha_of(live_app: LiveApp, source: str) -> str:
    with live_app.sessions.begin() as session:
        return session.scalars(select(ImageRow.sha256).where(ImageRow.source == source)).one()


def seed_patient_history(live_app: LiveApp) -> tuple[str, str]:
    """Two earlier images of patient 17 (one of the same lesion folder, one reviewed benign)."""
    earlier = datetime.now(UTC) - timedelta(days=30)
    same = seed_image(live_app.sessions, live_app.store, source="clinic-a/patient-17/back/2026-10-01.jpg",
                      seed=21, melanoma=0.12, received_at=earlier)
    other = seed_image(live_app.sessions, live_app.store, source="clinic-a/patient-17/arm/2026-10-01.jpg",
                       seed=22, melanoma=0.08, received_at=earlier + timedelta(minutes=1))
    return same, other


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_reader_reviews_three_flagged_cases_in_a_row_with_keys_zoom_and_overlay(live_app: LiveApp) -> None:
    from playwright.sync_api import expect, sync_playwright

    seed_patient_history(live_app)
    # The flagged image of patient 17 has its overlay; the other two flagged do not.
    (live_app.overlays / f"{live_app.flagged}.png").write_bytes(overlay_png())
    mole = sha_of(live_app, "clinic-a/patient-3/mole.jpg")
    with sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            refused: list[str] = []
            page.on("console", lambda message: refused.append(message.text)
                    if "Content Security Policy" in message.text else None)
            home = log_in(page, live_app.url)
            page.click("text=Read the unreviewed flagged cases")
            # The highest unreviewed flagged case comes first.
            page.wait_for_url(f"{home}/images/{live_app.flagged}")
            expect(page.locator("html")).to_have_class(re.compile(r"\bjs\b"))
            assert "3 flagged images to review" in page.locator("#waiting").inner_text()
            # Clinical facts before identifiers.
            body = page.locator("main").inner_text()
            assert body.index("p(melanoma)") < body.index("SHA-256")
            assert "0.9100" in page.locator(".pmel").inner_text()
            assert "at or above the alert threshold 0.5000" in page.locator(".pmel").inner_text()

            # The image at its stored resolution, zoomed with a button, the wheel, and moved by dragging.
            lesion = page.locator("#lesion")
            expect(lesion).to_have_js_property("complete", True)
            assert lesion.evaluate("img => img.naturalWidth") == 64
            viewer = page.locator("#viewer")
            page.click("#zoom-in")
            expect(viewer).to_have_attribute("data-scale", "1.500")
            box = viewer.bounding_box()
            assert box is not None and box["width"] > 500  # the image large, not a thumbnail
            page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            page.mouse.wheel(0, -300)
            page.wait_for_function("() => Number(document.getElementById('viewer').dataset.scale) > 1.5")
            before = page.locator("#stage").evaluate("stage => stage.style.transform")
            page.mouse.down()
            page.mouse.move(box["x"] + box["width"] / 2 + 120, box["y"] + box["height"] / 2 + 80, steps=5)
            page.mouse.up()
            assert page.locator("#stage").evaluate("stage => stage.style.transform") != before
            page.keyboard.press("0")
            expect(viewer).to_have_attribute("data-scale", "1.000")

            # The overlay: hidden, shown by "o" over the image, hidden again; a legend says
            # what its colours mean.
            overlay = page.locator("#overlay")
            expect(overlay).to_have_css("opacity", "0")
            page.keyboard.press("o")
            expect(overlay).to_have_css("opacity", "1")
            overlay_box, lesion_box = overlay.bounding_box(), lesion.bounding_box()
            assert overlay_box == lesion_box  # over the image, not beside it
            assert "Red" in page.locator("#overlay-legend").inner_text()
            page.keyboard.press("o")
            expect(overlay).to_have_css("opacity", "0")

            # The patient's other images, side by side, with their predictions.
            related = page.locator("#patient-images")
            assert "clinic-a/patient-17/" in related.locator("h2").inner_text()
            assert related.locator("a.tile").count() == 2
            assert "0.1200" in related.inner_text() and "back/2026-10-01.jpg" in related.inner_text()

            # Case 1: refer by key, then save and next by key.
            page.keyboard.press("r")
            assert page.locator("input[value=refer]").is_checked()
            page.keyboard.press("s")
            page.wait_for_url(f"{home}/images/{live_app.hostile}")
            # Case 2: benign by key, then the button.
            page.keyboard.press("b")
            page.click("#save-next")
            page.wait_for_url(f"{home}/images/{mole}")
            assert "1 flagged image to review" in page.locator("#waiting").inner_text()
            # j and k walk the worklist: the next after the last unreviewed is the highest reviewed.
            page.keyboard.press("j")
            page.wait_for_url(f"{home}/images/{live_app.flagged}")
            page.keyboard.press("k")
            page.wait_for_url(f"{home}/images/{mole}")
            # A key typed into the note is text, not a shortcut.
            page.fill("textarea[name=note]", "")
            page.locator("textarea[name=note]").press_sequentially("jr")
            assert page.url == f"{home}/images/{mole}"
            # Case 3: not assessable, saved; nothing left, so the worklist says so.
            page.locator("body").click(position={"x": 5, "y": 5})
            page.keyboard.press("n")
            page.keyboard.press("s")
            page.wait_for_url(re.compile(re.escape(home) + r"/\?done=1$"))
            assert "none is left to read" in page.locator("main").inner_text()
            assert refused == []
        finally:
            browser.close()
    with live_app.sessions.begin() as session:
        verdicts = {sha: verdict.value for sha, verdict in session.execute(
            select(ImageRow.sha256, Review.verdict).join(Review, Review.image_id == ImageRow.id))}
    assert verdicts == {live_app.flagged: "refer", live_app.hostile: "benign", mole: "not_assessable"}


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_without_javascript_the_case_page_reads_with_links_and_a_checkbox(live_app: LiveApp) -> None:
    from playwright.sync_api import expect, sync_playwright

    same, _ = seed_patient_history(live_app)
    (live_app.overlays / f"{live_app.flagged}.png").write_bytes(overlay_png())
    with sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900}, java_script_enabled=False)
            home = log_in(page, live_app.url)
            page.goto(f"{home}/images/{live_app.flagged}")
            # Zoom tools need the script; the full image is a link.
            expect(page.locator(".zoom-tools")).to_be_hidden()
            key = home.rsplit("/", 1)[1]
            full = page.locator("#full-image").get_attribute("href")
            assert full == f"/s/{key}/images/{live_app.flagged}/file"
            # The overlay's checkbox shows it (CSS only).
            overlay = page.locator("#overlay")
            expect(overlay).to_have_css("opacity", "0")
            page.check("#overlay-toggle")
            expect(overlay).to_have_css("opacity", "1")
            # Keys are access keys on links and radio buttons.
            assert page.locator("#next-case").get_attribute("accesskey") == "j"
            assert page.locator("input[value=benign]").get_attribute("accesskey") == "b"
            page.check("input[value=benign]")
            page.click("#save-next")
            page.wait_for_url(f"{home}/images/{live_app.hostile}")
            page.goto(f"{home}/images/{live_app.flagged}")
            page.click(f"#patient-images a[href$='/images/{same}']")
            page.wait_for_url(f"{home}/images/{same}")
            assert "clinic-a/patient-17/back/2026-10-01.jpg" in page.locator("h1").inner_text()
            assert "Same lesion" in page.locator("#patient-images").inner_text()
        finally:
            browser.close()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_rejected_files_case_page_says_why_and_offers_no_review(live_app: LiveApp) -> None:
    """It said "Not screened (yet)." and offered a review form with an empty diagnosis list."""
    from db import images

    when = datetime.now(UTC)
    (live_app.store / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    with live_app.sessions.begin() as session:
        image = images.add_image(session, sha256="e" * 64, source="clinic-a/patient-17/broken.jpg",
                                 size_bytes=12, location=str(live_app.store / "broken.jpg"),
                                 received_at=when)
        images.claim_images(session, [image.id], token="t", now=when,
                            stale_before=when - timedelta(hours=1), max_attempts=5)
        images.finish_rejected(session, image.id, token="t", now=when,
                               reason="not an image Pillow can read",
                               location=str(live_app.store / "broken.jpg"))
    page = live_app.login().get(f"/images/{'e' * 64}").text
    assert "Not screened: not an image Pillow can read." in page
    assert "Not screened (yet)" not in page and 'name="verdict"' not in page
    # Its patient's page lists it as rejected, without asking for a thumbnail.
    other = live_app.login().get(f"/images/{live_app.flagged}").text
    assert "rejected: not an image Pillow can read" in other
    assert f"/images/{'e' * 64}\"" in other and f"/images/{'e' * 64}/thumbnail" not in other


def test_next_and_previous_follow_the_worklist_order_within_the_readers_clinics(
        tmp_path: Path, database_url: str) -> None:
    from db.images import find_image_by_sha256
    from db.session import make_session_factory
    from db.worklist import neighbours, next_unreviewed

    sessions = make_session_factory(database_url)
    made = {name: seed_image(sessions, tmp_path, source=name, seed=number, melanoma=p)
            for number, (name, p) in enumerate((("a/1.jpg", 0.9), ("b/2.jpg", 0.8), ("a/3.jpg", 0.7),
                                                ("a/4.jpg", 0.7), ("a/5.jpg", 0.1)))}
    with sessions.begin() as session:
        def image(name: str) -> ImageRow:
            found = find_image_by_sha256(session, made[name])
            assert found is not None
            return found

        def names(pair: tuple[ImageRow | None, ImageRow | None]) -> tuple[str | None, ...]:
            return tuple(i.source if i else None for i in pair)

        # Equal probabilities: the later id first, as the worklist shows them.
        assert names(neighbours(session, image("a/3.jpg"))) == ("a/4.jpg", "a/5.jpg")
        assert names(neighbours(session, image("a/1.jpg"))) == (None, "b/2.jpg")
        assert names(neighbours(session, image("a/1.jpg"), ("a/",))) == (None, "a/4.jpg")
        # Unreviewed flagged come before the rest: the last of them is followed by the unflagged.
        assert names(neighbours(session, image("a/3.jpg"), ("a/",))) == ("a/4.jpg", "a/5.jpg")
        assert names(neighbours(session, image("a/5.jpg"))) == ("a/3.jpg", None)
        step = next_unreviewed(session, image("a/1.jpg"), ("a/",))
        assert step is not None and step.source == "a/4.jpg"
        last = next_unreviewed(session, image("a/3.jpg"), ("a/",))
        assert last is not None and last.source == "a/1.jpg"  # from the top again
        first = next_unreviewed(session, None, ("b/",))
        assert first is not None and first.source == "b/2.jpg"
    sessions.kw["bind"].dispose()
