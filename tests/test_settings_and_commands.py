"""Settings, the command line and the deployment files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from melanoscreen.settings import Settings, describe_error

REPO = Path(__file__).resolve().parent.parent
SERVICE_COMMANDS = {"up", "watch", "worker", "beat", "flower", "status", "results", "digest",
                    "alerts", "train", "evaluate", "predict", "web", "migrate", "healthcheck",
                    "dicom"}


def _clean_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MELANOSCREEN_")}
    env.update(values)
    return env


def _settings(monkeypatch: pytest.MonkeyPatch, **values: str) -> Settings:
    for key in list(os.environ):
        if key.startswith("MELANOSCREEN_"):
            monkeypatch.delenv(key)
    for key, value in values.items():
        monkeypatch.setenv(f"MELANOSCREEN_{key}", value)
    return Settings(_env_file=None)  # type: ignore[call-arg]


def test_defaults_follow_the_contract(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    settings = _settings(monkeypatch)
    assert settings.data_dir == Path("melanoscreen-data")
    assert settings.inbox_dir == (tmp_path / "melanoscreen-data" / "inbox")
    assert settings.database.startswith("sqlite:///") and settings.database.endswith(".db")
    assert settings.broker_url is None and settings.model is None
    assert settings.alert.threshold is None and settings.alert.recipients == []
    assert str(settings.digest.time) == "07:00:00" and settings.timezone == "UTC"
    assert (settings.flower.address, settings.flower.port) == ("127.0.0.1", 5555)
    assert settings.smtp.host is None and settings.smtp.security == "starttls"
    assert settings.smtp.effective_port == 587


def test_related_variables_fill_one_nested_model_each(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(monkeypatch, SMTP_HOST="mail.clinic.example", SMTP_SECURITY="tls",
                         SMTP_PASSWORD="s3cret", ALERT_MAX_ATTEMPTS="3", MAX_ATTEMPTS="7",
                         BATCH_SIZE="4", SWEEP_LIMIT="6", DIGEST_TIME="06:30",
                         FLOWER_ADDRESS="0.0.0.0", MODEL="/models/m.keras")
    assert (settings.smtp.host, settings.smtp.effective_port) == ("mail.clinic.example", 465)
    assert settings.smtp.password is not None
    assert settings.smtp.password.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)
    assert (settings.alert.max_attempts, settings.max_attempts) == (3, 7)
    assert (settings.batch.size, settings.sweep.limit) == (4, 6.0)
    assert str(settings.digest.time) == "06:30:00"
    assert not settings.flower.is_loopback
    assert settings.model == Path("/models/m.keras")


def test_the_log_level_is_info_unless_set_in_any_case(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _settings(monkeypatch).log_level == "INFO"
    assert _settings(monkeypatch, LOG_LEVEL=" debug").log_level == "DEBUG"


def test_recipients_are_a_comma_separated_list_of_addresses(
        monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(monkeypatch, ALERT_RECIPIENTS=" derm@clinic.example, oncall@clinic.example ")
    assert settings.alert.recipients == ["derm@clinic.example", "oncall@clinic.example"]
    with pytest.raises(ValidationError) as error:
        _settings(monkeypatch, ALERT_RECIPIENTS="derm@clinic.example,not-an-address")
    assert describe_error(error.value).startswith("MELANOSCREEN_ALERT_RECIPIENTS: ")


def test_recipients_are_checked_for_syntax_only_so_special_use_domains_pass(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Hospital networks use .local; the default sender itself is melanoscreen@localhost.
    settings = _settings(monkeypatch, ALERT_RECIPIENTS="derm@hospital.local,derm@localhost")
    assert settings.alert.recipients == ["derm@hospital.local", "derm@localhost"]
    for bad in ("derm@", "@hospital.local", "derm hospital@x", "derm@-x.local", "a..b@x"):
        with pytest.raises(ValidationError):
            _settings(monkeypatch, ALERT_RECIPIENTS=bad)


@pytest.mark.parametrize(("name", "value"), [
    ("ALERT_THRESHOLD", "1.5"), ("SMTP_SECURITY", "ssl"), ("TIMEZONE", "Mars/Olympus"),
    ("FLOWER_PORT", "99999"), ("BATCH_SIZE", "0"), ("SMTP_PORT", "0"), ("SWEEP_LIMIT", "-1"),
    ("LOG_LEVEL", "loud"),
])
def test_a_bad_value_is_named_in_one_line(monkeypatch: pytest.MonkeyPatch, name: str,
                                          value: str) -> None:
    with pytest.raises(ValidationError) as error:
        _settings(monkeypatch, **{name: value})
    line = describe_error(error.value)
    assert line.startswith(f"MELANOSCREEN_{name}: ") and "\n" not in line


def test_a_bad_setting_stops_a_command_with_one_error_line(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "melanoscreen", "status"], cwd=tmp_path,
                            env=_clean_env(MELANOSCREEN_ALERT_THRESHOLD="2"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: MELANOSCREEN_ALERT_THRESHOLD: must be between 0 and 1"


def test_flower_refuses_a_public_address_without_a_password(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "melanoscreen", "flower"], cwd=tmp_path,
                            env=_clean_env(MELANOSCREEN_FLOWER_ADDRESS="0.0.0.0",
                                           MELANOSCREEN_BROKER_URL="redis://127.0.0.1:1/0"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "MELANOSCREEN_FLOWER_USER" in result.stderr


def test_a_failed_start_of_up_leaves_nothing_it_created_behind(tmp_path: Path) -> None:
    """`up` that stops at one of its start checks used to leave an empty data folder with its
    lock files; it now removes what that start created, and only that."""
    import socket

    model = tmp_path / "model.keras"
    model.write_bytes(b"not read by the start checks")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = str(taken.getsockname()[1])
        for setting, extra in (
                ("MELANOSCREEN_MODEL", {"MELANOSCREEN_MODEL": str(tmp_path / "missing.keras")}),
                ("MELANOSCREEN_FLOWER_ADDRESS", {"MELANOSCREEN_FLOWER_ADDRESS": "0.0.0.0"}),
                ("MELANOSCREEN_WEB_PORT", {"MELANOSCREEN_WEB_PORT": busy}),
                ("MELANOSCREEN_BROKER_URL", {"MELANOSCREEN_BROKER_URL": "redis://127.0.0.1:1/0"})):
            for data, existed in ((tmp_path / "new-data", False), (tmp_path / "kept-data", True)):
                if existed:
                    data.mkdir(mode=0o700, exist_ok=True)
                    (data / "mine.txt").write_text("the operator's")
                env = _clean_env(**{"MELANOSCREEN_DATA_DIR": str(data),
                                    "MELANOSCREEN_MODEL": str(model), **extra})
                result = subprocess.run([sys.executable, "-m", "melanoscreen", "up"], cwd=tmp_path,
                                        env=env, capture_output=True, text=True, timeout=60)
                assert result.returncode == 1 and result.stderr.startswith(f"error: {setting}")
                if existed:
                    assert sorted(p.name for p in data.iterdir()) == ["mine.txt"], setting
                else:
                    assert not data.exists(), setting


def test_every_command_has_help_and_help_never_loads_tensorflow() -> None:
    script = ("import sys; from typer.testing import CliRunner; from melanoscreen.cli.app import app\n"
              "r = CliRunner()\n"
              "for c in sys.argv[1:]:\n"
              "    assert r.invoke(app, [c, '--help']).exit_code == 0, c\n"
              "print('tensorflow' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script, *sorted(SERVICE_COMMANDS)],
                            capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "False"


def test_the_worker_registers_every_task_that_the_contract_names() -> None:
    # In a child process: the worker's task modules must load without TensorFlow, too.
    script = ("import sys\n"
              "from melanoscreen import celeryconfig as c\n"
              "from scheduler.queue import beat_schedule\n"
              "from worker.celery_app import app\n"
              "app.loader.import_default_modules()\n"
              "names = {c.SCREEN_BATCH, c.SWEEP, c.DELIVER_MESSAGE, c.QUEUE_DIGESTS}\n"
              "names |= {e['task'] for e in beat_schedule(60).values()}\n"
              "assert names <= set(app.tasks), names - set(app.tasks)\n"
              "assert app.conf.task_acks_late and app.conf.worker_prefetch_multiplier == 1\n"
              "print('tensorflow' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_every_compose_service_runs_a_real_melanoscreen_command() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "postgres", "worker", "watcher", "beat", "flower", "web"} <= set(services)
    ours = {name: s for name, s in services.items() if "build" in s or
            "MELANOSCREEN_IMAGE" in str(s.get("image", ""))}
    assert {"migrate", "worker", "watcher", "beat", "flower", "web"} <= set(ours)
    for name, service in ours.items():
        command = service["command"]
        words = command.split() if isinstance(command, str) else list(command)
        assert words[0] == "melanoscreen", name
        assert words[1] in SERVICE_COMMANDS, name
        # Every long-running service's health check is a real probe of it (the one-shot
        # migrate has none); no secret on its command line.
        if name != "migrate":
            assert service["healthcheck"]["test"][1:4] == ["melanoscreen", "healthcheck",
                                                          {"watcher": "watch"}.get(name, name)]
        assert service["depends_on"]["migrate" if name != "migrate" else "postgres"]
    assert "container_name" not in services["worker"]  # --scale worker=N needs this
    smtp = [s for s in services.values() if "mailpit" in str(s.get("image", ""))]
    assert smtp, "an SMTP catcher"
    # Published ports are loopback's only, and every service behind them asks for a login.
    for service in services.values():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), port


def test_the_compose_file_keeps_the_standard_images_as_defaults() -> None:
    text = (REPO / "docker-compose.yml").read_text()
    for default in ("${BASE_IMAGE:-python:3.11-slim}", "${REDIS_IMAGE:-redis:7}",
                    "${POSTGRES_IMAGE:-postgres:16}", "${MAILCATCHER_IMAGE:-axllent/mailpit:latest}"):
        assert default in text
    assert "ARG BASE_IMAGE=python:3.11-slim" in (REPO / "Dockerfile").read_text()


def test_no_secret_of_the_compose_file_is_on_a_command_line() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    for name, service in compose["services"].items():
        command = service.get("command", "")
        words = " ".join(command) if isinstance(command, list) else str(command)
        test = " ".join(service.get("healthcheck", {}).get("test", []))
        for text in (words, test):
            assert "PASSWORD}" not in text and "SECRET}" not in text, name
