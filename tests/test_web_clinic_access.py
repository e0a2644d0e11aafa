"""With MELANOSCREEN_WEB_CLINIC_ACCESS=enforced, a reviewer given clinics reaches only their
clinics' images, in pages, files and the API alike; an admin reaches every image."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
from sqlalchemy import select
from web_fixtures import PASSWORD, LiveApp, csrf_of, live_app

from db.schema import Review

__all__ = ["live_app"]


#: The live app of this module enforces clinic access (MELANOSCREEN_WEB_CLINIC_ACCESS=enforced).
WEB_CONFIG = {"clinic_access": "enforced"}


def _set_prefixes(live_app: LiveApp, name: str, *prefixes: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MELANOSCREEN_")}
    env["MELANOSCREEN_DATABASE_URL"] = live_app.sessions.kw["bind"].url.render_as_string(
        hide_password=False)
    env["MELANOSCREEN_DATA_DIR"] = str(live_app.store.parent / "data")
    done = subprocess.run([sys.executable, "-m", "melanoscreen", "users", "set-prefixes", name,
                           *prefixes], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_a_clinic_a_reviewer_cannot_open_download_or_review_a_clinic_b_case(live_app: LiveApp) -> None:
    _set_prefixes(live_app, "ann", "clinic-a/")
    other = live_app.hostile  # its name starts with clinic-b/
    mine = live_app.flagged  # clinic-a/patient-17/...
    client = live_app.login("ann")
    page = client.get("/", params={"all": "1"}).text
    assert "patient-17" in page and "clinic-b/" not in page and "waiting.jpg" not in page
    assert "clinic-b/" not in client.get("/", params={"clinic": "clinic-b/"}).text
    for path in (f"/images/{other}", f"/images/{other}/file", f"/images/{other}/thumbnail",
                 f"/images/{other}/overlay", f"/api/images/{other}"):
        assert client.get(path).status_code == 404, path
    assert client.get(f"/images/{mine}").status_code == 200
    case = client.get(f"/images/{mine}").text
    form = {"csrf_token": csrf_of(case.split("<main>")[1]), "verdict": "benign", "note": ""}
    assert client.post(f"/images/{other}/reviews", data=form).status_code == 404
    basic = ("ann", PASSWORD)
    api = httpx.Client(base_url=live_app.url, timeout=30, auth=basic)
    assert {i["source"].split("/")[0] for i in api.get("/api/images").json()["items"]} == {"clinic-a"}
    assert api.get(f"/api/images/{other}").status_code == 404
    posted = api.post(f"/api/images/{other}/reviews", json={"verdict": "benign", "diagnosis": None,
                                                             "note": ""})
    assert posted.status_code == 404
    with live_app.sessions.begin() as session:
        assert session.scalars(select(Review)).all() == []
    # An admin reaches every image.
    assert live_app.client().get(f"/api/images/{other}", auth=("root", PASSWORD)).status_code == 200


def test_a_clinic_a_reviewer_sees_no_clinic_b_image_named_in_the_audit_log_or_the_filters(
        live_app: LiveApp) -> None:
    _set_prefixes(live_app, "ann", "clinic-a/")
    other, mine = live_app.hostile, live_app.flagged
    # An admin opens and reviews a clinic-b case and a clinic-a case: both are audited.
    admin = live_app.login("root")
    for sha in (other, mine):
        case = admin.get(f"/images/{sha}")
        assert case.status_code == 200
        form = {"csrf_token": csrf_of(case.text.split("<main>")[1]), "verdict": "benign", "note": ""}
        assert admin.post(f"/images/{sha}/reviews", data=form).status_code in (200, 303)
    full = admin.get("/audit").text
    assert other in full and mine in full and "lesion2.jpg" in full

    client = live_app.login("ann")
    audit_page = client.get("/audit").text
    assert other not in audit_page and "clinic-b" not in audit_page  # not even its name
    assert mine in audit_page and "lesion2.jpg" in audit_page  # their own clinic's entries stay
    assert "login" in audit_page  # entries about no image stay
    for page in (client.get("/").text, client.get("/", params={"all": "1"}).text):
        assert "clinic-b" not in page  # nor in the worklist's clinic filter
