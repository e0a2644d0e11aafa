"""The README's pictures, made from synthetic images (drawn here, never real patients'): the
review app's case page and worklist, and an alert email about several images, each rendered in
Debian's headless Chromium through Playwright.

    python docs/screenshots.py                 # writes docs/images/{case-page,worklist,alert}.png
    python docs/screenshots.py --out /tmp/shots

Needs the test extras (`pip install -e '.[test]'`, for Playwright) and `chromium` on the PATH.
"""

from __future__ import annotations

import argparse
import base64
import email
import hashlib
import io
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from email import policy
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from db import accounts, images, reviews
from db.migrate import upgrade
from db.schema import Role, Verdict
from db.session import make_session_factory
from model.card import ModelCard, card_path_for, shipped_model_path
from service.accounts import hash_password
from service.alert_message import AlertContent, FlaggedImage, compose_alert
from service.pictures import store_thumbnail
from service.rates import benign_alerts_sentence
from service.thresholds import threshold_sentence

HERE = Path(__file__).resolve().parent
CLASSES = ("actinic keratosis", "basal cell carcinoma", "dermatofibroma", "melanoma", "nevus",
           "pigmented benign keratosis", "seborrheic keratosis", "squamous cell carcinoma",
           "vascular lesion")
#: The shipped model's version and alert threshold, so the pictures show what a clinic sees.
SHIPPED = ModelCard.read(card_path_for(shipped_model_path()))
MODEL = SHIPPED.version
THRESHOLD = SHIPPED.alert_threshold
PASSWORD = "a demo password for the pictures"


