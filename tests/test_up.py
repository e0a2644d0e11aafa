"""`melanoscreen up`: the whole service from one command, and nothing left behind when it stops."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from melanoscreen.cli.supervisor import free_port
from tests.conftest import children_of, is_alive, synthetic_jpeg, wait_until

pytestmark = pytest.mark.slow


def _env(data_dir: Path, model: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MELANOSCREEN_")}
    env.update({"MELANOSCREEN_DATA_DIR": str(data_dir), "MELANOSCREEN_MODEL": str(model),
                "MELANOSCREEN_BATCH_DELAY": "0.1", "MELANOSCREEN_WORKER_CONCURRENCY": "1",
                "MELANOSCREEN_FLOWER_PORT": str(free_port()), "MELANOSCREEN_WEB_PORT": str(free_port()),
                "TF_CPP_MIN_LOG_LEVEL": "2",
                "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def _answers(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return None


def _status(data_dir: Path) -> list[str]:
    engine = create_engine(f"sqlite:///{data_dir / 'melanoscreen.db'}")
    try:
        with engine.connect() as connection:
            return [r[0] for r in connection.execute(text("SELECT status FROM images"))]
    finally:
        engine.dispose()


def test_up_screens_a_drop_and_leaves_no_process_behind_after_sigterm(
        tmp_path: Path, tiny_model: Path) -> None:
    data_dir = tmp_path / "data"
    log = tmp_path / "up.log"
    env = _env(data_dir, tiny_model, MELANOSCREEN_ALERT_THRESHOLD="0")
    with open(log, "wb") as out:
        up = subprocess.Popen([sys.executable, "-m", "melanoscreen", "up"], cwd=tmp_path,
                              env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: (data_dir / "broker.url").exists(), timeout=60, message="redis")
        assert "inbox:" in log.read_text() or wait_until(lambda: "inbox:" in log.read_text())
        web = f"http://127.0.0.1:{env['MELANOSCREEN_WEB_PORT']}"
        assert f"review:    {web}" in log.read_text()
        (data_dir / "inbox" / "one.jpg").write_bytes(synthetic_jpeg(30_000))
        wait_until(lambda: _status(data_dir) == ["screened"], timeout=120,
                   message="the image screened by up's worker")
        # The review app that up started: closed without a login, open to a user added by the CLI.
        subprocess.run([sys.executable, "-m", "melanoscreen", "users", "add", "ann", "--email",
                        "ann@clinic.example", "--password-stdin"], env=env, input="a long password\n",
                       text=True, check=True, timeout=60, cwd=tmp_path)
        wait_until(lambda: _answers(f"{web}/api/images") == 401, timeout=60, message="the review app")
        # Each service's container health check says healthy for up's children too.
        for role in ("worker", "watch", "beat", "web", "flower"):
            def healthy(role: str = role) -> bool:
                return subprocess.run([sys.executable, "-m", "melanoscreen", "healthcheck", role],
                                      env=env, capture_output=True, timeout=60,
                                      cwd=tmp_path).returncode == 0
            wait_until(healthy, timeout=60, interval=1.0, message=f"healthcheck {role}")
        listed = httpx.get(f"{web}/api/images", params={"flagged": "true", "reviewed": "false"},
                           auth=("ann", "a long password"), timeout=30).json()
        assert [item["source"] for item in listed["items"]] == ["one.jpg"]
        sha = listed["items"][0]["sha256"]
        stored = httpx.post(f"{web}/api/images/{sha}/reviews", json={"verdict": "benign"},
                            auth=("ann", "a long password"), timeout=30)
        assert stored.status_code == 201
        results = subprocess.run([sys.executable, "-m", "melanoscreen", "results", "--format", "json"],
                                 env=env, capture_output=True, text=True, check=True, timeout=60,
                                 cwd=tmp_path)
        assert json.loads(results.stdout)[0]["review"]["verdict"] == "benign"
        family = children_of(up.pid)
        assert len(family) >= 6  # redis, worker (+ its pool), beat, flower, watcher
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=90) == 0
        # `up` waited for each child group; give the kernel a moment to reap what it killed.
        wait_until(lambda: not [pid for pid in family if is_alive(pid)], timeout=10,
                   message=f"every child gone\n{log.read_text()[-3000:]}")
        assert not (data_dir / "broker.url").exists()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


#: What used to fill the service log: Celery's banners and per-task lines, the run-as-root
#: warning, TensorFlow's start-up notices, Flower's unanswered questions, Redis's start lines.
NOISE = ("celery beat v", "-------------- [queues]", "SecurityWarning", "superuser privileges",
         "oneDNN", "absl::InitializeLog", "cpu_feature_guard", "Inspect method", "Registered tasks",
         "Sending due task", "] received", "succeeded in", "mingle:", "Redis is starting",
         "Uvicorn running")


def test_up_logs_a_line_per_batch_and_alert_keeps_housekeeping_out_of_flower_and_says_stopped(
        tmp_path: Path, tiny_model: Path) -> None:
    """372 lines in 5.5 idle minutes (sweeps at INFO, banners, warnings) and no "stopped" line;
    Flower's task list was mostly the sweep; `status` said "(no recipients configured)" when
    its own shell lacked the setting, though the running service had recipients."""
    from celery import Celery

    data_dir = tmp_path / "data"
    log = tmp_path / "up.log"
    env = _env(data_dir, tiny_model, MELANOSCREEN_ALERT_THRESHOLD="0",
               MELANOSCREEN_ALERT_RECIPIENTS="dr.a@clinic.example", MELANOSCREEN_SWEEP_INTERVAL="1")
    env.pop("TF_CPP_MIN_LOG_LEVEL")  # as an operator's shell has it: unset
    with open(log, "wb") as out:
        up = subprocess.Popen([sys.executable, "-m", "melanoscreen", "up"], cwd=tmp_path,
                              env=env, stdout=out, stderr=subprocess.STDOUT)
    seen: list[str] = []
    receiver = None
    try:
        wait_until(lambda: (data_dir / "broker.url").exists(), timeout=60, message="redis")
        # What Flower sees: the task events on the broker, read as Flower reads them.
        events = Celery(broker=(data_dir / "broker.url").read_text().strip())
        connection = events.connection_for_read()
        receiver = events.events.Receiver(connection, handlers={
            "*": lambda event: seen.append(f"{event['type']} {event.get('name', '')}")})

        def listen() -> None:
            with contextlib.suppress(Exception):  # the broker goes away when up stops
                receiver.capture(limit=None, timeout=None, wakeup=False)

        listening = threading.Thread(target=listen, daemon=True)
        listening.start()
        wait_until(lambda: "ready in" in log.read_text(), timeout=120, message="ready")
        for number in range(2):
            (data_dir / "inbox" / f"patient-{number}.jpg").write_bytes(synthetic_jpeg(31_000 + number))
        wait_until(lambda: "outbox" in log.read_text() and "sent:" in log.read_text(), timeout=120,
                   message=f"the alert's line\n{log.read_text()[-3000:]}")
        # Housekeeping ran meanwhile (every second), and the screening's events reached Flower's feed.
        wait_until(lambda: any(e == "task-succeeded " for e in seen) and
                   any("worker.tasks.deliver_message" in e for e in seen), timeout=60,
                   message=f"the task events\n{seen[-20:]}")
        # `status` in a shell without the setting tells the recipients the service uses.
        shell = {k: v for k, v in env.items() if k != "MELANOSCREEN_ALERT_RECIPIENTS"}
        said = subprocess.run([sys.executable, "-m", "melanoscreen", "status"], env=shell,
                              capture_output=True, text=True, check=True, timeout=60, cwd=tmp_path)
        assert "recipients 1: dr.a@clinic.example  (as the worker recorded at its start" in said.stdout
        assert "no recipients" not in said.stdout and "nobody is emailed" not in said.stdout
        report = json.loads(subprocess.run(
            [sys.executable, "-m", "melanoscreen", "status", "--json"], env=shell, capture_output=True,
            text=True, check=True, timeout=60, cwd=tmp_path).stdout)
        assert report["alert_recipients"] == 1 and report["alert_recipients_from"] == "service"
        assert report["alert_recipient_addresses"] == ["dr.a@clinic.example"]
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=90) == 0
    finally:
        if receiver is not None:
            receiver.should_stop = True
        if up.poll() is None:
            up.kill()
            up.wait()
    lines = log.read_text().splitlines()
    for noise in NOISE:
        assert not [line for line in lines if noise in line], (noise, lines)
    assert len([line for line in lines if "batch of" in line]) >= 1
    assert any(re.search(r"batch of \d: \d screened \(\d flagged\)", line) for line in lines)
    assert len([line for line in lines if "outbox" in line and "sent:" in line]) == len(
        [line for line in lines if "alert to" in line])
    assert not [line for line in lines if "sweep" in line.lower()]
    assert lines[-1].startswith("stopped: ")
    names = {e.split(" ", 1)[1] for e in seen if e.startswith(("task-received", "task-sent"))}
    assert "worker.tasks.screen_batch" in names and "worker.tasks.deliver_message" in names
    assert not names & {"worker.tasks.sweep", "worker.tasks.escalate", "worker.tasks.queue_digests"}
    assert (data_dir / "redis" / "redis.log").exists()  # Redis's notices are kept, apart
