"""Inbox junk benchmark: how long one image takes from its drop to its prediction row in a running
`melanoscreen up` whose shared inbox is clean, then holds 100,000 empty files of another user.

Prints a side-by-side table and one JSON object: the time to screen an image dropped right after
the junk (while the watcher is busy with it) and one dropped once the junk is known, each beside
the clean inbox's time; and how many log lines each rescan added with the junk in place.

    python benchmarks/inbox_junk.py                    # 100,000 empty files, the shipped model
    python benchmarks/inbox_junk.py --junk 20000 --model path/to/model.keras

As root the junk is made by uid 65534 and the images by uid 65533 (`setpriv`), as on a shared
host; otherwise all by the current user.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sqlalchemy import create_engine, text

from melanoscreen.cli.supervisor import free_port

RESCAN_INTERVAL = 5.0
AS_ROOT = os.geteuid() == 0 and shutil.which("setpriv") is not None
JUNK_USER = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if AS_ROOT else []
IMAGE_USER = ["setpriv", "--reuid=65533", "--regid=65533", "--clear-groups"] if AS_ROOT else []

EMPTY_FILES = """
import os, sys
os.makedirs(sys.argv[1], exist_ok=True)
os.chdir(sys.argv[1])
for i in range(int(sys.argv[2])):
    os.close(os.open("%d.jpg" % i, os.O_WRONLY | os.O_CREAT, 0o644))
"""
DROP = """
import os, sys
os.makedirs(os.path.dirname(sys.argv[1]), exist_ok=True)
with open(sys.argv[1] + ".part", "wb") as out:
    out.write(bytes.fromhex(sys.argv[2]))
os.rename(sys.argv[1] + ".part", sys.argv[1])
"""


def run_as(user: list[str], code: str, *args: str) -> None:
    """Run standard-library Python as `user` (a setpriv prefix, or [] for ourselves)."""
    subprocess.run([*user, sys.executable, "-I", "-S", "-c", code, *args], cwd="/", check=True)


def jpeg(seed: int) -> bytes:
    """A distinct 180x180 JPEG."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    out = io.BytesIO()
    base.resize((180, 180), Image.Resampling.BILINEAR).save(out, "JPEG", quality=90)
    return out.getvalue()


class Service:
    """A running `up` over a fresh data folder and a shared (1777) inbox."""

    def __init__(self, root: Path, model: Path | None) -> None:
        self.data = root / "data"
        self.inbox = root / "inbox"
        self.inbox.mkdir()
        self.inbox.chmod(0o1777)
        self.log_path = root / "up.log"
        env = dict(os.environ, MELANOSCREEN_DATA_DIR=str(self.data),
                   MELANOSCREEN_INBOX=str(self.inbox),
                   MELANOSCREEN_FLOWER_PORT=str(free_port()), MELANOSCREEN_WEB_PORT=str(free_port()),
                   MELANOSCREEN_RESCAN_INTERVAL=str(RESCAN_INTERVAL), MELANOSCREEN_BATCH_DELAY="0.2",
                   MELANOSCREEN_WORKER_CONCURRENCY="1", TF_CPP_MIN_LOG_LEVEL="2")
        if model is not None:
            env["MELANOSCREEN_MODEL"] = str(model)
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as `up`
        self.process = subprocess.Popen([sys.executable, "-m", "melanoscreen", "up"], env=env,
                                        stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while not (self.data / "broker.url").exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"up did not start; see {self.log_path}")
            time.sleep(0.2)
        self.engine = create_engine(f"sqlite:///{self.data / 'melanoscreen.db'}")

    def screened(self, source: str) -> bool:
        """Whether the image dropped as `source` has its final row."""
        query = text("SELECT 1 FROM images WHERE source = :s "
                     "AND status IN ('screened', 'rejected', 'failed')")
        try:
            with self.engine.connect() as connection:
                return connection.execute(query, {"s": source}).first() is not None
        except Exception:  # the database is created by `up` a moment after the broker
            return False

    def time_to_screen(self, name: str, seed: int, timeout: float = 900) -> float:
        """Seconds from dropping one image to its prediction row."""
        started = time.monotonic()
        run_as(IMAGE_USER, DROP, str(self.inbox / "clinic" / name), jpeg(seed).hex())
        while not self.screened(f"clinic/{name}"):
            if time.monotonic() - started > timeout:
                return float("nan")
            time.sleep(0.05)
        return time.monotonic() - started

    def log_lines(self) -> int:
        """Lines `up` has logged so far."""
        return self.log_path.read_bytes().count(b"\n")

    def stop(self) -> None:
        """Stop `up` and wait for it."""
        self.engine.dispose()
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=120)
        self.log.close()


def main() -> None:
    """Run the benchmark; print the table and one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--junk", type=int, default=100_000, help="empty files (default 100000)")
    parser.add_argument("--model", type=Path, default=None, help="default: the shipped model")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="melanoscreen-junk-"))
    root.chmod(0o755)
    service = Service(root, args.model)
    try:
        service.time_to_screen("warm-up.jpg", 0)  # the model loaded and traced
        clean = [service.time_to_screen(f"clean-{i}.jpg", 1 + i) for i in range(3)]
        made = time.monotonic()
        run_as(JUNK_USER, EMPTY_FILES, str(service.inbox / "junk"), str(args.junk))
        made = time.monotonic() - made
        busy = service.time_to_screen("behind-junk.jpg", 10)
        # Once the junk is known: the rescans pass it by.
        time.sleep(2 * RESCAN_INTERVAL)
        lines_before, waited = service.log_lines(), time.monotonic()
        time.sleep(3 * RESCAN_INTERVAL)
        rescans = (time.monotonic() - waited) / RESCAN_INTERVAL
        per_rescan = (service.log_lines() - lines_before) / rescans
        settled = [service.time_to_screen(f"after-junk-{i}.jpg", 20 + i) for i in range(3)]
    finally:
        service.stop()
        subprocess.run(["rm", "-rf", str(root)], check=False)
    median = float(np.median(clean))
    print(f"{'inbox':<44}{'time to screen (s)':>20}")
    print(f"{'clean (median of 3)':<44}{median:>20.2f}")
    print(f"{f'{args.junk} empty files, dropped right after':<44}{busy:>20.2f}")
    print(f"{f'{args.junk} empty files, known (median of 3)':<44}{float(np.median(settled)):>20.2f}")
    print(f"log lines per rescan with the junk in place: {per_rescan:.1f}")
    print(json.dumps({"junk_files": args.junk, "junk_made_s": round(made, 2),
                      "clean_s": [round(x, 3) for x in clean],
                      "behind_junk_s": round(busy, 3),
                      "after_junk_s": [round(x, 3) for x in settled],
                      "log_lines_per_rescan": round(per_rescan, 2),
                      "other_users": AS_ROOT}))


if __name__ == "__main__":
    main()
