"""Soak benchmark: a steady stream of images into a running `melanoscreen up`, and what every
process of the service holds at the start and at the end (RSS and open descriptors).

Growth between the two samples is what a long run would leak: Flower's task list (bounded by
`--max_tasks`), the watcher's pending map, a pool process's model state, Redis.

    python benchmarks/soak.py                          # 20 minutes at 5 images/s
    python benchmarks/soak.py --minutes 2 --rate 5 --model path/to/model.keras
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def jpeg(rng: np.random.Generator, size: int = 180) -> bytes:
    """A distinct synthetic JPEG: a smooth colour field with noise."""
    base = rng.integers(0, 256, size=(4, 4, 3)).astype(np.uint8)
    field = Image.fromarray(base).resize((size, size), Image.Resampling.BILINEAR)
    pixels = np.asarray(field, dtype=np.int16) + rng.integers(-20, 20, size=(size, size, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def descendants(pid: int) -> list[int]:
    """`pid` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return sorted(found)


def sample(pid: int) -> dict[int, tuple[str, float, int]]:
    """Per process: (what it is, RSS in MiB, open descriptors)."""
    rows = {}
    for each in descendants(pid):
        proc = Path(f"/proc/{each}")
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            rss_kib = next(int(line.split()[1]) for line in (proc / "status").read_text().splitlines()
                           if line.startswith("VmRSS:"))
            fds = len(os.listdir(proc / "fd"))
        except (OSError, StopIteration):
            continue
        words = [w.decode(errors="replace") for w in argv if w]
        name = " ".join(Path(w).name if i == 0 else w for i, w in enumerate(words[:4]))
        rows[each] = (name[:60], rss_kib / 1024, fds)
    return rows


def report(title: str, rows: dict[int, tuple[str, float, int]]) -> None:
    """Print one sample as a table."""
    print(f"\n{title}")
    print(f"{'pid':>8}  {'RSS MiB':>8}  {'fds':>5}  process")
    for pid, (name, rss, fds) in sorted(rows.items()):
        print(f"{pid:>8}  {rss:>8.1f}  {fds:>5}  {name}")


def screened(database: Path) -> int:
    """Images with a final status."""
    with sqlite3.connect(database) as connection:
        return int(connection.execute(
            "SELECT count(*) FROM images WHERE status NOT IN ('queued', 'screening')").fetchone()[0])


def main() -> None:
    """Start `up`, sample, drop images at a steady rate, sample again, stop."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--rate", type=float, default=5.0, help="images per second")
    parser.add_argument("--model", type=Path, default=None)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        data = Path(tmp) / "data"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MELANOSCREEN_")}
        env.update(MELANOSCREEN_DATA_DIR=str(data), TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
        if args.model:
            env["MELANOSCREEN_MODEL"] = str(args.model.absolute())
        log_path = Path(tmp) / "up.log"
        with open(log_path, "wb") as log:
            up = subprocess.Popen([sys.executable, "-m", "melanoscreen", "up"], cwd=tmp, env=env,
                                  stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while "ready in" not in log_path.read_text():
                if up.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"up did not get ready:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.5)
            start = sample(up.pid)
            report("at start", start)
            count, began = 0, time.monotonic()
            end = began + args.minutes * 60
            while time.monotonic() < end:
                (data / "inbox" / f"soak-{count:06d}.jpg").write_bytes(jpeg(rng))
                count += 1
                time.sleep(max(0.0, began + count / args.rate - time.monotonic()))
            drain = time.monotonic() + 120
            while screened(data / "melanoscreen.db") < count and time.monotonic() < drain:
                time.sleep(1)
            final = sample(up.pid)
            report("at end", final)
            print(f"\n{count} images dropped over {args.minutes:g} min, "
                  f"{screened(data / 'melanoscreen.db')} screened")
            grown = [(final[pid][0], final[pid][1] - start[pid][1], final[pid][2] - start[pid][2])
                     for pid in final if pid in start]
            print("growth (RSS MiB, fds) of processes alive throughout:")
            for name, rss, fds in grown:
                print(f"  {rss:+8.1f}  {fds:+5d}  {name}")
        finally:
            up.send_signal(signal.SIGTERM)
            up.wait(timeout=120)


if __name__ == "__main__":
    main()
