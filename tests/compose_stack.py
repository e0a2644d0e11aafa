"""The compose deployment driven from Python: build, start, drop images, read the database,
Flower and the mail catcher, stop. Used by tests/test_compose.py and benchmarks/compose.py.

Everything goes through the docker and compose command lines, as an operator's would; secrets
go to compose in a private env file (0600), never in an argument.
"""

from __future__ import annotations

import base64
import io
import json
import os
import secrets
import shutil
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

REPO = Path(__file__).resolve().parent.parent
#: Our services, as the compose file names them (the others: postgres, redis, mailcatcher).
OURS = ("worker", "watcher", "beat", "flower", "web")
#: The uid of the image's `melanoscreen` user, in the dropped files' tar headers.
SERVICE_UID = 1000


def docker_problem() -> str | None:
    """Why the compose deployment cannot run here, or None when a Docker daemon answers."""
    if shutil.which("docker") is None:
        return "no docker command (install docker.io)"
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        return "no Docker daemon answers `docker info`"
    if compose_command() is None:
        return "neither `docker compose` nor `docker-compose` is installed"
    return None


def compose_command() -> list[str] | None:
    """`docker compose` (the v2 plugin) where installed, else Debian's `docker-compose` (v1)."""
    plugin = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=60)
    if plugin.returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def build_images() -> dict[str, str]:
    """deploy/local-images.sh: the local images (cached after the first run); returns the
    variables that point the compose file at them."""
    result = subprocess.run(["bash", str(REPO / "deploy" / "local-images.sh")], cwd=REPO,
                            capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"deploy/local-images.sh failed:\n{result.stderr[-4000:]}")
    pairs = (line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    return {key.strip(): value.strip() for key, value in pairs}


def lesion_jpeg(seed: int, size: int = 180) -> bytes:
    """A distinct synthetic dermoscopy-like JPEG: a dark blurred oval on skin tone with noise.

    Unlike plain colour blobs, these are within the shipped model's scope (not out-of-scope)
    and many reach its alert threshold, so a burst of them sends alerts.
    """
    rng = np.random.default_rng(seed)
    skin = tuple(int(v) for v in (rng.integers(180, 230), rng.integers(130, 170),
                                  rng.integers(110, 150)))
    image = Image.new("RGB", (size, size), skin)
    radius = int(rng.integers(size // 6, size * 2 // 5))
    cx, cy = (size // 2 + int(rng.integers(-15, 15)) for _ in range(2))
    colour = tuple(int(v) for v in rng.integers(20, 110, 3))
    ImageDraw.Draw(image).ellipse([cx - radius, cy - radius * 0.8, cx + radius, cy + radius * 0.8],
                                  fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(3))
    pixels = np.asarray(image, np.int16) + rng.integers(-12, 12, (size, size, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def free_port() -> int:
    """A TCP port on loopback that nobody listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Stack:
    """One compose project of the deployment, its secrets in `env_file` (0600)."""

    project: str
    folder: Path
    images: Mapping[str, str] = field(default_factory=dict)
    extra: Mapping[str, str] = field(default_factory=dict)
    compose: list[str] = field(default_factory=list)
    secrets: dict[str, str] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.compose = self.compose or compose_command() or ["docker-compose"]
        self.secrets = {name: secrets.token_hex(24) for name in (
            "POSTGRES_PASSWORD", "REDIS_PASSWORD", "FLOWER_PASSWORD", "WEB_SECRET",
            "MAILCATCHER_PASSWORD")}
        self.ports = {name: free_port() for name in ("FLOWER_PORT", "WEB_PORT", "MAILCATCHER_PORT")}
        self.folder.mkdir(parents=True, exist_ok=True)
        lines = [f"{k}={v}" for k, v in {**self.images, **self.secrets, **self.extra}.items()]
        lines += [f"{k}={v}" for k, v in self.ports.items()]
        fd = os.open(self.env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write("\n".join(lines) + "\n")

    @property
    def env_file(self) -> Path:
        """The private file that hands compose its variables and secrets."""
        return self.folder / "compose.env"

    def run(self, *args: str, timeout: float = 300, check: bool = True,
            stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        """One compose command on this project (the host's MELANOSCREEN_* stay out of it)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("MELANOSCREEN_")}
        argv = [*self.compose, "--project-name", self.project, "--file", str(REPO / "docker-compose.yml"),
                "--env-file", str(self.env_file), *args]
        result = subprocess.run(argv, cwd=REPO, env=env, input=stdin, capture_output=True,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}):\n"
                               f"{result.stderr.decode(errors='replace')[-3000:]}")
        return result

    def up(self, workers: int, timeout: float = 300) -> float:
        """`up -d --scale worker=N` and wait until every service is healthy; returns seconds."""
        started = time.monotonic()
        self.run("up", "-d", "--no-build", "--scale", f"worker={workers}", timeout=timeout)
        wait_for(lambda: self.unhealthy() == [], timeout=timeout, what="every service healthy",
                 detail=lambda: f"not healthy: {self.unhealthy()}")
        return time.monotonic() - started

    def down(self, *, volumes: bool = False) -> None:
        """Stop and remove the containers (and with `volumes`, the data)."""
        self.run("down", "--remove-orphans", *(["--volumes"] if volumes else []), timeout=300)

    def containers(self, service: str) -> list[str]:
        """The ids of a service's running containers (found by compose's labels)."""
        out = _docker("ps", "--quiet", "--no-trunc",
                      "--filter", f"label=com.docker.compose.project={self.project}",
                      "--filter", f"label=com.docker.compose.service={service}")
        return out.stdout.decode().split()

    def unhealthy(self) -> list[str]:
        """`service(state)` for each container that is not running healthy (or exited 0, for
        the one-shot migrate)."""
        ids = self.run("ps", "-q").stdout.decode().split()
        if not ids:
            return ["(no containers)"]
        fmt = ("{{index .Config.Labels \"com.docker.compose.service\"}} {{.State.Status}} "
               "{{.State.ExitCode}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}")
        out = _docker("inspect", "--format", fmt, *ids).stdout.decode().splitlines()
        bad = []
        for line in out:
            service, status, code, health = line.split()
            if service == "migrate":
                if status != "exited" or code != "0":
                    bad.append(f"migrate({status} {code})")
            elif status != "running" or health not in ("healthy", "none"):
                bad.append(f"{service}({status}/{health})")
        return bad

    def drop(self, files: Mapping[str, bytes]) -> None:
        """Write files into the inbox volume: one tar stream unpacked by `tar` in the watcher's
        container, as its user (each file written, then closed, as a real drop is)."""
        (watcher,) = self.containers("watcher")
        stream = io.BytesIO()
        with tarfile.open(fileobj=stream, mode="w") as tar:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.uid, info.gid = len(data), 0o600, SERVICE_UID, SERVICE_UID
                info.mtime = int(time.time())
                tar.addfile(info, io.BytesIO(data))
        _docker("exec", "-i", watcher, "tar", "-x", "--no-same-owner", "-C", "/inbox",
                stdin=stream.getvalue())

    def sql(self, query: str) -> list[list[str]]:
        """Rows of a query, run by psql inside the postgres container (through `docker exec`:
        polled often, and compose v1's own start costs a second of CPU each time)."""
        (postgres,) = self.containers("postgres")
        out = _docker("exec", postgres, "psql", "-U", "melanoscreen", "-d", "melanoscreen",
                      "-tAF", "\t", "-c", query).stdout.decode()
        return [line.split("\t") for line in out.splitlines() if line]

    def scalar(self, query: str) -> int:
        """One integer from a query."""
        return int(self.sql(query)[0][0])

    def http_json(self, port_name: str, path: str, user: str, password: str) -> Any:
        """GET a published port's JSON with basic auth."""
        login = base64.b64encode(f"{user}:{password}".encode()).decode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.ports[port_name]}{path}",
                                         headers={"Authorization": f"Basic {login}"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.loads(answer.read())

    def http_status(self, port_name: str, path: str) -> int:
        """The status of an anonymous GET on a published port."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports[port_name]}{path}",
                                        timeout=30) as answer:
                return int(answer.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    def flower(self, path: str) -> Any:
        """Flower's API, with the dashboard's login."""
        return self.http_json("FLOWER_PORT", path, "admin", self.secrets["FLOWER_PASSWORD"])

    def mail(self) -> Any:
        """The mail catcher's message list (Mailpit's API)."""
        return self.http_json("MAILCATCHER_PORT", "/api/v1/messages", "catcher",
                              self.secrets["MAILCATCHER_PASSWORD"])

    def logs(self, *services: str, tail: int = 40) -> str:
        """The last lines of services' logs (for a failure's message)."""
        result = self.run("logs", "--no-color", f"--tail={tail}", *services, check=False)
        return result.stdout.decode(errors="replace")[-6000:]


def _docker(*args: str, stdin: bytes | None = None,
            check: bool = True) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(["docker", *args], input=stdin, capture_output=True, timeout=300)
    if check and result.returncode != 0:
        raise RuntimeError(f"docker {args[0]} failed: {result.stderr.decode(errors='replace')}")
    return result


def kill_container(container: str) -> None:
    """`docker kill`: SIGKILL to the container's processes, no goodbye (paused ones too)."""
    _docker("kill", container)


def pause_container(container: str) -> None:
    """`docker pause`: freeze every process of the container where it stands."""
    _docker("pause", container)


def unpause_container(container: str) -> None:
    """`docker unpause`: let a frozen container go on."""
    _docker("unpause", container)


def wait_for(condition: Callable[[], Any], *, timeout: float, what: str, interval: float = 1.0,
             detail: Callable[[], str] | None = None) -> Any:
    """Poll `condition()` until truthy (returns its value), or raise naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s"
                               + (f" ({detail()})" if detail else ""))
        time.sleep(interval)
