"""The review app over real HTTP (uvicorn on loopback): logins, CSRF, roles, escaping, the API."""

from __future__ import annotations

import html
import re
from pathlib import Path

import pytest
from fastapi.routing import APIRoute
from sqlalchemy import select
from starlette.routing import Mount
from web_fixtures import HOSTILE_NAME, PASSWORD, LiveApp, csrf_of, live_app

from db.schema import AuditEvent, Review, User
from service.pictures import store_thumbnail
from web.app import PUBLIC_PATHS, ROUTERS, create_app
from web.deps import WebConfig

__all__ = ["live_app"]  # the fixture, used by name below


def _routes() -> list[APIRoute]:
    """Every route of the app: the routes of each router it includes."""
    app = create_app(WebConfig(database_url="sqlite://", secret="s", overlays_dir=Path(".")))
    assert len([r for r in app.routes if not isinstance(r, Mount)]) == len(ROUTERS)
    routes = [route for router in ROUTERS for route in router.routes]
    assert all(isinstance(route, APIRoute) for route in routes)
    return routes  # type: ignore[return-value]


def test_every_route_but_login_and_logout_refuses_an_anonymous_request(live_app: LiveApp) -> None:
    sha = live_app.flagged
    client = live_app.client()
    checked = 0
    for route in _routes():
        path = route.path.replace("{sha256}", sha)
        for method in route.methods or ():
            answer = client.request(method, path, data={} if method == "POST" else None)
            if route.path in PUBLIC_PATHS:
                # The login form is open; posting it (or logout) without a CSRF token is not.
                assert method == "GET" or answer.status_code == 403, (method, path)
                continue
            checked += 1
            if path.startswith("/api/"):
                assert answer.status_code == 401, (method, path, answer.status_code)
                assert answer.headers["www-authenticate"].startswith("Basic")
            else:
                # A page sends a browser to the login; a body without any login is refused unread.
                assert answer.status_code in (303, 401, 403), (method, path, answer.status_code)
                if method == "GET":
                    assert answer.headers["location"].startswith("/login?next=")
    assert checked >= 12
    # Every route says who may call it, in its summary.
    for route in _routes():
        assert (route.summary or "").split(":")[0] in ("public", "login", "admin"), route.path
        assert (route.summary or "").startswith("public") == (route.path in PUBLIC_PATHS)


def test_the_static_folder_holds_only_the_stylesheet_and_the_case_page_script() -> None:
    app = create_app(WebConfig(database_url="sqlite://", secret="s", overlays_dir=Path(".")))
    mounts = [route for route in app.routes if isinstance(route, Mount)]
    assert [m.path for m in mounts] == ["/static"]
    from web.app import HERE

    assert sorted(p.name for p in (HERE / "static").iterdir()) == ["case.js", "style.css"]


def test_a_login_sets_an_httponly_strict_cookie_scoped_to_the_sessions_own_secret_path(
        live_app: LiveApp) -> None:
    client = live_app.client()
    token = csrf_of(client.get("/login").text)
    answer = client.post("/login", data={"name": "ann", "password": PASSWORD, "csrf_token": token})
    assert answer.status_code == 303
    home = answer.headers["location"].rstrip("/")
    assert re.fullmatch(r"/s/[A-Za-z0-9_-]{40,}", home)
    cookie = next(c.lower() for c in answer.headers.get_list("set-cookie")
                  if c.startswith("melanoscreen_session="))
    assert "httponly" in cookie and "samesite=strict" in cookie and "max-age=3600" in cookie
    assert f"path={home.lower()}" in cookie
    assert client.get(f"{home}/").status_code == 200
    # The browser sends it nowhere else: at `/` the same client is not logged in.
    assert client.get("/").status_code == 303
    # A token that is not a live session's is no login, at the right path or not.
    forged = live_app.client()
    forged.cookies.set("melanoscreen_session", client.cookies["melanoscreen_session"][:-4] + "AAAA")
    assert forged.get(f"{home}/").status_code == 303


