"""Numbers and names from requests cannot break a page: huge page numbers and offsets are refused
with a 4xx (not a 500 without the security headers), and names typed at failed logins are not
shown to reviewers."""

from __future__ import annotations

import httpx
from web_fixtures import PASSWORD, LiveApp, live_app

__all__ = ["live_app"]


def test_huge_page_numbers_and_offsets_answer_422_with_the_security_headers(live_app: LiveApp) -> None:
    client = live_app.login()
    for path in ("/?page=99999999999999999999", "/audit?page=99999999999999999999",
                 "/api/images?offset=99999999999999999999", "/api/images?offset=9223372036854775808"):
        answer = client.get(path)
        assert answer.status_code == 422, (path, answer.status_code)
        assert "content-security-policy" in answer.headers, path
    assert client.get("/?page=2").status_code == 200
    assert client.get("/api/images", params={"offset": 1000}).json()["items"] == []


def test_a_password_typed_as_a_name_at_a_failed_login_is_not_shown_in_the_audit_log(
        live_app: LiveApp) -> None:
    secret = "my-Secret-passphrase-42"
    assert httpx.get(f"{live_app.url}/api/images", auth=(secret, "whatever"),
                     timeout=30).status_code == 401
    assert httpx.get(f"{live_app.url}/api/images", auth=("ann", "wrong one"),
                     timeout=30).status_code == 401
    page = live_app.login().get("/audit").text
    assert secret not in page and "(unknown name)" in page
    assert "ann" in page  # a failed login of an account still names it
    assert PASSWORD not in page
