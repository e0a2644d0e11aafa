"""A local attacker or a poison image must not take the service down or read patient images.

Each test replays one finding's attack on a real `melanoscreen up` (embedded Redis, watcher, worker,
beat, Flower) over a fresh data folder, as another local user (uid 65534 through `setpriv`) where
the attack is another user's. The tiny untrained model and a threshold of 0 flag every image, so
every screened image is alerted (as `.eml` files in the outbox: no SMTP host).
"""

from __future__ import annotations

import base64
import csv
import email
import hashlib
import io
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from email import policy
from pathlib import Path, PurePath
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import create_engine, text

from melanoscreen.cli.supervisor import free_port
from scheduler.files import ReplacedWhileReading, open_inbox_file
from tests.conftest import children_of, stop_gracefully, synthetic_jpeg, wait_until

pytestmark = pytest.mark.slow

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="acting as another local user needs root and setpriv")


def as_nobody(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run Python code as uid 65534: standard library only (-I -S), from a folder anyone reads."""
    return subprocess.run([*NOBODY, sys.executable, "-I", "-S", "-c", code, *args], cwd="/",
                          capture_output=True, text=True, timeout=60)


@dataclass
class Up:
    """A running `melanoscreen up` and its data folder."""

    process: subprocess.Popen[bytes]
    data: Path
    log_path: Path
    env: dict[str, str]

    @property
    def inbox(self) -> Path:
        return self.data / "inbox"

    @property
    def flower(self) -> str:
        return f"http://127.0.0.1:{self.env['MELANOSCREEN_FLOWER_PORT']}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rows(self, sql: str, **params: Any) -> list[Any]:
        engine = create_engine(f"sqlite:///{self.data / 'melanoscreen.db'}")
        try:
            with engine.connect() as connection:
                return list(connection.execute(text(sql), params))
        finally:
            engine.dispose()

    def images(self, prefix: str) -> list[Any]:
        return self.rows("SELECT id, sha256, source, status, reason, location, attempts "
                         "FROM images WHERE source LIKE :p ORDER BY source", p=f"{prefix}%")

    def wait_finished(self, prefix: str, count: int, timeout: float = 120.0) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            rows = self.images(prefix)
            final = [r for r in rows if r.status in ("screened", "rejected", "failed")]
            return {r.source: r for r in rows} if len(final) >= count else None

        return wait_until(done, timeout=timeout, message=f"{count} images under {prefix!r}\n"
                          + self.log()[-3000:])

    def move_in(self, files: dict[str, bytes]) -> None:
        """Write the files beside the inbox, then rename them in together (one batch)."""
        staging = self.data.parent / "staging"
        staging.mkdir(exist_ok=True)
        for name, content in files.items():
            (staging / name.replace("/", "_")).write_bytes(content)
        for name in files:
            target = self.inbox / name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(staging / name.replace("/", "_"), target)

    def flower_password(self) -> str:
        return (self.data / "flower.password").read_text().strip()

    def run(self, *args: str) -> str:
        return subprocess.run([sys.executable, "-m", "melanoscreen", *args], env=self.env,
                              capture_output=True, text=True, check=True, timeout=60).stdout


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Up]:
    """`melanoscreen up` on a fresh data folder; the worker is checked every 2 s."""
    root = tmp_path_factory.mktemp("hardening")
    data = root / "data"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MELANOSCREEN_", "FLOWER_"))}
    env.update({"MELANOSCREEN_DATA_DIR": str(data), "MELANOSCREEN_MODEL": str(tiny_model),
                "MELANOSCREEN_ALERT_THRESHOLD": "0", "MELANOSCREEN_ALERT_RECIPIENTS":
                "derm@example.org", "MELANOSCREEN_BATCH_DELAY": "0.5",
                "MELANOSCREEN_BATCH_SIZE": "16", "MELANOSCREEN_WORKER_CONCURRENCY": "1",
                "MELANOSCREEN_STABLE_SECONDS": "0.5", "MELANOSCREEN_RESCAN_INTERVAL": "1",
                "MELANOSCREEN_WORKER_CHECK_INTERVAL": "2",
                "MELANOSCREEN_FLOWER_PORT": str(free_port()), "MELANOSCREEN_WEB_PORT": str(free_port()),
                "TF_CPP_MIN_LOG_LEVEL": "2",
                "PYTHONUNBUFFERED": "1"})
    log_path = root / "up.log"
    with open(log_path, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "melanoscreen", "up"], cwd=root,
                                   env=env, stdout=out, stderr=subprocess.STDOUT)
    running = Up(process, data, log_path, env)
    try:
        wait_until(lambda: (data / "broker.url").exists() and "results:" in running.log(),
                   timeout=60, message="up started")
        yield running
    finally:
        stop_gracefully(process)


# ---- 1 (critical) and 7: the broker answers nobody else; no secret in any argv --------------

_RESP = r"""
import socket, sys
def ask(*words):
    with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5) as s:
        s.sendall(b"*%d\r\n" % len(words) + b"".join(
            b"$%d\r\n%s\r\n" % (len(w), w.encode()) for w in words))
        return s.recv(200).decode(errors="replace").strip()