def test_five_wrong_passwords_lock_the_name_even_for_the_right_one(live_app: LiveApp) -> None:
    client = live_app.client()
    token = csrf_of(client.get("/login").text)
    for _ in range(5):
        answer = client.post("/login", data={"name": "ann", "password": "wrong", "csrf_token": token})
        assert answer.status_code == 401
    answer = client.post("/login", data={"name": "ann", "password": PASSWORD, "csrf_token": token})
    # Refused, and in the same words as a wrong password: the lock tells nobody the name exists.
    assert answer.status_code == 401 and "wrong name or password" in answer.text
    # The API's HTTP Basic is locked out too.
    assert live_app.client().get("/api/images", auth=("ann", PASSWORD)).status_code == 401
    with live_app.sessions.begin() as session:
        user = session.scalars(select(User).where(User.name == "ann")).one()
        assert user.locked_until is not None
        events = {e.action: e.detail for e in session.scalars(select(AuditEvent))}
    # Counted in one row per name and kind: five wrong passwords (the fifth locked), then two
    # attempts while locked (the form's and the API's).
    assert events["login_failed"] == "5 attempts; locked" and events["login_locked"] == "2 attempts"


def test_a_wrong_password_keeps_the_name_in_the_form_escaped(live_app: LiveApp) -> None:
    """Only the password is typed again after a mistake; a name with HTML in it stays inert."""
    client = live_app.client()
    token = csrf_of(client.get("/login").text)
    answer = client.post("/login", data={"name": "ann", "password": "wrong", "csrf_token": token})
    assert answer.status_code == 401
    assert re.search(r'<input name="name" value="ann"', answer.text)
    hostile = '"><script>alert(1)</script>'
    answer = client.post("/login", data={"name": hostile, "password": "wrong", "csrf_token": token})
    assert answer.status_code == 401 and "<script>alert(1)" not in answer.text
    assert 'value="&#34;&gt;&lt;script&gt;alert(1)&lt;/script&gt;"' in answer.text
    assert 'type="password" autocomplete="current-password" required autofocus' in answer.text


def test_a_form_without_its_csrf_token_is_refused(live_app: LiveApp) -> None:
    client = live_app.login()
    sha = live_app.flagged
    answer = client.post(f"/images/{sha}/reviews", data={"verdict": "refer"})
    assert answer.status_code == 403
    answer = client.post(f"/images/{sha}/reviews", data={"verdict": "refer", "csrf_token": "forged"})
    assert answer.status_code == 403
    # Nor does a session cookie alone post to the API: the browser must send the token.
    answer = client.post(f"/api/images/{sha}/reviews", json={"verdict": "refer"})
    assert answer.status_code == 403
    with live_app.sessions.begin() as session:
        assert session.scalars(select(Review)).all() == []


def test_a_reviewer_cannot_add_users_and_an_admin_can(live_app: LiveApp) -> None:
    reviewer = live_app.login("ann")
    token = csrf_of(reviewer.get("/").text)
    form = {"name": "bob", "email": "bob@clinic.example", "password": "another long one",
            "role": "admin", "csrf_token": token}
    assert reviewer.get("/users").status_code == 403
    assert reviewer.post("/users", data=form).status_code == 403
    admin = live_app.login("root")
    form["csrf_token"] = csrf_of(admin.get("/users").text)
    assert admin.post("/users", data=form).status_code == 303
    assert "bob@clinic.example" in admin.get("/users").text


def test_a_page_a_role_may_not_open_answers_a_page_and_the_api_keeps_json(live_app: LiveApp) -> None:
    """A reviewer opening `/users` got raw JSON in the browser; a page route now answers an HTML
    page (403, with a way back), while the API answers JSON as before."""
    reviewer = live_app.login("ann")
    page = reviewer.get("/users")
    assert page.status_code == 403 and page.headers["content-type"].startswith("text/html")
    assert "your role may not do this" in page.text and "Back to the worklist" in page.text
    form = reviewer.post(f"/images/{live_app.flagged}/reviews", data={"verdict": "refer"})
    assert form.status_code == 403 and form.headers["content-type"].startswith("text/html")
    api = reviewer.post(f"/api/images/{live_app.flagged}/reviews", json={"verdict": "refer"})
    assert api.status_code == 403 and "CSRF" in api.json()["detail"]


