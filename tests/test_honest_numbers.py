"""Numbers where people decide: the alert says what share of its model's reviewed alerts were
benign (or that too few are reviewed to say), and `/performance` gives 95% intervals and hides
shares of fewer than 20 reviews."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker
from web_fixtures import LiveApp, add_account, live_app, seed_image

from db import accounts, reviews
from db.images import find_image_by_sha256
from db.outbox import AlertItem
from db.schema import Verdict
from db.session import make_session_factory
from service.delivery import alert_record, compose_alert_message
from service.rates import MIN_REVIEWS, wilson_interval
from web.charts import daily_chart_svg

__all__ = ["live_app"]


def review_flagged(sessions: sessionmaker[Session], folder: Path, verdicts: list[Verdict],
                   first_seed: int = 100) -> None:
    """One flagged image of model tiny-1 per verdict, reviewed with it by `ann`."""
    when = datetime.now(UTC) - timedelta(days=1)
    for number, verdict in enumerate(verdicts):
        sha = seed_image(sessions, folder, source=f"clinic-r/patient-{number}/a.jpg",
                         seed=first_seed + number, melanoma=0.8, received_at=when)
        with sessions.begin() as session:
            image, user = find_image_by_sha256(session, sha), accounts.find_user(session, "ann")
            assert image is not None and user is not None
            reviews.add_review(session, image, user, verdict=verdict, diagnosis=None, note="",
                               now=when + timedelta(minutes=number))


def test_the_wilson_interval_matches_published_values() -> None:
    for successes, trials, low, high in ((15, 25, 0.4074, 0.7663), (0, 10, 0.0, 0.2775),
                                         (20, 20, 0.8389, 1.0), (1, 2, 0.0945, 0.9055)):
        got = wilson_interval(successes, trials)
        assert got == pytest.approx((low, high), abs=5e-4), (successes, trials)


def test_an_alert_says_what_share_of_its_models_reviewed_alerts_were_benign(
        tmp_path: Path, database_url: str) -> None:
    """An alert said how many melanomas the threshold catches, never how many alerts were benign."""
    sessions = make_session_factory(database_url)
    add_account(sessions, "ann")
    review_flagged(sessions, tmp_path, [Verdict.BENIGN] * 3)
    with sessions.begin() as session:
        few = alert_record(session, "tiny-1")
    assert few == (f"Too few alerts of model tiny-1 have been reviewed yet (3; {MIN_REVIEWS} are "
                   "needed) to say what share turned out benign.")
    review_flagged(sessions, tmp_path, [Verdict.BENIGN] * 12 + [Verdict.REFER] * 9 + [Verdict.NOT_ASSESSABLE],
                   first_seed=200)
    with sessions.begin() as session:
        enough = alert_record(session, "tiny-1")
        other = alert_record(session, "tiny-2")
    assert enough == ("Of the 25 alerts of model tiny-1 that reviewers have judged, 15 (60%, "
                      "95% interval 41–77%) were benign.")
    assert other.startswith("Too few alerts of model tiny-2 have been reviewed yet (0;")
    item = AlertItem(source="clinic-a/x.jpg", location="/nonexistent/x.jpg",
                     received_at=datetime(2026, 11, 24, 9, 0, tzinfo=UTC), melanoma_probability=0.9,
                     probabilities={"melanoma": 0.9, "nevus": 0.1}, predicted_class="melanoma",
                     model_version="tiny-1", threshold=0.5, sha256="a" * 64)
    from email import policy
    from email.parser import BytesParser

    raw = compose_alert_message([item], message_id="<m@x.test>", recipient="d@x.test",
                                sender="s@x.test", timezone="UTC", overlay=None,
                                benign_record=enough).raw
    message = BytesParser(policy=policy.default).parsebytes(raw)
    for kind in ("plain", "html"):
        body = message.get_body(preferencelist=(kind,)).get_content()  # type: ignore[union-attr]
        assert "15 (60%, 95% interval 41–77%) were benign" in body
    sessions.kw["bind"].dispose()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_performance_hides_shares_of_few_reviews_and_gives_intervals_once_there_are_enough(
        live_app: LiveApp) -> None:
    """`/performance` printed "PPV 50%" from 2 reviews, with no interval."""
    review_flagged(live_app.sessions, live_app.store, [Verdict.REFER, Verdict.BENIGN])
    page = live_app.login().get("/performance").text
    ppv = re.search(r'<td class="ppv">(.*?)</td>', page, re.S)
    assert ppv and "too few reviews (2 of 20)" in ppv.group(1) and "%" not in ppv.group(1)
    review_flagged(live_app.sessions, live_app.store, [Verdict.REFER] * 10 + [Verdict.BENIGN] * 12,
                   first_seed=300)
    page = live_app.login().get("/performance").text
    ppv = re.search(r'<td class="ppv">(.*?)</td>', page, re.S)
    benign = re.search(r'<td class="benign">(.*?)</td>', page, re.S)
    assert ppv and benign
    # 11 refer of 24 reviewed: 46%, Wilson 95% 28–65%.
    assert re.sub(r"<[^>]+>", "", ppv.group(1)).split() == ["46%", "(28%–65%;", "11/24)"]
    assert re.sub(r"<[^>]+>", "", benign.group(1)).split() == ["54%", "(35%–72%;", "13/24)"]


def test_the_charts_axis_labels_are_ink_at_a_readable_size() -> None:
    """The chart's labels were 10 px of a pale grey with a pale outline."""
    from datetime import date

    svg = str(daily_chart_svg([(date(2026, 12, 1), 3, 1), (date(2026, 12, 2), 5, 4)]))
    labels = re.findall(r"<text[^>]*class='([^']+)'[^>]*>([^<]*)</text>", svg)
    assert {cls for cls, _ in labels} == {"axis-label"}
    assert {"0", "5", "12-01", "12-02"} <= {text for _, text in labels}
    css = (Path(__file__).resolve().parent.parent / "web" / "static" / "style.css").read_text()
    rule = re.search(r"svg \.axis-label \{([^}]*)\}", css)
    assert rule and "stroke" not in rule.group(1) and "var(--ink)" in rule.group(1)
    size = re.search(r"font-size: (\d+)px", rule.group(1))
    assert size and int(size.group(1)) >= 13
