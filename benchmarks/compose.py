"""Scale-out benchmark: the compose deployment with 1, 2 and 3 worker containers, same images.

For each worker count: a fresh stack (its own volumes) from the local images, every service
healthy, a warm-up drop, then the same N synthetic images dropped at once into the inbox
volume; timed from the drop to the last prediction row. Prints images/s per worker count, the
ratios to one worker, the watcher's intake rate (the single watcher is the other ceiling) and
the machine's cores.

    python benchmarks/compose.py                    # 600 images, 1 2 3 workers
    python benchmarks/compose.py --n 300 --workers 1 3
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

# The stack driver is shared with tests/test_compose.py; it lives beside that test.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from compose_stack import Stack, build_images, docker_problem, lesion_jpeg, wait_for

#: Seeds of the measured images (the same in every round) and of the warm-up drop.
SEED, WARM_SEED = 5_000_000, 6_000_000


def _rate(stack: Stack, prefix: str, count: int) -> dict[str, float]:
    """Drop `count` images named prefix-*, wait for every prediction, return the timings."""
    files = {f"{prefix}-{i:05d}.jpg": lesion_jpeg(SEED + i) for i in range(count)}
    started = time.monotonic()
    stack.drop(files)
    where = f"source LIKE '{prefix}-%'"
    wait_for(lambda: stack.scalar(f"SELECT count(*) FROM images WHERE {where} AND status = "
                                  "'screened'") == count,
             timeout=1200, interval=0.25, what=f"{count} images screened")
    wall = time.monotonic() - started
    first_in, last_in, last_out = stack.sql(
        f"SELECT min(received_at), max(received_at), max(screened_at) FROM images WHERE {where}")[0]
    received = (_time(last_in) - _time(first_in)) or 1e-3
    return {"wall": wall, "rate": count / wall, "intake_rate": count / received,
            "drain_after_intake": _time(last_out) - _time(last_in)}


def _round(images: dict[str, str], folder: Path, workers: int, count: int) -> dict[str, float]:
    """A fresh stack with `workers` worker containers, warmed up, then timed on the images."""
    stack = Stack(project=f"melanoscreen-bench-{os.getpid()}-{workers}", folder=folder,
                  images=images)
    try:
        took = stack.up(workers=workers)
        # Warm-up: every worker's pool process has loaded the model and run batches.
        warm = 16 * 3 * workers
        stack.drop({f"warm-{i:04d}.jpg": lesion_jpeg(WARM_SEED + i) for i in range(warm)})
        wait_for(lambda: stack.scalar("SELECT count(*) FROM images WHERE status = 'screened'")
                 == warm, timeout=300, what="the warm-up screened")
        return {**_rate(stack, "bench", count), "up": took}
    finally:
        stack.down(volumes=True)


def _time(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def main() -> None:
    """Run the rounds and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=600, help="images per round")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()
    problem = docker_problem()
    if problem:
        sys.exit(f"error: {problem}")
    print("building the local images (cached after the first time) ...", flush=True)
    images = build_images()
    cores = os.cpu_count() or 1
    results: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for workers in args.workers:
            results[workers] = r = _round(images, Path(folder) / str(workers), workers, args.n)
            print(f"{workers} worker container(s): up {r['up']:.0f} s; {args.n} images in "
                  f"{r['wall']:.1f} s = {r['rate']:.1f} images/s (watcher intake "
                  f"{r['intake_rate']:.1f} images/s; last row {r['drain_after_intake']:.1f} s "
                  "after the last intake)", flush=True)
    base = results[min(results)]["rate"]
    print(f"\nmachine: {cores} CPU cores; each worker container runs 1 pool process with "
          f"{cores} TensorFlow threads")
    print("workers  images/s  ratio to 1")
    for workers, r in results.items():
        print(f"{workers:>7}  {r['rate']:>8.1f}  {r['rate'] / base:>10.2f}")
    best = max(results, key=lambda w: results[w]["rate"])
    intake = min(r["intake_rate"] for r in results.values())
    print(f"\nfastest: {best} worker container(s); the watcher took files at >= {intake:.0f} "
          "images/s in every round.")
    print(f"Every container here shares the same {cores} cores, and one worker's TensorFlow "
          "already spreads a batch over all of them: the ceiling is the cores, so more "
          "containers on this host add processes, memory and context switches, not throughput. "
          "On a bigger host (or several), give each worker container its own cores (compose "
          "`cpus:`, MELANOSCREEN_WORKER_CONCURRENCY) and the rate grows with the containers "
          "until the one watcher's intake rate above, or PostgreSQL, is the limit.")

if __name__ == "__main__":
    main()
