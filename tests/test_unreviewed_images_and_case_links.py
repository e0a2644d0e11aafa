"""The digest lists flagged images still unreviewed after 24 hours at its top, linked to the
review app when MELANOSCREEN_PUBLIC_URL is set."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

from web_fixtures import add_account, seed_image

from db import accounts, reviews
from db.images import find_image_by_sha256
from db.schema import Verdict
from db.session import make_session_factory
from service.digest_message import render_digest_html, render_digest_text
from service.digests import build_digest_content


def test_flagged_images_unreviewed_after_a_day_head_the_digest_and_reviewed_ones_do_not(
        tmp_path: Path, database_url: str) -> None:
    sessions = make_session_factory(database_url)
    day = date(2026, 11, 26)
    end = datetime.combine(day, time(7, 0), UTC)
    old = end - timedelta(days=2)
    forgotten = seed_image(sessions, tmp_path, source="clinic-a/<i>old</i>.jpg", seed=1,
                           melanoma=0.93, received_at=old)
    reviewed = seed_image(sessions, tmp_path, source="clinic-a/reviewed.jpg", seed=2, melanoma=0.8,
                          received_at=old)
    seed_image(sessions, tmp_path, source="clinic-a/fresh.jpg", seed=3, melanoma=0.9,
               received_at=end - timedelta(hours=3))
    seed_image(sessions, tmp_path, source="clinic-a/benign.jpg", seed=4, melanoma=0.1, received_at=old)
    add_account(sessions, "ann")
    with sessions.begin() as session:
        image, user = find_image_by_sha256(session, reviewed), accounts.find_user(session, "ann")
        assert image is not None and user is not None
        reviews.add_review(session, image, user, verdict=Verdict.BENIGN, diagnosis=None, note="",
                           now=old + timedelta(hours=1))
    with sessions.begin() as session:
        content = build_digest_content(session, day, time(7, 0), "UTC", None,
                                       "https://review.clinic.example/")
    assert [i.source for i in content.unreviewed_images] == ["clinic-a/<i>old</i>.jpg"]
    text, page = render_digest_text(content), render_digest_html(content, inline_images="data")
    assert "FLAGGED AND STILL NOT REVIEWED AFTER 24 HOURS (1)" in text
    assert text.index("NOT REVIEWED") < text.index("Screened:")
    assert f"https://review.clinic.example/images/{forgotten}" in text
    assert page.index("not reviewed after 24 hours") < page.index(">screened<")
    assert f'<a href="https://review.clinic.example/images/{forgotten}">' in page
    assert "<i>old</i>" not in page and "&lt;i&gt;old&lt;/i&gt;" in page
    sessions.kw["bind"].dispose()


def test_with_a_public_url_an_alert_links_each_image_to_its_case_page() -> None:
    from email import policy
    from email.parser import BytesParser

    from db.outbox import AlertItem
    from service.delivery import compose_alert_message

    item = AlertItem(source="clinic-a/x.jpg", location="/nonexistent/x.jpg",
                     received_at=datetime(2026, 11, 24, 9, 0, tzinfo=UTC), melanoma_probability=0.9,
                     probabilities={"melanoma": 0.9, "nevus": 0.1}, predicted_class="melanoma",
                     model_version="v", threshold=0.5, sha256="a" * 64)
    for public_url, expect in (("https://review.example/", True), (None, False)):
        raw = compose_alert_message([item], message_id="<m1@x.test>", recipient="d@x.test",
                                    sender="s@x.test", timezone="UTC", overlay=None,
                                    public_url=public_url).raw
        message = BytesParser(policy=policy.default).parsebytes(raw)
        text = message.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]
        html = message.get_body(preferencelist=("html",)).get_content()  # type: ignore[union-attr]
        link = f"https://review.example/images/{'a' * 64}"
        assert (link in text) == expect and (f'href="{link}"' in html) == expect


def _alert_bodies(items: list[Any], **options: Any) -> tuple[str, str]:
    from email import policy
    from email.parser import BytesParser

    from service.delivery import compose_alert_message

    raw = compose_alert_message(items, message_id="<m2@x.test>", recipient="d@x.test",
                                sender="s@x.test", timezone="UTC", overlay=None, **options).raw
    message = BytesParser(policy=policy.default).parsebytes(raw)
    text = message.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]
    html = message.get_body(preferencelist=("html",)).get_content()  # type: ignore[union-attr]
    return text, html


def _alert_item(source: str, p: float, sha: str) -> Any:
    from db.outbox import AlertItem

    return AlertItem(source=source, location="/nonexistent/x.jpg",
                     received_at=datetime(2026, 11, 24, 9, 0, tzinfo=UTC), melanoma_probability=p,
                     probabilities={"melanoma": p, "nevus": 1 - p}, predicted_class="melanoma",
                     model_version="v", threshold=0.5, sha256=sha * 64)


def test_without_a_public_url_an_alert_says_where_the_review_app_is_and_how_to_reach_it() -> None:
    """An alert used to end with no link and no word of where to review."""
    item = _alert_item("clinic-a/x.jpg", 0.9, "a")
    text, html = _alert_bodies([item], public_url=None, local_url="http://127.0.0.1:8080")
    for body in (text, html):
        assert "http://127.0.0.1:8080" in body
        assert "ssh -L 8080:127.0.0.1:8080" in body and "MELANOSCREEN_PUBLIC_URL" in body
    # With a public address, its links are enough: no hint about the local one.
    text, _ = _alert_bodies([item], public_url="https://review.example/",
                            local_url="http://127.0.0.1:8080")
    assert "127.0.0.1" not in text


def test_an_alert_of_several_images_opens_with_a_summary_table_highest_first() -> None:
    items = [_alert_item(f"clinic-a/p{n}.jpg", p, s)
             for n, p, s in ((1, 0.61, "a"), (2, 0.93, "b"), (3, 0.72, "c"))]
    text, html = _alert_bodies(items, public_url="https://review.example/")
    summary = text.index("Summary")
    assert summary < text.index("1. clinic-a/p2.jpg")
    lines = text[summary:].splitlines()[1:4]
    assert [line.split()[-2] for line in lines] == ["clinic-a/p2.jpg", "clinic-a/p3.jpg",
                                                   "clinic-a/p1.jpg"]
    assert html.index("Summary") < html.index("<h2")
    table = html[html.index("Summary"):html.index("<h2")]
    assert table.count("<tr>") == 4 and f'href="https://review.example/images/{"b" * 64}"' in table
    single, _ = _alert_bodies(items[:1], public_url=None)
    assert "Summary" not in single
