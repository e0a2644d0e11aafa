"""The lock after wrong passwords holds under concurrent guesses, tells nobody which names exist,
and no web page can use it to lock a reviewer out."""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import func, select
from web_fixtures import PASSWORD, LiveApp, live_app

from db.schema import AuditEvent, User
from tests.mail_fixtures import free_port

__all__ = ["live_app"]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def _ann(live_app: LiveApp) -> User:
    with live_app.sessions.begin() as session:
        user = session.scalars(select(User).where(User.name == "ann")).one()
        session.expunge(user)
        return user


def _events(live_app: LiveApp, action: str) -> int:
    """Refused logins of this kind counted in the audit log (each row says "N attempts")."""
    with live_app.sessions.begin() as session:
        details = session.scalars(select(AuditEvent.detail).where(AuditEvent.action == action))
        return sum(int((detail or "1").split(" ")[0]) for detail in details)


def _rows(live_app: LiveApp) -> int:
    with live_app.sessions.begin() as session:
        return int(session.scalar(select(func.count()).select_from(AuditEvent)) or 0)


def test_forty_concurrent_guesses_lock_the_name_after_five_checked(live_app: LiveApp) -> None:
    def guess(n: int) -> int:
        return httpx.get(f"{live_app.url}/api/images", auth=("ann", f"guess number {n}"),
                         timeout=120).status_code

    with ThreadPoolExecutor(40) as pool:
        answers = list(pool.map(guess, range(40)))
    assert answers == [401] * 40
    ann = _ann(live_app)
    assert ann.locked_until is not None, "forty parallel guesses and no lock"
    # Each guess counted: five locked the name; the rest were refused by the lock. At most the
    # checks already running when the fifth failed (two at a time) got past the count.
    assert _events(live_app, "login_failed") <= 5 + 1
    assert _events(live_app, "login_locked") >= 40 - 6
    # The right password is refused too while the lock holds.
    assert httpx.get(f"{live_app.url}/api/images", auth=("ann", PASSWORD), timeout=60).status_code == 401
    # Counted, not written one by one: a row for the wrong passwords, one for the locked name.
    assert _rows(live_app) <= 2 + 2  # (two more at most where concurrent first refusals raced)


def test_anonymous_guesses_under_names_that_are_no_account_add_one_counted_row(
        live_app: LiveApp) -> None:
    secret = "correct horse battery staple"

    def guess(n: int) -> int:
        return httpx.get(f"{live_app.url}/api/images", auth=(f"{secret} {n}", "x"),
                         timeout=120).status_code

    before = _rows(live_app)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(guess, range(60)))
    assert answers == [401] * 60
    assert _rows(live_app) - before <= 2  # one row (a second where two first refusals raced)
    assert _events(live_app, "login_failed") == 60  # each one counted
    with live_app.sessions.begin() as session:
        stored = " ".join(f"{e.username} {e.detail}" for e in session.scalars(select(AuditEvent)))
    assert secret not in stored and "(unknown name)" in stored  # what was typed is not kept
    page = live_app.login().get("/audit").text
    shown = [int(count) for count in re.findall(r"(\d+) attempts?\b", page)]
    assert secret not in page and sum(shown) == 60  # the row (or the two that raced) on the page


def _timed_login(live_app: LiveApp, name: str, password: str) -> tuple[int, str, float]:
    with httpx.Client(base_url=live_app.url, timeout=60) as client:
        page = client.get("/login").text
        token = page.split('name="csrf_token" value="')[1].split('"')[0]
        started = time.perf_counter()
        answer = client.post("/login", data={"name": name, "password": password, "csrf_token": token})
        elapsed = time.perf_counter() - started
        error = answer.text.split('role="alert">')[1].split("</p>")[0]
        return answer.status_code, error, elapsed


def test_a_locked_name_answers_like_a_wrong_password_and_an_unknown_name(live_app: LiveApp) -> None:
    for _ in range(5):
        _timed_login(live_app, "ann", "wrong password")
    assert _ann(live_app).locked_until is not None
    locked = [_timed_login(live_app, "ann", "wrong password") for _ in range(3)]
    wrong = [_timed_login(live_app, "root", "wrong password") for _ in range(3)]
    unknown = [_timed_login(live_app, "nobody-here", "wrong password") for _ in range(3)]
    assert {(status, text) for status, text, _ in locked + wrong + unknown} == {
        (wrong[0][0], wrong[0][1])}
    # Each refusal costs one password check: a lock does not answer in a few milliseconds.
    slow = statistics.median(t for *_, t in wrong)
    assert statistics.median(t for *_, t in locked) > slow / 4
    assert statistics.median(t for *_, t in unknown) > slow / 4


ATTACKER_PAGE = r"""
import http.server, sys
target = sys.argv[2]
class Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        n = self.path.rsplit("=", 1)[-1]
        refresh = (f"<meta http-equiv='refresh' content='0;url=http://ann:wrong{n}@{target}/api/images'>"
                   if self.path.startswith("/go") else "")
        body = (f"<html><head>{refresh}</head><body><form method='post' action='http://{target}/login'>"
                f"<input name='name' value='ann'><input name='password' value='wrong{n}'>"
                f"<button id='go'>go</button></form></body></html>").encode()
        self.send_response(200)
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Page)
print("READY", flush=True)
server.serve_forever()
"""



@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (apt-get install chromium)")
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="acting as another local user needs root and setpriv")
def test_pages_of_another_origin_cannot_lock_a_reviewer_out(live_app: LiveApp) -> None:
    from playwright.sync_api import sync_playwright

    port = free_port()
    target = live_app.url.removeprefix("http://")
    page_server = subprocess.Popen([*NOBODY, sys.executable, "-I", "-S", "-c", ATTACKER_PAGE,
                                    str(port), target], cwd="/", stdout=subprocess.PIPE, text=True)
    try:
        assert page_server.stdout is not None and page_server.stdout.readline().strip() == "READY"
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                                 args=["--no-sandbox"] if os.geteuid() == 0 else [])
            try:
                page = browser.new_page()
                for n in range(8):
                    # The page sends the browser to the app with a wrong name:password in the URL;
                    # the app answers 401 (the browser gives up: ERR_INVALID_AUTH_CREDENTIALS).
                    tab = browser.new_page()
                    with tab.expect_event("requestfailed", lambda r: "/api/images" in r.url) as failed:
                        tab.goto(f"http://127.0.0.1:{port}/go?n={n}", wait_until="commit")
                    assert "AUTH" in (failed.value.failure or ""), failed.value.failure
                    tab.close()
                for n in range(8):
                    # And posts the login form from its own origin (a click is all it needs).
                    page.goto(f"http://127.0.0.1:{port}/form?n={n}")
                    with page.expect_response(lambda r: r.url == f"{live_app.url}/login") as posted:
                        page.click("#go")
                    assert posted.value.status == 403  # refused before any password check
            finally:
                browser.close()
    finally:
        page_server.terminate()
        page_server.wait(10)
    ann = _ann(live_app)
    assert ann.locked_until is None and ann.failed_logins == 0
    assert _events(live_app, "login_failed") == 0
    assert httpx.get(f"{live_app.url}/api/images", auth=("ann", PASSWORD), timeout=60).status_code == 200