def test_html_in_a_source_name_or_a_note_is_shown_escaped(live_app: LiveApp) -> None:
    client = live_app.login()
    sha = live_app.hostile
    page = client.get(f"/images/{sha}").text
    token = csrf_of(page)
    note = "<b onmouseover=alert(3)>big</b> & </textarea><script>alert(4)</script>"
    assert client.post(f"/images/{sha}/reviews", data={"verdict": "benign", "note": note,
                                                       "csrf_token": token}).status_code == 303
    for page in (client.get(f"/images/{sha}").text, client.get("/").text, client.get("/audit").text):
        assert "<script>alert" not in page and "<img src=x" not in page and "<b onmouseover" not in page
    case = client.get(f"/images/{sha}")
    assert html.escape(HOSTILE_NAME, quote=False) in case.text.replace("&#34;", '"').replace("&#39;", "'")
    assert "&lt;b onmouseover=alert(3)&gt;big&lt;/b&gt; &amp; &lt;/textarea&gt;" in case.text
    # Scripts only from the app's own files: never inline, never from elsewhere.
    policy = dict(part.strip().split(" ", 1) for part in case.headers["content-security-policy"].split(";"))
    assert policy["script-src"] == "'self'" and policy["default-src"] == "'none'"
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", case.text, re.S)
    assert scripts and all(re.search(r'src="[^"]*/static/case\.js"', attrs) and not body.strip()
                           for attrs, body in scripts)


def test_the_api_answers_401_without_login_201_on_a_review_and_422_on_bad_input(live_app: LiveApp) -> None:
    client = live_app.client()
    sha = live_app.flagged
    assert client.get("/api/images").status_code == 401
    assert client.get("/api/images", auth=("ann", "wrong")).status_code == 401
    listed = client.get("/api/images", params={"flagged": "true", "reviewed": "false"},
                        auth=("ann", PASSWORD)).json()
    assert [item["melanoma_probability"] for item in listed["items"]] == [0.91, 0.7, 0.62]
    assert listed["items"][0]["sha256"] == sha and listed["items"][0]["review"] is None
    assert {"source", "status", "flagged", "model_version", "out_of_scope"} <= set(listed["items"][0])
    for bad in ({"verdict": "maybe"}, {"verdict": "refer", "diagnosis": "flu"},
                {"verdict": "refer", "extra": 1}, {}):
        answer = client.post(f"/api/images/{sha}/reviews", json=bad, auth=("ann", PASSWORD))
        assert answer.status_code == 422, bad
        assert answer.json()["detail"]
    answer = client.post(f"/api/images/{sha}/reviews", content=b"{not json",
                         headers={"content-type": "application/json"}, auth=("ann", PASSWORD))
    assert answer.status_code == 422
    with live_app.sessions.begin() as session:
        assert session.scalars(select(Review)).all() == []
    answer = client.post(f"/api/images/{sha}/reviews", auth=("ann", PASSWORD),
                         json={"verdict": "refer", "diagnosis": "melanoma", "note": "excise"})
    assert answer.status_code == 201
    stored = answer.json()
    assert stored["reviewer"] == "ann" and stored["verdict"] == "refer" and stored["created_at"]
    one = client.get(f"/api/images/{sha}", auth=("ann", PASSWORD)).json()
    assert one["review"]["verdict"] == "refer" and one["review"]["reviewer"] == "ann"
    assert len(one["predictions"]) == 1 and one["reviews"][0]["note"] == "excise"
    unreviewed = client.get("/api/images", params={"flagged": "true", "reviewed": "false"},
                            auth=("ann", PASSWORD)).json()
    assert sha not in [item["sha256"] for item in unreviewed["items"]]
    assert client.get(f"/api/images/{'0' * 64}", auth=("ann", PASSWORD)).status_code == 404


