"""The review app in a real headless Chromium (Debian's), driven by Playwright.

Set MELANOSCREEN_SCREENSHOTS=DIR to keep its screenshots of the worklist and a case page there (the
README's pictures are made by docs/screenshots.py).
"""

from __future__ import annotations

import io
import os
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image
from web_fixtures import PASSWORD, LiveApp, live_app

__all__ = ["live_app"]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None,
                                reason="headless Chromium is not installed (apt-get install chromium)")


def _overlay_png() -> bytes:
    """A stand-in for the worker's stored Grad-CAM overlay: a warm blob on the lesion's size."""
    picture = Image.new("RGB", (64, 64), (30, 30, 120))
    for x in range(20, 44):
        for y in range(18, 46):
            picture.putpixel((x, y), (230, 90 + (x - 20) * 4, 40))
    out = io.BytesIO()
    picture.save(out, "PNG")
    return out.getvalue()


@pytest.mark.parametrize("database_url", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
                         indirect=True)
def test_a_reviewer_logs_in_opens_a_flagged_case_and_reviews_it(live_app: LiveApp, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    (live_app.overlays / f"{live_app.flagged}.png").write_bytes(_overlay_png())
    shots = Path(os.environ.get("MELANOSCREEN_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=["--no-sandbox"] if os.geteuid() == 0 else [])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860}, java_script_enabled=False)
            page.goto(f"{live_app.url}/")
            assert page.url.startswith(f"{live_app.url}/login")
            page.fill("input[name=name]", "ann")
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            # The session lives at its own secret path (its cookie is scoped there).
            page.wait_for_url(re.compile(re.escape(live_app.url) + r"/s/[A-Za-z0-9_-]+/$"))
            home = page.url.rstrip("/")
            assert page.locator("h1").inner_text() == "Worklist"
            first = page.locator("table.worklist tbody tr").first
            assert "lesion2.jpg" in first.inner_text() and "to review" in first.inner_text()
            # The source name with HTML in it is shown as text, not run.
            assert page.get_by_text("<script>alert(1)</script>", exact=False).count() == 1
            page.screenshot(path=str(shots / "review-worklist.png"), full_page=True)

            first.locator("a").nth(1).click()
            page.wait_for_url(f"{home}/images/{live_app.flagged}")
            for selector in ("img[alt='the lesion image']", "img[alt='Grad-CAM overlay']"):
                loaded = page.locator(selector).evaluate("img => img.complete && img.naturalWidth")
                assert loaded == 64, selector
            assert "melanoma" in page.locator("table.probs").inner_text()
            page.check("input[value=refer]")
            page.select_option("select[name=diagnosis]", "melanoma")
            page.fill("textarea[name=note]", "Asymmetric, blue-white veil: excise.")
            page.screenshot(path=str(shots / "review-case.png"), full_page=True)
            page.click("text=Save review")
            page.wait_for_url(f"{home}/images/{live_app.flagged}#reviews")
            assert "Asymmetric, blue-white veil" in page.locator("#reviews").inner_text()

            page.goto(f"{home}/?q=lesion2")
            row = page.locator("table.worklist tbody tr").first.inner_text()
            assert "refer" in row and "ann" in row and "to review" not in row
            page.goto(f"{home}/audit")
            log = page.locator("table.audit").inner_text()
            assert "review" in log and "view_image" in log and "verdict refer" in log
        finally:
            browser.close()
