"""A review-app session belongs to the browser that logged in, and ends when it should.

The attacks of the second hardening round: another local user serves a page on another loopback
port (browsers send 127.0.0.1 cookies to every port), and a copied cookie is replayed after a
logout, a new password or a disabled account.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from web_fixtures import PASSWORD, LiveApp, csrf_of, live_app

from tests.mail_fixtures import free_port

__all__ = ["live_app"]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]

#: The other user's web server: answers every request with a page and prints the Cookie
#: header of each request it gets (standard library only).
COOKIE_THIEF = r"""
import http.server, sys
class Thief(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        print("COOKIE", self.path, self.headers.get("cookie") or "", flush=True)
        body = b"<html><body><img src='/s/guess/x.png'>hello</body></html>"
        self.send_response(200)
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Thief)
print("READY", flush=True)
server.serve_forever()
"""



def _login(live_app: LiveApp) -> tuple[httpx.Client, str, str]:
    """A logged-in client, its session's path and its cookie's token."""
    client = live_app.login()
    home = client.base_url.path.rstrip("/")
    return client, home, client.cookies["melanoscreen_session"]


def _replayed(live_app: LiveApp, home: str, token: str) -> int:
    """The status of the API at the session's path with a copied cookie (as curl would send it)."""
    return httpx.get(f"{live_app.url}{home}/api/images",
                     headers={"cookie": f"melanoscreen_session={token}"}, timeout=30).status_code


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (apt-get install chromium)")
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="acting as another local user needs root and setpriv")
def test_a_page_another_user_serves_on_another_loopback_port_never_gets_the_session(
        live_app: LiveApp) -> None:
    from playwright.sync_api import sync_playwright

    port = free_port()
    thief = subprocess.Popen([*NOBODY, sys.executable, "-I", "-S", "-c", COOKIE_THIEF, str(port)],
                             cwd="/", stdout=subprocess.PIPE, text=True)
    try:
        assert thief.stdout is not None and thief.stdout.readline().strip() == "READY"
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                                 args=["--no-sandbox"] if os.geteuid() == 0 else [])
            try:
                page = browser.new_page(java_script_enabled=False)
                page.goto(f"{live_app.url}/")
                page.fill("input[name=name]", "ann")
                page.fill("input[name=password]", PASSWORD)
                page.click("button[type=submit]")
                page.wait_for_url(re.compile(r".*/s/[A-Za-z0-9_-]+/$"))
                assert page.locator("h1").inner_text() == "Worklist"
                session_cookies = [c for c in page.context.cookies() if c["name"] == "melanoscreen_session"]
                assert len(session_cookies) == 1
                # The reviewer opens the other user's page (a link, or a top-level navigation a
                # remote page started): its page and its image request reach the thief.
                page.goto(f"http://127.0.0.1:{port}/")
                page.wait_for_load_state("load")
                page.goto(f"http://127.0.0.1:{port}/api/images")
            finally:
                browser.close()
    finally:
        thief.terminate()
        out, _ = thief.communicate(timeout=10)
    seen = [line for line in out.splitlines() if line.startswith("COOKIE")]
    assert len(seen) >= 2, out
    assert not any("melanoscreen_session" in line for line in seen), seen
    # And what the thief did get logs nobody in, wherever it is replayed.
    for line in seen:
        cookie = line.split(" ", 2)[2] if line.count(" ") >= 2 else ""
        answer = httpx.get(f"{live_app.url}/api/images", headers={"cookie": cookie}, timeout=30)
        assert answer.status_code == 401


def test_a_copied_cookie_is_no_login_at_another_path(live_app: LiveApp) -> None:
    _client, home, token = _login(live_app)
    assert _replayed(live_app, home, token) == 200
    assert httpx.get(f"{live_app.url}/api/images", headers={"cookie": f"melanoscreen_session={token}"},
                     timeout=30).status_code == 401
    other = "/s/" + "A" * 43
    assert _replayed(live_app, other, token) == 401