def test_reviews_are_append_only_and_the_latest_supersedes(live_app: LiveApp) -> None:
    client = live_app.client()
    sha = live_app.flagged
    for verdict in ("benign", "refer"):
        assert client.post(f"/api/images/{sha}/reviews", json={"verdict": verdict},
                           auth=("ann", PASSWORD)).status_code == 201
    one = client.get(f"/api/images/{sha}", auth=("ann", PASSWORD)).json()
    assert [r["verdict"] for r in one["reviews"]] == ["refer", "benign"]
    assert one["review"]["verdict"] == "refer"
    page = live_app.login().get("/performance")
    assert page.status_code == 200 and "tiny-1" in page.text and "<svg" in page.text


def test_the_worklist_puts_unreviewed_flagged_first_filters_and_pages(live_app: LiveApp) -> None:
    client = live_app.login()
    page = client.get("/").text
    order = re.findall(r'<a href="/s/[^/"]+/images/([0-9a-f]{64})">', page)
    assert order[0] == live_app.flagged
    assert "waiting.jpg" in page
    assert "patient-17" in client.get("/", params={"q": "patient-17"}).text
    assert "patient-17" not in client.get("/", params={"q": "patient-3"}).text
    assert "waiting.jpg" not in client.get("/", params={"clinic": "clinic-a"}).text
    assert "waiting.jpg" in client.get("/", params={"status": "queued"}).text
    assert "1 image" in client.get("/", params={"status": "queued"}).text
    assert "0 images" in client.get("/", params={"from": "2001-01-01", "to": "2001-01-02"}).text


def test_the_worklist_filter_reads_true_and_false_as_the_api_does(live_app: LiveApp) -> None:
    """`/?flagged=true` (the API's spelling) was silently ignored: the page wanted yes/no."""
    client = live_app.login()
    for yes, no in (("yes", "no"), ("true", "false"), ("1", "0")):
        flagged = client.get("/", params={"flagged": yes}).text
        assert "patient-17" in flagged and "nevus.jpg" not in flagged and "waiting.jpg" not in flagged
        assert '<option value="yes" selected>' in flagged
        unflagged = client.get("/", params={"flagged": no}).text
        assert "patient-17" not in unflagged and "nevus.jpg" in unflagged
    assert "patient-17" not in client.get("/", params={"reviewed": "true"}).text


def test_melanomas_bar_is_the_same_red_on_the_case_page_as_in_the_alert(live_app: LiveApp) -> None:
    """The case page drew melanoma's bar as a default (green) <meter>, the email in red."""
    from test_mail import alert_to, html_of

    from service.colours import MELANOMA_COLOUR, OTHER_CLASS_COLOUR

    page = live_app.login().get(f"/images/{live_app.flagged}").text
    melanoma_row = re.search(r'<tr class="mel">.*?</tr>', page, re.S)
    assert melanoma_row is not None and f'fill="{MELANOMA_COLOUR}"' in melanoma_row.group(0)
    assert f'fill="{OTHER_CLASS_COLOUR}"' in page and "<meter" not in page
    assert f"background:{MELANOMA_COLOUR};" in html_of(alert_to("dr.a@clinic.example"))


