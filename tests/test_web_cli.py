"""`melanoscreen users ...`, and what the reviews add to `results` and `status`."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from web_fixtures import PASSWORD, seed_image

from db.migrate import upgrade
from db.session import make_session_factory


def melanoscreen(data: Path, *args: str, stdin: str | None = None, check: bool = True) -> str:
    env = dict(os.environ, MELANOSCREEN_DATA_DIR=str(data))
    env.pop("MELANOSCREEN_DATABASE_URL", None)
    result = subprocess.run([sys.executable, "-m", "melanoscreen", *args], env=env, input=stdin,
                            capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


def test_users_add_in_the_wrong_folder_refuses_and_creates_nothing(tmp_path: Path) -> None:
    """Run where no `melanoscreen up` ran, `users add` used to create a fresh data folder and
    database whose account could never log in to the running review app."""
    data = tmp_path / "not-the-data-folder"
    for command in (("users", "add", "ann", "--email", "ann@clinic.example", "--password-stdin"),
                    ("users", "list")):
        env = dict(os.environ, MELANOSCREEN_DATA_DIR=str(data))
        env.pop("MELANOSCREEN_DATABASE_URL", None)
        result = subprocess.run([sys.executable, "-m", "melanoscreen", *command], env=env,
                                input=PASSWORD + "\n", capture_output=True, text=True, timeout=120)
        assert result.returncode != 0
        assert result.stderr.startswith("error: MELANOSCREEN_DATA_DIR: no data folder at")
        assert len(result.stderr.strip().splitlines()) == 1
    assert not data.exists()


def _data_folder(tmp_path: Path) -> Path:
    """A data folder as `melanoscreen up` leaves it: 0700, with its migrated database."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    upgrade(f"sqlite:///{data / 'melanoscreen.db'}")
    return data


def test_users_are_added_listed_disabled_and_given_passwords_from_stdin_only(tmp_path: Path) -> None:
    data = _data_folder(tmp_path)
    out = melanoscreen(data, "users", "add", "ann", "--email", "ann@clinic.example", check=False)
    assert "--password-stdin" in out
    melanoscreen(data, "users", "add", "ann", "--email", "ann@clinic.example", "--role", "admin",
                 "--password-stdin", stdin=PASSWORD + "\n")
    assert "exists already" in melanoscreen(data, "users", "add", "ann", "--email", "a@b.example",
                                            "--password-stdin", stdin=PASSWORD + "\n", check=False)
    assert "at least" in melanoscreen(data, "users", "add", "bob", "--email", "b@b.example",
                                      "--password-stdin", stdin="short\n", check=False)
    listed = melanoscreen(data, "users", "list")
    assert "ann" in listed and "admin" in listed and "active" in listed
    melanoscreen(data, "users", "set-password", "ann", "--password-stdin", stdin="another long secret\n")
    melanoscreen(data, "users", "disable", "ann")
    assert "disabled" in melanoscreen(data, "users", "list")
    database = data / "melanoscreen.db"
    assert PASSWORD.encode() not in database.read_bytes()
    with make_session_factory(f"sqlite:///{database}").begin() as session:
        from db.accounts import find_user

        user = find_user(session, "ann")
        assert user is not None and user.password_hash.startswith("$argon2id$") and not user.active


