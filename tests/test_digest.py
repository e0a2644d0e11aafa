"""The nightly digest: owed dates and windows across DST, the HTML and text, delivery, rendering."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
from datetime import UTC, date, datetime, time, timedelta
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from mail_fixtures import (
    LOOPBACK,
    RecordingHandler,
    decoded_images,
    image_parts,
    smtp_server,
    synthetic_lesion,
)
from PIL import Image

from melanoscreen.settings import SmtpSettings
from service.digest_message import (
    DigestContent,
    DigestImage,
    FileProblem,
    OutOfScopeImage,
    UndeliveredAlert,
    compose_digest,
    digest_key,
    digest_subject,
    render_digest_html,
    render_digest_text,
)
from service.digests import digest_due_dates, digest_period
from service.mail import deliver
from service.messages import recipient_message_id

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
SEVEN = time(7, 0)
DAY = date(2026, 11, 24)
DOCS_SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "digest.png"
DOCTOR = "dr.a@clinic.test"


def seeded_digest(*, flagged: bool = True, undelivered: bool = False) -> DigestContent:
    """A realistic day: 57 screened, 3 flagged (given out of order), 2 rejected, 1 failed."""
    start, end = digest_period(DAY, SEVEN, BERLIN)
    images = [
        DigestImage(
            "clinic-a/patient-17/lesion2.jpg",
            0.874,
            "melanoma",
            datetime(2026, 11, 23, 9, 12, tzinfo=UTC),
            synthetic_lesion(11, 300),
        ),
        DigestImage(
            "clinic-b/patient-03/back-left.png",
            0.912,
            "melanoma",
            datetime(2026, 11, 23, 14, 40, tzinfo=UTC),
            synthetic_lesion(12, 300, "PNG"),
        ),
        DigestImage(
            "clinic-a/patient-22/arm.jpg",
            0.412,
            "nevus",
            datetime(2026, 11, 24, 5, 3, tzinfo=UTC),
            synthetic_lesion(13, 300),
        ),
    ]
    return DigestContent(
        day=DAY,
        period_start=start,
        period_end=end,
        timezone="Europe/Berlin",
        screened=57,
        flagged=3 if flagged else 0,
        rejected=2,
        failed=1,
        flagged_images=images if flagged else [],
        rejected_files=[
            FileProblem("clinic-a/scan-0042.pdf", "not an image (PDF document)"),
            FileProblem("clinic-c/patient-09/lesion.jpg", "truncated JPEG"),
        ],
        failed_files=[FileProblem("clinic-b/patient-11/x.jpg", "worker lost 3 times")],
        undelivered_alerts=(
            [
                UndeliveredAlert(
                    "Melanoma suspected (p=0.41): clinic-a/patient-22/arm.jpg",
                    "SMTP server mail.clinic.test:587 unreachable",
                    attempts=6,
                )
            ]
            if undelivered
            else []
        ),
        model_version="dermnet-2026.11",
        threshold=0.35,
    )


# --- which days are owed, which window each covers -------------------------------------------


@pytest.mark.parametrize(
    ("tz", "day", "hours"),
    [
        (BERLIN, date(2026, 3, 29), 23),  # spring forward
        (BERLIN, date(2026, 3, 30), 24),
        (BERLIN, date(2026, 10, 25), 25),  # fall back
        (NEW_YORK, date(2026, 3, 8), 23),
        (NEW_YORK, date(2026, 11, 1), 25),
        (NEW_YORK, date(2026, 11, 2), 24),
    ],
)
def test_a_digest_covers_23_or_25_hours_across_a_dst_change(tz: ZoneInfo, day: date, hours: int) -> None:
    start, end = digest_period(day, SEVEN, tz)
    assert end - start == timedelta(hours=hours)
    assert start.tzinfo is not None and start.utcoffset() == timedelta(0)
    assert end.astimezone(tz).replace(tzinfo=None) == datetime.combine(day, SEVEN)
    assert start.astimezone(tz).replace(tzinfo=None) == datetime.combine(day - timedelta(days=1), SEVEN)


@pytest.mark.parametrize("tz", [BERLIN, NEW_YORK])
@pytest.mark.parametrize("at", [time(0, 0), time(2, 30), time(7, 0), time(23, 30)])
def test_the_windows_of_a_year_tile_time_without_gap_or_overlap(tz: ZoneInfo, at: time) -> None:
    days = [date(2026, 1, 1) + timedelta(days=n) for n in range(365)]
    periods = [digest_period(d, at, tz) for d in days]
    for (_, end), (start, _) in itertools.pairwise(periods):
        assert end == start
    lengths = sorted((end - start) / timedelta(hours=1) for start, end in periods)
    assert lengths[0] == 23 and lengths[-1] == 25 and lengths.count(24) == 363


def test_the_digest_is_due_only_from_its_time() -> None:
    before = datetime(2026, 11, 24, 5, 59, tzinfo=UTC)  # 06:59 in Berlin
    at = datetime(2026, 11, 24, 6, 0, tzinfo=UTC)  # 07:00 in Berlin
    assert digest_due_dates(date(2026, 11, 23), before, SEVEN, BERLIN) == []
    assert digest_due_dates(date(2026, 11, 23), at, SEVEN, BERLIN) == [DAY]
    assert digest_due_dates(None, before, SEVEN, BERLIN) == [date(2026, 11, 23)]


def test_three_missed_days_are_caught_up_across_spring_forward() -> None:
    now = datetime(2026, 3, 30, 8, 0, tzinfo=BERLIN)
    assert digest_due_dates(date(2026, 3, 27), now, SEVEN, BERLIN) == [
        date(2026, 3, 28),
        date(2026, 3, 29),
        date(2026, 3, 30),
    ]


def test_a_day_already_sent_is_not_owed_again_on_the_long_fall_back_day() -> None:
    for hour in range(0, 24):  # every hour of the 25-hour day, in UTC
        now = datetime(2026, 10, 25, 5, 0, tzinfo=UTC) + timedelta(hours=hour)
        assert digest_due_dates(date(2026, 10, 25), now, SEVEN, BERLIN) == []


def test_now_must_be_aware() -> None:
    with pytest.raises(ValueError, match="aware"):
        digest_due_dates(None, datetime(2026, 1, 1, 8, 0), SEVEN, BERLIN)


@pytest.mark.parametrize("tz", [BERLIN, NEW_YORK])
@pytest.mark.parametrize("at", [time(0, 0), time(1, 30), time(2, 30), time(7, 0), time(23, 59)])
def test_a_beat_ticking_every_ten_minutes_sends_each_day_exactly_once(tz: ZoneInfo, at: time) -> None:
    """Simulate the beat through both 2026 DST changes, sending whatever is owed at each tick."""
    sent: list[date] = []
    last: date | None = date(2026, 3, 1)
    now = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    while now < datetime(2026, 11, 10, tzinfo=UTC):
        for day in digest_due_dates(last, now, at, tz):
            closes = digest_period(day, at, tz)[1]
            assert closes <= now < closes + timedelta(minutes=10)  # on time, never early
            sent.append(day)
            last = day
        now += timedelta(minutes=10)
    expected = [date(2026, 3, 2) + timedelta(days=n) for n in range(len(sent))]
    assert sent == expected
    assert sent[-1] >= date(2026, 11, 8)  # 2026-11-10 00:00 UTC is still the 9th in New York


# --- the email -------------------------------------------------------------------------------


def test_subjects_say_how_many_were_flagged_or_that_nothing_was() -> None:
    assert digest_subject(seeded_digest()) == "MelanoScreen digest 2026-11-24: 3 flagged of 57 screened"
    assert (
        digest_subject(seeded_digest(flagged=False))
        == "MelanoScreen digest 2026-11-24: nothing flagged (57 screened)"
    )
    assert digest_subject(seeded_digest(undelivered=True)).endswith(", 1 alert NOT delivered")


def test_the_html_has_the_counts_and_one_row_per_flagged_image_highest_first() -> None:
    page = render_digest_html(seeded_digest(undelivered=True), inline_images="data")

    counts = dict(re.findall(r">(\d+)</div><div[^>]*>(screened|flagged|rejected|failed)<", page))
    assert {v: int(k) for k, v in counts.items()} == {
        "screened": 57,
        "flagged": 3,
        "rejected": 2,
        "failed": 1,
    }
    order = [page.index(name) for name in ("back-left.png", "lesion2.jpg", "arm.jpg")]
    assert order == sorted(order)
    assert page.count("data:image/jpeg;base64,") == 3 and "cid:" not in page
    for text in (
        "0.912",
        "0.874",
        "0.412",
        "scan-0042.pdf",
        "truncated JPEG",
        "worker lost 3 times",
        "could not be delivered",
        "unreachable",
        "dermnet-2026.11",
        "0.35",
        "screening aid, not a diagnosis",
        "2026-11-23 07:00 to 2026-11-24 07:00 (Europe/Berlin)",
        "2026-11-23 15:40",
    ):  # 14:40 UTC in Berlin
        assert text in page, text


def test_a_quiet_day_gets_a_short_digest_that_says_so() -> None:
    content = seeded_digest(flagged=False)
    composed = compose_digest(content, message_id=recipient_message_id(digest_key(DAY), DOCTOR),
                              sender="ms@clinic.test", recipient=DOCTOR)
    message = BytesParser(policy=policy.default).parsebytes(composed.raw)
    assert isinstance(message, EmailMessage)
    text = message.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]
    page = render_digest_html(content)
    assert "Nothing was flagged in this period." in text
    assert "Nothing was flagged in this period." in page
    assert "<img" not in page and image_parts(message) == []


def test_the_digest_is_delivered_with_inline_thumbnails(tmp_path: Path) -> None:
    handler = RecordingHandler()
    content = seeded_digest()
    with smtp_server(handler) as controller:
        config = SmtpSettings(host=LOOPBACK, port=controller.port, security="none",
                              sender="ms@clinic.test")
        message = compose_digest(content, message_id=recipient_message_id(digest_key(DAY), DOCTOR),
                                 sender=config.sender, recipient=DOCTOR)
        deliver(message, config, tmp_path)
        [received] = handler.wait_for(1)

    assert received.rcpt_tos == [DOCTOR]
    got = received.message
    assert got["Subject"] == "MelanoScreen digest 2026-11-24: 3 flagged of 57 screened"
    assert got["Message-ID"].startswith("<digest-2026-11-24.")
    assert got["Message-ID"].endswith("@melanoscreen.invalid>")
    page = got.get_body(preferencelist=("html",)).get_content()  # type: ignore[union-attr]
    parts = image_parts(got)
    assert {p["Content-ID"].strip("<>") for p in parts} == set(re.findall(r'src="cid:([^"]+)"', page))
    assert page.replace("\r\n", "\n") == render_digest_html(content, inline_images="cid")
    assert all(max(image.size) <= 96 for image in decoded_images(parts))


# --- what it looks like ----------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (apt-get install chromium)")
def test_the_digest_renders_in_headless_chromium(tmp_path: Path) -> None:
    page = tmp_path / "digest.html"
    page.write_text(render_digest_html(seeded_digest(undelivered=True), inline_images="data"))
    shot = tmp_path / "digest.png"
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1000,1200",
        page.as_uri(),
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=180)

    with Image.open(shot) as image:
        assert image.size == (1000, 1200)
        rgb = image.convert("RGB")
        colours = rgb.getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 200  # text, thumbnails, not one colour
        # The dark header band and the red flagged count are where the layout puts them.
        assert rgb.getpixel((500, 40))[0] < 60  # type: ignore[index]
        reds = sum(n for n, (r, g, b) in colours if r > 150 and g < 60 and b < 60)  # type: ignore[misc]
        assert reds > 100
    if os.environ.get("MELANOSCREEN_UPDATE_DOCS"):
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, DOCS_SCREENSHOT)


def test_out_of_scope_images_have_their_own_section_with_escaped_names() -> None:
    content = seeded_digest()
    content = DigestContent(
        **{**content.__dict__,
           "out_of_scope_images": [
               OutOfScopeImage("clinic-a/<b>scan</b>-letter.jpg", datetime(2026, 11, 23, 10, 5, tzinfo=UTC)),
               OutOfScopeImage("clinic-b/blank.png", datetime(2026, 11, 23, 11, 0, tzinfo=UTC))],
           "threshold_meaning": "at this threshold the model caught 95% of melanomas in validation "
                                "(images it had not been trained on)"})
    composed = compose_digest(content, message_id=recipient_message_id(digest_key(DAY), DOCTOR),
                              sender="ms@clinic.test", recipient=DOCTOR)
    message = BytesParser(policy=policy.default).parsebytes(composed.raw)
    assert isinstance(message, EmailMessage)
    text = message.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]
    page = render_digest_html(content, inline_images="data")

    assert "Out of scope: unlike the images the model learnt from (2)" in text
    assert "Out of scope: unlike the images the model learnt from (2)" in page
    assert "clinic-b/blank.png" in text and "clinic-b/blank.png" in page
    assert "<b>scan</b>" not in page and "&lt;b&gt;scan&lt;/b&gt;-letter.jpg" in page
    assert "2026-11-23 11:05" in page  # received, on the clinic's clock
    # Listed apart: the flagged section is unchanged and the subject too.
    assert digest_subject(content) == digest_subject(seeded_digest())
    assert "At this threshold the model caught 95% of melanomas in validation" in text
    assert "0.35: at this threshold the model caught 95%" in page


def test_a_digest_row_just_above_its_threshold_shows_the_digits_that_tell_them_apart() -> None:
    start, end = digest_period(DAY, SEVEN, BERLIN)
    content = DigestContent(
        day=DAY, period_start=start, period_end=end, timezone="Europe/Berlin", screened=1,
        flagged=1, rejected=0, failed=0, threshold=0.05,
        flagged_images=[DigestImage("close.jpg", 0.05004, "nevus",
                                    datetime(2026, 11, 23, 9, 0, tzinfo=UTC), threshold=0.05)])
    page = render_digest_html(content)
    composed = compose_digest(content, message_id=recipient_message_id(digest_key(DAY), DOCTOR),
                              sender="ms@clinic.test", recipient=DOCTOR)
    message = BytesParser(policy=policy.default).parsebytes(composed.raw)
    assert isinstance(message, EmailMessage)
    text = message.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]
    assert "0.05004  close.jpg" in text and "Alert threshold: 0.05" in text
    assert ">0.05004</td>" in page


def test_no_digest_is_owed_for_a_window_that_ended_before_the_first_start() -> None:
    tz = ZoneInfo("Europe/Berlin")
    now = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
    # Installed this morning after 07:00: the digest of the 20th covers the 19th, before us.
    installed = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
    assert digest_due_dates(None, now, time(7, 0), tz, first_start=installed) == []
    # Installed yesterday evening: the window of the 20th saw the service run; it is owed.
    installed = datetime(2026, 11, 19, 18, 0, tzinfo=UTC)
    assert digest_due_dates(None, now, time(7, 0), tz, first_start=installed) == [date(2026, 11, 20)]
    assert digest_due_dates(None, now, time(7, 0), tz) == [date(2026, 11, 20)]


def test_the_digest_is_headed_with_the_days_it_covers_not_the_day_it_is_due() -> None:
    """The digest due on Saturday 07:00 covers Friday 07:00 to Saturday 07:00: its heading says so,
    not "Saturday" alone (which read as if it covered a day not yet begun)."""
    due = date(2026, 12, 5)
    start, end = digest_period(due, SEVEN, BERLIN)
    content = DigestContent(day=due, period_start=start, period_end=end, timezone="Europe/Berlin",
                            screened=0, flagged=0, rejected=0, failed=0)
    covers = "Friday 04 December 2026 07:00 to Saturday 05 December 2026 07:00"
    html = render_digest_html(content)
    heading = re.search(r"MelanoScreen daily digest</div><div[^>]*>([^<]*)<", html)
    assert heading is not None and heading.group(1).startswith(covers)
    assert f"Covers: {covers} (Europe/Berlin)" in render_digest_text(content)