def test_logging_out_ends_the_session_for_every_copy_of_its_cookie(live_app: LiveApp) -> None:
    client, home, token = _login(live_app)
    assert _replayed(live_app, home, token) == 200
    page = client.get("/").text
    answer = client.post("/logout", data={"csrf_token": csrf_of(page.split("<main>")[0])})
    assert answer.status_code == 303 and answer.headers["location"] == "/login"
    assert _replayed(live_app, home, token) == 401


def _melanoscreen(live_app: LiveApp, tmp_path: Path, *args: str, stdin: str = "") -> None:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MELANOSCREEN_")}
    env.update(MELANOSCREEN_DATA_DIR=str(data),
               MELANOSCREEN_DATABASE_URL=live_app.sessions.kw["bind"].url.render_as_string(
                   hide_password=False))
    done = subprocess.run([sys.executable, "-m", "melanoscreen", *args], env=env, cwd=data,
                          input=stdin, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_a_new_password_or_a_disabled_account_ends_its_sessions(live_app: LiveApp,
                                                                tmp_path: Path) -> None:
    _client, home, token = _login(live_app)
    _other, other_home, other_token = _login(live_app)
    assert _replayed(live_app, home, token) == 200
    _melanoscreen(live_app, tmp_path, "users", "set-password", "ann", "--password-stdin",
                  stdin="a brand new passphrase\n")
    assert _replayed(live_app, home, token) == 401
    assert _replayed(live_app, other_home, other_token) == 401

    client = live_app.client()
    answer = client.post("/login", data={"name": "ann", "password": "a brand new passphrase",
                                         "csrf_token": csrf_of(client.get("/login").text)})
    assert answer.status_code == 303
    home, token = answer.headers["location"].rstrip("/"), client.cookies["melanoscreen_session"]
    assert _replayed(live_app, home, token) == 200
    _melanoscreen(live_app, tmp_path, "users", "disable", "ann")
    started = time.monotonic()
    assert _replayed(live_app, home, token) == 401
    assert time.monotonic() - started < 30


def _raw_post(live_app: LiveApp, path: str, headers: dict[str, str], body: bytes) -> int:
    """POST over a plain socket (headers, then `body`), and the answer's status; the client
    never waits for the server to take what it does not want."""
    host, port = live_app.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": f"{host}:{port}", **headers}.items())
        conn.sendall(f"POST {path} HTTP/1.1\r\n{head}\r\n".encode() + body)
        answer = conn.recv(4096).decode("latin-1")
    return int(answer.split(" ", 2)[1])


def test_an_anonymous_large_body_is_refused_unread_and_any_body_is_capped(live_app: LiveApp) -> None:
    reviews = f"/api/images/{live_app.flagged}/reviews"
    json_type = {"Content-Type": "application/json"}
    # 50 MB announced, a few bytes sent: the answer comes without the body being read.
    assert _raw_post(live_app, reviews, {**json_type, "Content-Length": str(50 << 20)}, b"{") == 401
    assert _raw_post(live_app, "/images/x/reviews",
                     {"Content-Type": "application/x-www-form-urlencoded",
                      "Content-Length": str(50 << 20)}, b"a=") == 401
    basic = "Basic " + base64.b64encode(f"ann:{PASSWORD}".encode()).decode()
    assert _raw_post(live_app, reviews, {**json_type, "Authorization": basic,
                                         "Content-Length": str(50 << 20)}, b"{") == 413
    # A chunked body of a logged-in client is read up to the cap, then refused.
    chunk = b"x" * 65536
    chunked = b"".join(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" for _ in range(8))
    assert _raw_post(live_app, reviews, {**json_type, "Authorization": basic,
                                         "Transfer-Encoding": "chunked"}, chunked) == 413
    # An ordinary review still goes in.
    answer = httpx.post(f"{live_app.url}{reviews}", json={"verdict": "benign", "diagnosis": None,
                                                           "note": "ok"},
                        auth=("ann", PASSWORD), timeout=30)
    assert answer.status_code == 201