def test_the_case_page_shows_the_stored_overlay_or_says_there_is_none(live_app: LiveApp) -> None:
    client = live_app.login()
    sha = live_app.flagged
    assert "No Grad-CAM overlay stored" in client.get(f"/images/{sha}").text
    assert client.get(f"/images/{sha}/overlay").status_code == 404
    (live_app.overlays / f"{sha}.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    assert f"/images/{sha}/overlay" in client.get(f"/images/{sha}").text
    answer = client.get(f"/images/{sha}/overlay")
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    assert client.get(f"/images/{sha}/file").headers["content-type"] == "image/jpeg"
    with live_app.sessions.begin() as session:
        views = session.scalars(select(AuditEvent).where(AuditEvent.action == "view_image")).all()
    assert len(views) == 2 and views[0].username == "ann"


def _bytes_read() -> int:
    """What this process (the app runs in it) has read so far: every read(2), cached or not."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar")


def test_the_thumbnail_is_the_one_the_worker_stored_and_a_1gb_tail_is_never_read(
        live_app: LiveApp) -> None:
    client = live_app.login()
    sha = live_app.flagged
    [stored] = live_app.store.glob(f"{sha}.*")
    assert client.get(f"/images/{sha}/thumbnail").status_code == 404  # none stored: none made
    with open(stored, "ab") as out:  # the stored JPEG gets a 1 GB tail (sparse: no disk used)
        out.truncate(1 << 30)
    before = _bytes_read()
    store_thumbnail(stored, sha, live_app.thumbnails)  # what the worker does at screening time
    answer = client.get(f"/images/{sha}/thumbnail")
    page = client.get("/").text
    read = _bytes_read() - before
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/jpeg"
    assert answer.content == (live_app.thumbnails / f"{sha}.jpg").read_bytes()
    assert len(answer.content) < 20_000 and f"/images/{sha}/thumbnail" in page
    assert read < 50 << 20, f"read {read >> 20} MiB"  # the tail is 1024 MiB


@pytest.mark.parametrize("target", ["//evil.example/", "https://evil.example/"])
def test_the_login_never_redirects_off_the_site(live_app: LiveApp, target: str) -> None:
    client = live_app.client()
    token = csrf_of(client.get("/login").text)
    answer = client.post("/login", data={"name": "ann", "password": PASSWORD, "csrf_token": token,
                                         "next": target})
    assert re.fullmatch(r"/s/[A-Za-z0-9_-]+/", answer.headers["location"])


def test_api_items_equal_the_results_json_rows_of_the_same_images(live_app: LiveApp,
                                                                   tmp_path: Path) -> None:
    """`GET /api/images` items carry the same fields with the same values as
    `melanoscreen results --format json`: history (model_versions, flag_changed) and review too."""
    import json
    import os
    import subprocess
    import sys
    from datetime import UTC, datetime

    from db import reviews
    from db.images import find_image_by_sha256
    from db.schema import Prediction, Verdict

    with live_app.sessions.begin() as session:
        image = find_image_by_sha256(session, live_app.flagged)
        assert image is not None
        # A re-screen by a second version that no longer flags it: two versions, flag changed.
        session.add(Prediction(
            image_id=image.id, model_version="tiny-2", probabilities={"melanoma": 0.2, "nevus": 0.8},
            melanoma_probability=0.2, predicted_class="nevus", threshold=0.5, flagged=False,
            out_of_scope=False, scope_distance=None, seconds=0.01, created_at=datetime.now(UTC)))
        hostile = find_image_by_sha256(session, live_app.hostile)
        ann = session.scalars(select(User).where(User.name == "ann")).one()
        assert hostile is not None
        reviews.add_review(session, hostile, ann, verdict=Verdict.REFER, diagnosis="melanoma",
                           note="", now=datetime.now(UTC))
    items = live_app.client().get("/api/images", params={"limit": 1000},
                                  auth=("ann", PASSWORD)).json()["items"]
    data = tmp_path / "data"
    data.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MELANOSCREEN_")}
    env.update(MELANOSCREEN_DATA_DIR=str(data),
               MELANOSCREEN_DATABASE_URL=str(live_app.sessions.kw["bind"].url.render_as_string(
                   hide_password=False)))
    done = subprocess.run([sys.executable, "-m", "melanoscreen", "results", "--format", "json"],
                          env=env, cwd=data, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = {row["sha256"]: row for row in json.loads(done.stdout)}
    assert len(items) == len(rows) == 5
    for item in items:
        assert item == rows[item["sha256"]], item["source"]
    changed = rows[live_app.flagged]
    assert changed["model_versions"] == ["tiny-1", "tiny-2"] and changed["flag_changed"] is True
    assert rows[live_app.hostile]["review"]["verdict"] == "refer"