def lesion_jpeg(seed: int, size: tuple[int, int] = (720, 540), dark: float = 0.6) -> bytes:
    """A made-up dermoscopy-like picture: skin with noise and a brown, irregular blotch."""
    rng = np.random.default_rng(seed)
    width, height = size
    skin = np.array([224, 182, 160], dtype=np.float32) + rng.normal(0, 6, (height, width, 3))
    picture = Image.fromarray(np.clip(skin, 0, 255).astype(np.uint8))
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    cx, cy = width / 2 + rng.integers(-40, 40), height / 2 + rng.integers(-30, 30)
    for _ in range(14):  # overlapping ellipses make an irregular border
        rx, ry = rng.uniform(0.12, 0.24) * width, rng.uniform(0.14, 0.28) * height
        ox, oy = rng.normal(0, 0.05 * width), rng.normal(0, 0.05 * height)
        draw.ellipse((cx + ox - rx, cy + oy - ry, cx + ox + rx, cy + oy + ry), fill=255)
    mask = mask.filter(ImageFilter.GaussianBlur(6))
    brown = np.array([110 * (1 - dark) + 40, 70 * (1 - dark) + 25, 50 * (1 - dark) + 20], np.float32)
    # Light and dark patches across the blotch, and a speckle of pigment.
    field = np.asarray(Image.fromarray((rng.uniform(0, 255, (7, 9))).astype(np.uint8)).resize(
        size, Image.Resampling.BICUBIC), dtype=np.float32)[..., None] / 255
    texture = brown * (0.55 + 0.9 * field) + rng.normal(0, 14, (height, width, 3))
    blotch = Image.fromarray(np.clip(texture, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(2))
    picture = Image.composite(blotch, picture, mask)
    out = io.BytesIO()
    picture.save(out, "JPEG", quality=90)
    return out.getvalue()


def overlay_png(lesion: bytes) -> bytes:
    """A Grad-CAM-like overlay of a picture: a heat map around its dark part, blended as the
    worker blends its own (jet colours, 40%)."""
    from matplotlib import colormaps

    picture = np.asarray(Image.open(io.BytesIO(lesion)).convert("RGB"), dtype=np.float32)
    darkness = 1 - picture.mean(axis=2) / 255
    heat = np.asarray(Image.fromarray((darkness * 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(40)), dtype=np.float32)
    heat = (heat - heat.min()) / max(1e-6, float(heat.max() - heat.min()))
    colours = colormaps["jet"](heat)[..., :3] * 255
    out = io.BytesIO()
    Image.fromarray(np.clip(0.6 * picture + 0.4 * colours, 0, 255).astype(np.uint8)).save(out, "PNG")
    return out.getvalue()


def probabilities(melanoma: float, seed: int) -> dict[str, float]:
    """Class probabilities summing to 1 with this melanoma probability."""
    rest = np.random.default_rng(seed).dirichlet(np.ones(len(CLASSES) - 1) * 0.7) * (1 - melanoma)
    others = iter(rest)
    return {c: (melanoma if c == "melanoma" else float(next(others))) for c in CLASSES}


#: (source, seed, p(melanoma), days ago, verdict or None)
CASES = (
    ("clinic-a/patient-17/back-left/2026-12-04.jpg", 1, 0.874, 0, None),
    ("clinic-a/patient-17/back-left/2026-06-02.jpg", 2, 0.058, 185, Verdict.BENIGN),
    ("clinic-a/patient-17/arm-right/2026-12-04.jpg", 3, 0.012, 0, None),
    ("clinic-a/patient-3/chest/2026-12-04.jpg", 4, 0.412, 0, None),
    ("clinic-b/patient-8/scalp/2026-12-03.jpg", 5, 0.066, 1, None),
    ("clinic-b/patient-2/shin/2026-12-03.jpg", 6, 0.009, 1, None),
)


def seed(database_url: str, store: Path, overlays: Path) -> dict[str, str]:
    """The demo images, their predictions, one reviewer's account and review; source -> sha256."""
    sessions = make_session_factory(database_url)
    now = datetime.now(UTC).replace(hour=9, minute=12)
    shas: dict[str, str] = {}
    with sessions.begin() as session:
        accounts.add_user(session, name="ann", email="ann@clinic.example", role=Role.REVIEWER,
                          password_hash=hash_password(PASSWORD), now=now)
    for source, number, melanoma, days, verdict in CASES:
        content = lesion_jpeg(number, dark=min(0.9, 0.3 + melanoma))
        sha = hashlib.sha256(content).hexdigest()
        (store / f"{sha}.jpg").write_bytes(content)
        when = now - timedelta(days=days, minutes=7 * number)
        with sessions.begin() as session:
            image = images.add_image(session, sha256=sha, source=source, size_bytes=len(content),
                                     location=str(store / f"{sha}.jpg"), received_at=when)
            images.claim_images(session, [image.id], token="t", now=when,
                                stale_before=when - timedelta(hours=1), max_attempts=5)
            scores = probabilities(melanoma, number)
            images.finish_screened(session, image.id, token="t", now=when, model_version=MODEL,
                                   probabilities=scores, melanoma_probability=melanoma,
                                   predicted_class=max(scores, key=lambda c: scores[c]),
                                   threshold=THRESHOLD, seconds=0.2, flagged=melanoma >= THRESHOLD)
            if verdict is not None:
                user = accounts.find_user(session, "ann")
                assert user is not None
                reviews.add_review(session, image, user, verdict=verdict, diagnosis="nevus",
                                   note="Stable, regular network.", now=when + timedelta(hours=3))
        # The thumbnail the worker stores at screening time.
        store_thumbnail(store / f"{sha}.jpg", sha, overlays.with_name("thumbnails"))
        if melanoma >= THRESHOLD:
            (overlays / f"{sha}.png").write_bytes(overlay_png(content))
        shas[source] = sha
    sessions.kw["bind"].dispose()
    return shas


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def review_app(database_url: str, overlays: Path) -> Iterator[str]:
    """The review app under uvicorn on a free loopback port; its address."""
    import uvicorn

    from web.app import create_app
    from web.deps import WebConfig

    config = WebConfig(database_url=database_url, secret="screenshots-" + "x" * 40,
                       overlays_dir=overlays, thumbnails_dir=overlays.with_name("thumbnails"),
                       session_seconds=3600)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(config), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the review app did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def alert_html(shas: dict[str, str]) -> str:
    """The HTML part of an alert about the flagged demo images, pictures inline as data: URIs."""
    flagged = [case for case in CASES if case[2] >= THRESHOLD and case[3] <= 1]
    items = []
    for source, number, melanoma, days, _ in flagged:
        picture = lesion_jpeg(number, dark=min(0.9, 0.3 + melanoma))
        scores = probabilities(melanoma, number)
        items.append(FlaggedImage(
            source=source, melanoma_probability=melanoma, probabilities=scores,
            predicted_class=max(scores, key=lambda c: scores[c]),
            received_at=datetime.now(UTC) - timedelta(days=days), image=picture,
            gradcam_png=overlay_png(picture),
            url=f"https://review.clinic.example/images/{shas[source]}"))
    content = AlertContent(images=items, model_version=MODEL, threshold=THRESHOLD,
                           timezone="Europe/Berlin",
                           threshold_meaning=threshold_sentence(None, THRESHOLD, MODEL),
                           benign_record=benign_alerts_sentence(61, 74, MODEL))
    composed = compose_alert(content, message_id="<demo@melanoscreen.invalid>",
                             sender="melanoscreen@clinic.example", recipient="oncall@clinic.example")
    message = email.message_from_bytes(composed.raw, policy=policy.default)
    pictures = {}
    html = ""
    for part in message.walk():
        if part.get_content_type() == "text/html":
            html = part.get_content()
        elif part.get_content_maintype() == "image":
            cid = str(part["Content-ID"]).strip("<>")
            data = part.get_payload(decode=True)
            assert isinstance(data, bytes)
            pictures[cid] = (f"data:{part.get_content_type()};base64,"
                             + base64.b64encode(data).decode("ascii"))
    return re.sub(r"cid:([^\"']+)", lambda m: pictures.get(m.group(1), m.group(0)), html)


def main() -> None:
    """Seed, start, log in, take the pictures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "images")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium is not installed (apt-get install chromium)")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        store, overlays = root / "store", root / "overlays"
        store.mkdir()
        overlays.mkdir()
        database_url = f"sqlite:///{root / 'demo.db'}"
        upgrade(database_url)
        shas = seed(database_url, store, overlays)
        with review_app(database_url, overlays) as url, sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, headless=True,
                                                 args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1180})
                page.goto(f"{url}/login")
                page.fill("input[name=name]", "ann")
                page.fill("input[name=password]", PASSWORD)
                page.click("button[type=submit]")
                page.wait_for_url(re.compile(r".*/s/[A-Za-z0-9_-]+/$"))
                page.screenshot(path=str(args.out / "worklist.png"))
                page.click("text=Read the unreviewed flagged cases")
                page.wait_for_url(re.compile(r".*/images/[0-9a-f]{64}$"))
                page.check("input[value=refer]")
                page.select_option("select[name=diagnosis]", "melanoma")
                page.fill("textarea[name=note]", "Asymmetric, atypical network, new since June: excise.")
                # Down to the patient's other images, below the reading area.
                box = page.locator("#patient-images").bounding_box()
                bottom = (box["y"] + box["height"] + 16) if box else 1180
                page.screenshot(path=str(args.out / "case-page.png"), full_page=True,
                                clip={"x": 0, "y": 0, "width": 1400, "height": bottom})
                mail = browser.new_page(viewport={"width": 900, "height": 1000})
                mail.set_content(alert_html(shas))
                mail.screenshot(path=str(args.out / "alert.png"), clip={
                    "x": 0, "y": 0, "width": 900,
                    "height": min(1500, mail.evaluate("() => document.body.scrollHeight"))})
            finally:
                browser.close()
    for name in ("case-page.png", "worklist.png", "alert.png"):
        print(args.out / name)


if __name__ == "__main__":
    main()