def test_results_and_status_show_reviews_and_the_unreviewed_flagged(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    url = f"sqlite:///{data / 'melanoscreen.db'}"
    upgrade(url)
    sessions = make_session_factory(url)
    store = tmp_path / "store"
    store.mkdir()
    first = seed_image(sessions, store, source="a.jpg", seed=1, melanoma=0.9)
    seed_image(sessions, store, source="b.jpg", seed=2, melanoma=0.8)
    seed_image(sessions, store, source="c.jpg", seed=3, melanoma=0.1)
    melanoscreen(data, "users", "add", "ann", "--email", "ann@clinic.example", "--password-stdin",
                 stdin=PASSWORD + "\n")
    assert json.loads(melanoscreen(data, "status", "--json"))["unreviewed_flagged"] == 2
    from datetime import UTC, datetime

    from db import accounts, reviews
    from db.images import find_image_by_sha256
    from db.schema import Verdict

    with sessions.begin() as session:
        image, user = find_image_by_sha256(session, first), accounts.find_user(session, "ann")
        assert image is not None and user is not None
        reviews.add_review(session, image, user, verdict=Verdict.REFER, diagnosis="melanoma",
                           note="", now=datetime.now(UTC))
    assert json.loads(melanoscreen(data, "status", "--json"))["unreviewed_flagged"] == 1
    rows = {r["source"]: r for r in json.loads(melanoscreen(data, "results", "--format", "json"))}
    assert rows["a.jpg"]["review"]["verdict"] == "refer"
    assert rows["a.jpg"]["review"]["reviewer"] == "ann"
    assert set(rows["a.jpg"]["review"]) == {"verdict", "diagnosis", "reviewer", "reviewed_at"}
    assert rows["b.jpg"]["review"] is None


def test_the_web_secret_is_generated_into_the_data_folder_owner_only(tmp_path: Path) -> None:
    from melanoscreen.cli._common import web_secret
    from melanoscreen.settings import Settings

    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    settings = Settings(data_dir=data)
    secret = web_secret(settings)
    assert len(secret) > 40 and web_secret(settings) == secret
    assert stat.S_IMODE(settings.web_secret_file.stat().st_mode) == 0o600


def test_web_alone_serves_the_app_behind_a_login_on_its_port(tmp_path: Path) -> None:
    import httpx

    from melanoscreen.cli.supervisor import free_port
    from tests.conftest import wait_until

    data, port = tmp_path / "data", free_port()
    env = dict(os.environ, MELANOSCREEN_DATA_DIR=str(data), MELANOSCREEN_WEB_PORT=str(port))
    env.pop("MELANOSCREEN_WEB_SECRET", None)
    env.pop("MELANOSCREEN_DATABASE_URL", None)
    web = subprocess.Popen([sys.executable, "-m", "melanoscreen", "web"], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        def answer() -> httpx.Response | None:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
            except httpx.HTTPError:
                return None

        first = wait_until(answer, timeout=60, message="melanoscreen web")
        assert first.status_code == 303 and first.headers["location"].startswith("/login")
        assert httpx.get(f"http://127.0.0.1:{port}/api/images", timeout=5).status_code == 401
        assert stat.S_IMODE((data / "web.secret").stat().st_mode) == 0o600
    finally:
        web.terminate()
        output = web.communicate(timeout=30)[0].decode()
    assert f"review app: http://127.0.0.1:{port}" in output


def test_the_performance_figures_count_ppv_misses_seen_and_diagnosis_agreement(
        tmp_path: Path, database_url: str) -> None:
    from datetime import UTC, datetime

    from web_fixtures import add_account

    from db import accounts, reviews
    from db.images import find_image_by_sha256
    from db.schema import Verdict

    sessions = make_session_factory(database_url)
    shas = [seed_image(sessions, tmp_path, source=f"{n}.jpg", seed=n, melanoma=p)
            for n, p in enumerate((0.9, 0.8, 0.7, 0.2))]
    add_account(sessions, "ann")
    now = datetime.now(UTC)
    with sessions.begin() as session:
        ann = accounts.find_user(session, "ann")
        assert ann is not None
        for sha, verdict, diagnosis in ((shas[0], Verdict.BENIGN, None),  # superseded below
                                        (shas[0], Verdict.REFER, "melanoma"),
                                        (shas[1], Verdict.BENIGN, "nevus"),
                                        (shas[3], Verdict.REFER, None)):
            image = find_image_by_sha256(session, sha)
            assert image is not None
            reviews.add_review(session, image, ann, verdict=verdict, diagnosis=diagnosis, note="",
                               now=now)
    with sessions.begin() as session:
        [figures] = reviews.performance(session)
    assert (figures.model_version, figures.alerts, figures.reviewed, figures.referred) == ("tiny-1", 3, 2, 1)
    assert figures.ppv == 0.5 and figures.below_threshold_referred == 1
    assert (figures.diagnosis_agrees, figures.with_diagnosis) == (1, 2)
    sessions.kw["bind"].dispose()


def test_an_address_good_for_alerts_is_good_for_an_account(tmp_path: Path) -> None:
    """One email rule: a special-use domain that MELANOSCREEN_ALERT_RECIPIENTS accepts
    (`derm@hospital.local`) is accepted for a reviewer's login too, by the CLI and the web form."""
    from melanoscreen.settings import is_email_address
    from service.accounts import AccountIn, AccountRefused

    data = _data_folder(tmp_path)
    out = melanoscreen(data, "users", "add", "alice", "--email", "alice@clinic.local",
                       "--password-stdin", stdin=PASSWORD + "\n")
    assert "added alice" in out
    assert "alice@clinic.local" in melanoscreen(data, "users", "list")
    for address in ("alice@clinic.local", "melanoscreen@localhost", "a.b+c@x.example"):
        assert is_email_address(address)
        assert AccountIn.parse("alice", address, PASSWORD, "reviewer").email == address
    for address in ("alice", "alice@", "@clinic.local", "a b@x.example"):
        assert not is_email_address(address)
        with pytest.raises(AccountRefused, match=r"^email: not a valid address$"):
            AccountIn.parse("alice", address, PASSWORD, "reviewer")
