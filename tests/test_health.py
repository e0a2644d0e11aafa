"""`melanoscreen healthcheck`, the review app's /healthz and `melanoscreen migrate`: what a
container deployment's health checks and one-shot migration rely on."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import RedisServer
from web.app import create_app
from web.deps import WebConfig


def _run(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MELANOSCREEN_")}
    clean.update({"MELANOSCREEN_DATA_DIR": str(tmp_path / "data"), **env})
    return subprocess.run([sys.executable, "-m", "melanoscreen", *args], cwd=tmp_path, env=clean,
                          capture_output=True, text=True, timeout=120)


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_the_watch_check_wants_a_heartbeat_younger_than_a_minute(tmp_path: Path) -> None:
    assert "no heartbeat" in _one_line(_run(tmp_path, "healthcheck", "watch"))
    heartbeat = tmp_path / "data" / "watch.heartbeat"
    heartbeat.parent.mkdir()
    heartbeat.touch()
    assert _run(tmp_path, "healthcheck", "watch").returncode == 0
    old = time.time() - 600
    os.utime(heartbeat, (old, old))
    line = _one_line(_run(tmp_path, "healthcheck", "watch"))
    assert "heartbeat is 6" in line and "s old (more than 60 s)" in line


def test_the_worker_check_fails_when_no_worker_of_this_host_answers(
        tmp_path: Path, redis_server: RedisServer) -> None:
    line = _one_line(_run(tmp_path, "healthcheck", "worker", MELANOSCREEN_BROKER_URL=redis_server.url))
    assert "no worker on" in line and "answered a ping" in line
    assert redis_server.url.split("@")[0].split(":")[-1] not in line  # no password in it


def test_the_beat_check_names_a_broker_that_does_not_answer(tmp_path: Path) -> None:
    line = _one_line(_run(tmp_path, "healthcheck", "beat",
                          MELANOSCREEN_BROKER_URL="redis://:s3cret@127.0.0.1:1/0"))
    assert line.startswith("error: MELANOSCREEN_BROKER_URL: the broker does not answer")
    assert "s3cret" not in line


def test_the_web_and_flower_checks_name_what_does_not_answer(tmp_path: Path) -> None:
    from melanoscreen.cli.supervisor import free_port

    port = str(free_port())
    web = _one_line(_run(tmp_path, "healthcheck", "web", MELANOSCREEN_WEB_PORT=port))
    assert f"the review app does not answer at http://127.0.0.1:{port}/healthz" in web
    flower = _one_line(_run(tmp_path, "healthcheck", "flower", MELANOSCREEN_FLOWER_PORT=port,
                            MELANOSCREEN_FLOWER_PASSWORD="s3cret"))
    assert "Flower does not answer" in flower and "s3cret" not in flower


def _get_healthz(database_url: str, tmp_path: Path) -> httpx.Response:
    """An anonymous GET /healthz, straight into the ASGI app."""
    app = create_app(WebConfig(database_url=database_url, secret="s", overlays_dir=tmp_path))

    async def get() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://app") as client:
            return await client.get("/healthz")

    return asyncio.run(get())


def test_healthz_is_open_says_only_ok_and_needs_the_database(tmp_path: Path) -> None:
    answer = _get_healthz(f"sqlite:///{tmp_path / 'web.db'}", tmp_path)
    assert answer.status_code == 200 and answer.json() == {"status": "ok"}
    gone = _get_healthz(f"sqlite:///{tmp_path / 'no' / 'such' / 'web.db'}", tmp_path)
    assert gone.status_code == 503 and gone.json() == {"status": "database unavailable"}


def test_migrate_prepares_a_private_data_folder_and_the_schema_then_exits(tmp_path: Path) -> None:
    result = _run(tmp_path, "migrate")
    assert result.returncode == 0, result.stderr
    data = tmp_path / "data"
    assert (data.stat().st_mode & 0o777) == 0o700
    with sqlite3.connect(data / "melanoscreen.db") as connection:
        assert connection.execute("SELECT count(*) FROM alembic_version").fetchone() == (1,)
    # A second run finds the schema up to date: nothing to do, success again.
    assert _run(tmp_path, "migrate").returncode == 0
