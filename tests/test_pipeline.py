"""The screening pipeline end to end: real Redis, real worker, watcher and beat processes, real files."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import Service, synthetic_jpeg, wait_until

pytestmark = pytest.mark.slow


def test_twenty_dropped_images_are_all_screened_with_probabilities(service: Service) -> None:
    for i in range(20):
        service.drop(f"twenty/clinic-{i % 2}/lesion-{i:02d}.jpg", synthetic_jpeg(1000 + i))
    rows = service.wait_finished("twenty/", 20)
    assert [r.status for r in rows] == ["screened"] * 20
    predictions = service.rows(
        "SELECT p.image_id, p.probabilities, p.melanoma_probability, p.predicted_class, "
        "p.model_version, p.threshold FROM predictions p JOIN images i ON i.id = p.image_id "
        "WHERE i.source LIKE 'twenty/%'")
    assert len(predictions) == 20
    for row in predictions:
        probabilities = json.loads(row.probabilities)
        assert len(probabilities) == 9
        assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-4)
        assert row.melanoma_probability == pytest.approx(probabilities["melanoma"])
        assert row.model_version == "tiny-test-1"
        assert row.threshold == pytest.approx(0.1)
    # Every file left the inbox for the store, named by its content.
    assert not any((service.inbox / "twenty").rglob("*.jpg"))
    for row in rows:
        stored = Path(row.location)
        assert stored.is_relative_to(service.data_dir / "store")
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == row.sha256


def test_a_duplicate_drop_is_screened_once_and_recorded(service: Service) -> None:
    content = synthetic_jpeg(2000)
    service.drop("dup/first.jpg", content)
    service.wait_finished("dup/first", 1)
    service.drop("dup/second-name.jpg", content)
    duplicates = wait_until(lambda: service.rows(
        "SELECT d.source, d.location, i.source AS original FROM duplicates d "
        "JOIN images i ON i.id = d.image_id WHERE d.source = 'dup/second-name.jpg'"),
        message="the duplicate row")
    assert duplicates[0].original == "dup/first.jpg"
    kept = Path(duplicates[0].location)
    assert kept.is_relative_to(service.data_dir / "duplicates")
    assert kept.read_bytes() == content
    assert len(service.images_under("dup/")) == 1
    assert service.rows("SELECT count(*) AS n FROM predictions p JOIN images i ON i.id = "
                        "p.image_id WHERE i.source = 'dup/first.jpg'")[0].n == 1


def test_a_file_written_slowly_in_chunks_is_screened_once_complete(service: Service) -> None:
    content = synthetic_jpeg(3000, size=(200, 150))
    path = service.inbox / "slow" / "slow.jpg"
    path.parent.mkdir(parents=True)
    step = len(content) // 4 + 1
    with open(path, "wb") as handle:
        for start in range(0, len(content), step):
            handle.write(content[start : start + step])
            handle.flush()
            time.sleep(0.8)  # longer than the stable_seconds the polling rule would use
    rows = service.wait_finished("slow/", 1)
    assert len(rows) == 1
    assert rows[0].status == "screened"
    assert rows[0].sha256 == hashlib.sha256(content).hexdigest()


def _bomb_png() -> bytes:
    # 9000 x 9000 one-bit pixels: a few kB on disk, 81 megapixels decoded.
    out = io.BytesIO()
    Image.new("1", (9000, 9000)).save(out, "PNG")
    return out.getvalue()


def test_unreadable_files_are_rejected_with_reasons_and_quarantined(service: Service) -> None:
    good = synthetic_jpeg(4000)
    bad = {
        "corrupt.jpg": good[: len(good) // 2],
        "notes.jpg": b"this is a text file, not an image\n",
        "bomb.png": _bomb_png(),
    }
    service.drop("mixed/a-good.jpg", good)
    for name, content in bad.items():
        service.drop(f"mixed/{name}", content)
    # An empty file is not content (a failed write): it waits in the inbox, with no row.
    service.drop("mixed/empty.jpg", b"")
    service.drop("mixed/z-good.jpg", synthetic_jpeg(4001))
    rows = {r.source: r for r in service.wait_finished("mixed/", 5)}
    assert "mixed/empty.jpg" not in rows and (service.inbox / "mixed" / "empty.jpg").exists()
    assert rows["mixed/a-good.jpg"].status == "screened"
    assert rows["mixed/z-good.jpg"].status == "screened"
    expected_reason = {"corrupt.jpg": "truncated", "notes.jpg": "not an image",
                       "bomb.png": "decompression bomb"}
    for name, fragment in expected_reason.items():
        row = rows[f"mixed/{name}"]
        assert row.status == "rejected", name
        assert fragment in row.reason, (name, row.reason)
        kept = Path(row.location)
        assert kept.is_relative_to(service.data_dir / "quarantine")
        assert kept.read_bytes() == bad[name]
        assert fragment in kept.with_name(kept.name + ".reason.txt").read_text()


def test_hidden_partial_and_symlinked_files_are_ignored(service: Service, tmp_path: Path) -> None:
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(synthetic_jpeg(5000))
    (service.inbox / "ignored").mkdir()
    (service.inbox / "ignored" / "link.jpg").symlink_to(outside)
    for name in (".hidden.jpg", "upload.jpg.part", "x.tmp", "backup.jpg~", "get.crdownload"):
        service.drop(f"ignored/{name}", synthetic_jpeg(5001 + len(name)))
    service.drop("ignored/zz-real.jpg", synthetic_jpeg(5100))
    # The explicit condition: a file written after all of them has gone through; the watcher
    # looks at files in the order they arrived, so each of them has been looked at by now.
    # (tests/test_watcher.py checks the same rules in process, rescans included.)
    service.wait_finished("ignored/zz", 1)
    assert [r.source for r in service.images_under("ignored/")] == ["ignored/zz-real.jpg"]
    assert (service.inbox / "ignored" / "upload.jpg.part").exists()
    assert outside.exists()


def test_images_dropped_while_the_watcher_is_down_are_taken_at_its_start(service: Service) -> None:
    assert service.stop("watch") == 0
    try:
        for i in range(3):
            service.drop(f"offline/img-{i}.jpg", synthetic_jpeg(6000 + i))
        # No watcher runs (it exited above), so nothing can have taken them.
        assert service.images_under("offline/") == []
    finally:
        service.start("watch")
    rows = service.wait_finished("offline/", 3)
    assert {r.status for r in rows} == {"screened"}


def test_flower_lists_the_worker_and_the_screening_tasks(service: Service) -> None:
    base = f"http://127.0.0.1:{service.env['MELANOSCREEN_FLOWER_PORT']}"
    service.drop("flower/one.jpg", synthetic_jpeg(7000))
    service.wait_finished("flower/", 1)

    # Flower is always behind basic auth: with no password set, one is generated at first start.
    password_file = service.data_dir / "flower.password"
    wait_until(password_file.exists, timeout=60, message="Flower's generated password")
    token = base64.b64encode(f"melanoscreen:{password_file.read_text().strip()}".encode())

    def get(path: str) -> object:
        request = urllib.request.Request(base + path,
                                         headers={"Authorization": f"Basic {token.decode()}"})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            return None

    workers = wait_until(lambda: get("/api/workers?refresh=1"), timeout=60, message="workers")
    assert any(name.startswith("melanoscreen-") for name in workers)
    tasks = wait_until(lambda: get("/api/tasks"), timeout=60, message="tasks")
    names = {task["name"] for task in tasks.values()}
    assert "worker.tasks.screen_batch" in names


def test_status_and_results_report_what_the_database_holds(service: Service) -> None:
    service.drop("report/one.jpg", synthetic_jpeg(8000))
    service.wait_finished("report/", 1)

    def run(*args: str) -> str:
        return subprocess.run([sys.executable, "-m", "melanoscreen", *args], env=service.env,
                              capture_output=True, text=True, check=True, timeout=60).stdout

    status = json.loads(run("status", "--json"))
    assert status["counts"]["screened"] >= 1
    assert isinstance(status["flagged"], int)
    assert isinstance(status["queue_length"], int)
    results = json.loads(run("results", "--format", "json"))
    mine = [r for r in results if r["source"] == "report/one.jpg"]
    assert len(mine) == 1
    assert set(mine[0]) >= {"sha256", "source", "status", "reason", "received_at", "screened_at",
                            "predicted_class", "melanoma_probability", "flagged", "model_version"}
    assert mine[0]["status"] == "screened"
    assert mine[0]["model_version"] == "tiny-test-1"
    csv_lines = run("results", "--format", "csv", "--since", "2000-01-01").splitlines()
    assert csv_lines[0].split(",")[:3] == ["sha256", "source", "status"]
    assert any("report/one.jpg" in line for line in csv_lines[1:])
    # --flagged gives exactly the flagged rows of the full list (tests/test_alerts.py checks it
    # with images that are certainly flagged, and certainly not).
    flagged = json.loads(run("results", "--flagged", "--format", "json"))
    assert sorted(r["sha256"] for r in flagged) == sorted(r["sha256"] for r in results if r["flagged"])
    probabilities = [r["melanoma_probability"] for r in flagged]
    assert probabilities == sorted(probabilities, reverse=True)  # what to look at first, first
    assert status["flagged"] == len(flagged)
    assert "screened" in run("status")


def test_the_watcher_process_never_loads_tensorflow(service: Service) -> None:
    # Run a watcher in a child process, let it take a file, then ask that process.
    script = """