print(ask("PING"))
print(ask("CONFIG", "SET", "dir", "/root"))
print(ask("LPUSH", "celery", "{}"))
try:
    open(sys.argv[2]).read()
    print("read the broker URL")
except OSError as exc:
    print(type(exc).__name__)
"""


@needs_root
def test_another_local_user_cannot_talk_to_the_broker_and_no_secret_is_in_any_argv(
        up: Up) -> None:
    import redis

    broker = (up.data / "broker.url").read_text().strip()
    client = redis.Redis.from_url(broker)
    port = client.connection_pool.connection_kwargs["port"]
    password = client.connection_pool.connection_kwargs["password"]
    assert password and len(password) >= 32

    answers = as_nobody(_RESP, str(port), str(up.data / "broker.url")).stdout.splitlines()
    assert len(answers) == 4, answers
    ping, config, lpush = answers[:3]
    assert ping.startswith("-NOAUTH") and lpush.startswith("-NOAUTH"), answers
    assert config.startswith(("-NOAUTH", "-ERR unknown command")), answers  # gone altogether
    assert answers[3] == "PermissionError"
    assert stat.S_IMODE((up.data / "broker.url").stat().st_mode) == 0o600

    # Even with the password, the commands that write files or load code are gone...
    # and so are Lua sent as text, other clients' connections, serialised values and slow logs
    # (Redis 7: functions and read-only scripts too).
    disabled = [("CONFIG", "GET", "dir"), ("SAVE",), ("DEBUG", "SLEEP", "0"), ("FLUSHALL",),
                ("MODULE", "LIST"), ("REPLICAOF", "NO", "ONE"), ("KEYS", "*"), ("SWAPDB", "0", "1"),
                ("EVAL", "return 1", "0"), ("CLIENT", "LIST"), ("CLIENT", "KILL", "TYPE", "normal"),
                ("RESTORE", "k", "0", "x"), ("SLOWLOG", "GET")]
    if int(str(client.info()["redis_version"]).split(".")[0]) >= 7:
        disabled += [("FUNCTION", "LIST"), ("FCALL", "f", "0"), ("EVAL_RO", "return 1", "0"),
                     ("EVALSHA_RO", "0" * 40, "0"), ("FAILOVER",)]
    for command in disabled:
        with pytest.raises(redis.ResponseError, match="unknown command"):
            client.execute_command(*command)
    # ...while Celery works: the worker answers through the broker, and kombu's one use of Lua
    # (EVALSHA after SCRIPT LOAD: the deadlines of expiring bindings) has run.
    assert client.ping()
    wait_until(lambda: client.exists("_kombu.binding_deadlines"), timeout=60)

    flower_password = up.flower_password()
    family = [up.process.pid, *children_of(up.process.pid)]
    assert len(family) >= 6
    for pid in family:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        assert password.encode() not in argv, argv
        assert flower_password.encode() not in argv, argv
        assert b"redis://" not in argv, argv


# ---- 2 (critical): a poison image is its own rejection, the rest of the batch goes on -------

def _png_with_chunk(kind: bytes, payload: bytes) -> bytes:
    """A valid 64x64 PNG with one extra ancillary chunk before the image data."""
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 120, 100)).save(out, "PNG")
    png = out.getvalue()
    signature, rest = png[:8], png[8:]
    header_end = 12 + struct.unpack(">I", rest[:4])[0]
    body = kind + payload
    chunk = struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
    return signature + rest[:header_end] + chunk + rest[header_end:]


def _inflating_chunk_png(kind: bytes) -> bytes:
    """An iCCP or zTXt chunk that inflates to 50 MB (Pillow raises ValueError on it)."""
    bomb = zlib.compress(b"\0" * 50_000_000, 9)
    return _png_with_chunk(kind, (b"icc\0\0" if kind == b"iCCP" else b"Comment\0\0") + bomb)


def _text_parts(up: Up) -> list[str]:
    parts = []
    for path in sorted((up.data / "outbox").glob("*.eml")):
        message = email.message_from_bytes(path.read_bytes(), policy=policy.default)
        body = message.get_body(preferencelist=("plain",))
        if body is not None:
            parts.append(body.get_content())
    return parts


def _sources_in_outbox_files(up: Up) -> set[str]:
    texts = "\n".join(_text_parts(up))
    return {row.source for row in up.images("") if row.source in texts}


def test_poison_pngs_moved_in_with_good_images_are_rejected_and_the_rest_alerted_at_once(
        up: Up) -> None:
    good = {f"poison/good-{i}.jpg": synthetic_jpeg(80_000 + i) for i in range(3)}
    bombs = {"poison/iccp-bomb.png": _inflating_chunk_png(b"iCCP"),
             "poison/ztxt-bomb.png": _inflating_chunk_png(b"zTXt")}
    up.move_in({**good, **bombs})
    rows = up.wait_finished("poison/", 5)
    for name in bombs:
        assert rows[name].status == "rejected", rows[name]
        assert rows[name].reason and "too large" in rows[name].reason
        assert Path(rows[name].location).is_relative_to(up.data / "quarantine")
    for name in good:
        assert rows[name].status == "screened", rows[name]
        assert rows[name].attempts == 1  # by the first task, not after retries
    wait_until(lambda: set(good) <= _sources_in_outbox_files(up), timeout=60,
               message="alerts for the good images")


# ---- 5 (high): nothing in the data folder is open to other users ----------------------------

@needs_root
def test_nothing_in_the_data_folder_is_readable_by_other_users_after_screening(up: Up) -> None:
    # Dropped by a tool with a permissive umask: the stored copy is still private.
    dropped = up.inbox / "perm" / "open.jpg"
    dropped.parent.mkdir()
    dropped.write_bytes(synthetic_jpeg(81_000))
    dropped.chmod(0o644)
    up.wait_finished("perm/", 1)
    wait_until(lambda: list((up.data / "outbox").glob("*.eml")), message="an outbox email")
    open_to_others = []
    for root, dirs, files in os.walk(up.data):
        for name in (*dirs, *files):
            mode = os.lstat(Path(root) / name).st_mode
            if stat.S_IMODE(mode) & 0o077 or stat.S_ISLNK(mode):
                open_to_others.append(f"{oct(mode)} {Path(root) / name}")
    assert stat.S_IMODE(up.data.stat().st_mode) == 0o700
    assert open_to_others == []
    listing = as_nobody("import os, sys\ntry:\n    print(os.listdir(sys.argv[1]))\n"
                        "except OSError as exc:\n    print(type(exc).__name__)", str(up.data))
    assert listing.stdout.strip() == "PermissionError"


# ---- 3 (high): Flower's API needs auth, sends no wildcard CORS; a worker told to stop
# consuming is noticed and restarted ----------------------------------------------------------

_FLOWER = r"""
import sys, urllib.request, urllib.error
base = sys.argv[1]
for method, path in (("GET", "/api/workers"), ("POST", "/api/worker/shutdown/x"),
                     ("POST", "/api/task/send-task/worker.tasks.screen_batch"),
                     ("GET", "/metrics"), ("GET", "/healthcheck")):
    request = urllib.request.Request(base + path, method=method, data=b"{}" if method == "POST"
                                     else None, headers={"Origin": "http://evil.example"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            print(response.status, response.headers.get("Access-Control-Allow-Origin"))
    except urllib.error.HTTPError as exc:
        print(exc.code, exc.headers.get("Access-Control-Allow-Origin"))
"""


def _flower(up: Up, method: str, path: str,
            origin: str | None = None) -> tuple[int, Any, Any]:
    token = base64.b64encode(f"melanoscreen:{up.flower_password()}".encode()).decode()
    headers = {"Authorization": f"Basic {token}"} | ({"Origin": origin} if origin else {})
    request = urllib.request.Request(up.flower + path, method=method,
                                     data=b"" if method == "POST" else None, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, None


@needs_root
def test_flower_needs_auth_and_a_worker_told_to_stop_consuming_is_restarted(up: Up) -> None:
    assert stat.S_IMODE((up.data / "flower.password").stat().st_mode) == 0o600
    # Its password is only in that file: never on standard output (which ends up in a log).
    assert up.flower_password() not in up.log()
    assert str(up.data / "flower.password") in up.log()

    def answered() -> list[str] | None:
        result = as_nobody(_FLOWER, up.flower).stdout.split("\n")
        return result if result[0] else None

    answers = wait_until(answered, timeout=60, message="Flower answering")
    refused = [answer.split() for answer in answers[:5]]
    assert all(code in ("401", "403") and origin == "None" for code, origin in refused), answers

    def workers() -> dict[str, Any] | None:
        code, headers, body = _flower(up, "GET", "/api/workers?refresh=1",
                                      origin="http://evil.example")
        assert headers.get("Access-Control-Allow-Origin") is None
        return body if code == 200 and body else None

    names = list(wait_until(workers, timeout=60, message="Flower listing the worker"))
    assert len(names) == 1
    assert "not doing its job" not in up.log()  # a consuming worker is left alone
    cancel = f"/api/worker/queue/cancel-consumer/{names[0]}?queue=celery"
    # A page in a browser that knows the password still cannot post from another origin.
    assert _flower(up, "POST", cancel, origin="http://evil.example")[0] == 403
    assert _flower(up, "POST", cancel)[0] == 200
    wait_until(lambda: "not doing its job; restarting" in up.log(), timeout=60,
               message="the supervisor noticing the idle worker")
    up.move_in({"after-cancel/one.jpg": synthetic_jpeg(82_000)})
    assert up.wait_finished("after-cancel/", 1)["after-cancel/one.jpg"].status == "screened"


# ---- 4 (high): a symlink swapped in, or a hard link from outside, never reaches the store -----

def _links_or_shared_inodes(store: Path, outside: list[Path]) -> list[str]:
    inodes = {(p.stat().st_dev, p.stat().st_ino) for p in outside if p.exists()}
    found = []
    for path in store.rglob("*"):
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode) or (info.st_dev, info.st_ino) in inodes \
                or (stat.S_ISREG(info.st_mode) and info.st_nlink != 1):
            found.append(str(path))
    return found


def test_a_hard_link_from_outside_is_stored_as_a_private_copy(up: Up, tmp_path: Path) -> None:
    outside = up.data.parent / "outside-hard.jpg"  # same file system as the inbox
    content = synthetic_jpeg(83_000)
    outside.write_bytes(content)
    (up.inbox / "hard").mkdir()
    os.link(outside, up.inbox / "hard" / "linked.jpg")
    row = up.wait_finished("hard/", 1)["hard/linked.jpg"]
    stored = Path(row.location)
    assert stored.read_bytes() == content
    assert _links_or_shared_inodes(up.data / "store", [outside]) == []
    assert outside.read_bytes() == content and outside.stat().st_nlink == 1
    outside.write_bytes(b"changed outside")
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == row.sha256


def _open_in_some_process(path: Path) -> bool:
    """Whether any process holds `path` open (read from /proc: the watcher's open is an event)."""
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            if os.readlink(fd) == str(path):
                return True
        except OSError:
            continue
    return False


def test_a_symlink_swapped_in_while_a_file_is_hashed_never_reaches_the_store(
        up: Up, tmp_path: Path) -> None:
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(synthetic_jpeg(84_000))
    big = up.data.parent / "big.jpg"
    with open(big, "wb") as handle:
        handle.write(synthetic_jpeg(84_001))
        # ~150 MB (under MELANOSCREEN_MAX_FILE_BYTES): hashing takes a while
        handle.write(os.urandom(1 << 20) * 150)
    (up.inbox / "swap").mkdir()
    name = up.inbox / "swap" / "big.jpg"
    link = up.data.parent / "link.jpg"
    link.symlink_to(secret)
    os.rename(big, name)
    # Swap the name once the watcher has the file open (or has already taken it whole).
    wait_until(lambda: _open_in_some_process(name) or up.images("swap/"), timeout=60,
               interval=0.005, message="the watcher reading the dropped file")
    os.replace(link, name)  # `mv -T link name`
    wait_until(lambda: up.images("swap/") or "replaced while it was read" in up.log(),
               timeout=60, message="the watcher done with the swapped name")
    assert _links_or_shared_inodes(up.data / "store", [secret]) == []
    for row in up.images("swap/"):
        stored = Path(row.location)
        assert not stored.is_symlink()
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == row.sha256
        assert stored.read_bytes() != secret.read_bytes()


def test_the_file_that_was_hashed_is_the_one_moved_or_nothing_is(tmp_path: Path) -> None:
    # The same race, made certain: the name is swapped between hashing and moving.
    inbox, store, staging = tmp_path / "inbox", tmp_path / "store", tmp_path / "staging"
    inbox.mkdir()
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"outside the inbox")
    name = inbox / "x.jpg"
    name.write_bytes(b"what was dropped")
    opened = open_inbox_file(inbox, PurePath("x.jpg"), staging)
    assert opened is not None
    with opened:
        (tmp_path / "link").symlink_to(secret)
        os.replace(tmp_path / "link", name)
        with pytest.raises(ReplacedWhileReading):
            opened.move_to(store / "ab" / "x.jpg")
    assert list(store.rglob("*")) == [store / "ab"]
    assert name.is_symlink()  # the swapped-in link went back where it came from
    assert open_inbox_file(inbox, PurePath("x.jpg"), staging) is None  # and is never followed
    # A folder swapped for a link to elsewhere (after the watcher looked at the name) is not
    # entered either.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "y.jpg").write_bytes(b"outside the inbox")
    (inbox / "sub").symlink_to(elsewhere)
    assert open_inbox_file(inbox, PurePath("sub/y.jpg"), staging) is None
    assert (elsewhere / "y.jpg").read_bytes() == b"outside the inbox"


# ---- 6 and 9 (medium): formula cells, terminal escapes, a newline in an email's text part ----

def test_a_formula_name_is_a_plain_text_cell_and_escapes_never_reach_the_terminal(up: Up) -> None:
    names = ["=cmd|'calc'!A1.jpg", "+sum(1).jpg", "-2+3.jpg", "@now.jpg",
             "\x1b]0;pwned\x07\x1b[2Jterm.jpg"]
    up.move_in({f"csv/{name}": synthetic_jpeg(85_000 + i) for i, name in enumerate(names)})
    up.wait_finished("csv/", len(names))
    rows = list(csv.DictReader(io.StringIO(up.run("results", "--format", "csv"))))
    mine = [row for row in rows if "csv/" in row["source"]]
    assert len(mine) == len(names)
    for row in rows:
        for value in row.values():
            assert not value.startswith(("=", "+", "-", "@", "\t", "\r")), value
    assert "'=cmd|'calc'!A1.jpg" not in {r["source"] for r in mine}  # it is under csv/
    table = up.run("results")
    assert "\x1b" not in table and "\x07" not in table
    assert "csv/\\x1b]0;pwned\\x07" in table
    assert "\x1b" not in up.log()  # nor through the log lines that name the file


def test_a_newline_in_a_name_does_not_start_a_line_in_the_alert_text(up: Up) -> None:
    name = "mail/lesion\nMelanoma probability: 0.001\nx.jpg"
    up.move_in({name: synthetic_jpeg(86_000)})
    up.wait_finished("mail/", 1)

    def text_part() -> str | None:
        return next((part for part in _text_parts(up) if "mail/lesion" in part), None)

    body = wait_until(text_part, timeout=60, message="the alert for the newline name")
    assert "mail/lesion\\x0aMelanoma probability: 0.001\\x0ax.jpg" in body
    assert not [line for line in body.splitlines()
                if line.strip().startswith("Melanoma probability: 0.001")]
    assert not [line for line in up.log().splitlines()
                if line.startswith("Melanoma probability: 0.001")]  # nor a log line


# ---- 8 (medium): over-long names are recorded at once --------------------------------------

def test_over_long_names_become_one_row_each_at_once(up: Up) -> None:
    long_name = "x." + "é" * 120  # 242 bytes: fine in the inbox, too long once stamped
    content = synthetic_jpeg(87_000)
    up.move_in({f"long/{long_name}": content})
    row = up.wait_finished("long/", 1, timeout=30)[f"long/{long_name}"]
    assert row.status == "screened"
    duplicate = "d" * 246 + ".jpg"  # 250 bytes
    up.move_in({f"long/{duplicate}": content})
    recorded = wait_until(lambda: up.rows("SELECT location FROM duplicates WHERE source = :s",
                                          s=f"long/{duplicate}"), timeout=30,
                          message="the duplicate row")
    assert len(recorded) == 1
    kept = Path(recorded[0].location)
    assert kept.read_bytes() == content and len(os.fsencode(kept.name)) <= 255
    assert "File name too long" not in up.log()
    assert len(up.images("long/")) == 1


def test_a_name_that_is_not_utf8_becomes_one_row_and_the_watcher_lives_on(up: Up) -> None:
    # b"lesion\xff.jpg": a name may hold any byte; the database holds text.
    up.move_in({"bytes/lesion\udcff.jpg": synthetic_jpeg(88_000),
                "bytes/plain.jpg": synthetic_jpeg(88_001)})
    rows = up.wait_finished("bytes/", 2, timeout=30)
    assert set(rows) == {"bytes/lesion\\xff.jpg", "bytes/plain.jpg"}
    assert {row.status for row in rows.values()} == {"screened"}
    assert "watch exited" not in up.log()