import sys, threading, time
from pathlib import Path
from db.session import make_session_factory
from melanoscreen.settings import Settings
from scheduler.queue import make_producer, send_screen_batch
from scheduler.watcher import Watcher
data, url, broker = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
settings = Settings(_env_file=None, inbox=data / "inbox2", data_dir=data, database_url=url,
                    batch={"size": 2, "delay": 0.1}, rescan_interval=1, stable_seconds=0.2)
producer = make_producer(broker)
watcher = Watcher(settings, make_session_factory(url), lambda ids: send_screen_batch(producer, ids))
stop = threading.Event()
thread = threading.Thread(target=watcher.run, args=(stop,))
thread.start()
while (data / "inbox2" / "tf.jpg").exists() or not (data / "inbox2").exists():
    time.sleep(0.1)
stop.set(); thread.join()
print("tensorflow" in sys.modules)
"""
    inbox2 = service.data_dir / "inbox2"
    inbox2.mkdir(exist_ok=True)
    (inbox2 / "tf.jpg").write_bytes(synthetic_jpeg(9000))
    out = subprocess.run([sys.executable, "-c", script, str(service.data_dir),
                          service.database_url, service.env["MELANOSCREEN_BROKER_URL"]],
                         capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
    assert service.rows("SELECT count(*) AS n FROM images WHERE source = 'tf.jpg'")[0].n == 1


def test_the_worker_shuts_down_cleanly_on_sigterm(service: Service) -> None:
    assert service.stop("worker", signal.SIGTERM) == 0  # a warm shutdown, not a kill
    service.start("worker")
    service.drop("restart/after.jpg", synthetic_jpeg(9100))
    assert service.wait_finished("restart/", 1)[0].status == "screened"


def test_the_polling_watcher_takes_files_once_their_size_is_stable(service: Service) -> None:
    assert service.stop("watch") == 0
    service.start("watch", "--polling")
    try:
        content = synthetic_jpeg(9200, size=(160, 120))
        path = service.inbox / "polled" / "chunked.jpg"
        path.parent.mkdir(parents=True)
        half = len(content) // 2
        with open(path, "wb") as handle:
            handle.write(content[:half])
            handle.flush()
            time.sleep(0.3)  # shorter than MELANOSCREEN_STABLE_SECONDS
            handle.write(content[half:])
        service.drop("polled/plain.jpg", synthetic_jpeg(9201))
        rows = service.wait_finished("polled/", 2)
        assert {r.status for r in rows} == {"screened"}
        by_name = {r.source: r for r in rows}
        assert by_name["polled/chunked.jpg"].sha256 == hashlib.sha256(content).hexdigest()
    finally:
        service.stop("watch")
        service.start("watch")
