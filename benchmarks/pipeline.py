"""Pipeline benchmark: images dropped into a running `melanoscreen up`, against a plain loop.

Reports, in one run and on one machine:
- the pipeline: images/s from the first drop to the last prediction row, and drop -> row
  latency p50/p95, for N 180x180 JPEGs and for 1024x768 JPEGs;
- the plain loop on the same files: open, predict, insert and commit, one file at a time
  (with our compiled forward pass, and the textbook loop with keras `model.predict`);
- the model's own batched throughput (decode + forward, batch 64) on the same files.

    python benchmarks/pipeline.py                  # 2000 x 180x180 and 300 x 1024x768
    python benchmarks/pipeline.py --n 200 --large-n 50 --model path/to/model.keras
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy import create_engine, text


def make_images(folder: Path, count: int, size: tuple[int, int], seed: int) -> list[Path]:
    """Distinct synthetic JPEGs: smooth colour fields with noise."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width, height = size
    paths = []
    for i in range(count):
        base = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
        pixels = np.asarray(base.resize((width, height), Image.Resampling.BILINEAR), np.int16)
        pixels = pixels + rng.integers(-12, 12, (height, width, 3))
        out = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
        path = folder / f"bench-{seed}-{i:05d}.jpg"
        path.write_bytes(out.getvalue())
        paths.append(path)
    return paths


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100)."""
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def run_pipeline(data_dir: Path, files: list[Path], prefix: str, timeout: float) -> dict[str, float]:
    """Rename files into the inbox of the running `up`; wait for every row to be final."""
    inbox = data_dir / "inbox" / prefix
    inbox.mkdir(parents=True, exist_ok=True)
    dropped: dict[str, float] = {}
    for path in files:
        dropped[f"{prefix}/{path.name}"] = time.time()
        os.rename(path, inbox / path.name)
    engine = create_engine(f"sqlite:///{data_dir / 'melanoscreen.db'}")
    deadline = time.monotonic() + timeout
    query = text("SELECT source, status, screened_at FROM images WHERE source LIKE :p "
                 "AND status IN ('screened', 'rejected', 'failed')")
    while True:
        with engine.connect() as connection:
            rows = list(connection.execute(query, {"p": f"{prefix}/%"}))
        if len(rows) >= len(files) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    engine.dispose()
    finished = {}
    for source, _status, screened_at in rows:
        when = datetime.fromisoformat(str(screened_at)).replace(tzinfo=UTC).timestamp()
        finished[source] = when
    latencies = [finished[s] - dropped[s] for s in finished if s in dropped]
    span = max(finished.values()) - min(dropped.values()) if finished else float("nan")
    return {"images": len(files), "finished": len(finished),
            "images_per_s": len(finished) / span if span else float("nan"),
            "latency_p50_s": percentile(latencies, 50), "latency_p95_s": percentile(latencies, 95)}


def run_plain_loop(model: Path | None, files: list[Path]) -> dict[str, float]:
    """Open, predict, insert and commit per file: what a script without the pipeline does."""
    from model.inference import Classifier, Prediction

    classifier = Classifier(model)
    classifier.predict(files[:2])  # warm up the compiled forward pass
    with tempfile.TemporaryDirectory() as tmp:
        db = sqlite3.connect(Path(tmp) / "plain.db")
        db.execute("CREATE TABLE predictions (source TEXT, melanoma REAL, probabilities TEXT)")
        started = time.perf_counter()
        for path in files:
            [answer] = classifier.predict([path])
            if isinstance(answer, Prediction):
                db.execute("INSERT INTO predictions VALUES (?, ?, ?)",
                           (path.name, answer.melanoma_probability,
                            json.dumps(answer.probabilities)))
                db.commit()
        elapsed = time.perf_counter() - started
        db.close()
    started = time.perf_counter()
    classifier.predict(files, batch_size=64)
    batched = time.perf_counter() - started
    return {"plain_loop_images_per_s": len(files) / elapsed,
            "keras_loop_images_per_s": run_keras_loop(classifier, files[:100]),
            "model_batched_images_per_s": len(files) / batched}


def run_keras_loop(classifier: Any, files: list[Path]) -> float:
    """The textbook loop: keras.utils.load_img, model.predict on one image, insert, commit."""
    import keras
    import numpy as np

    height, width = classifier.input_size
    classifier.model.predict(np.zeros((1, height, width, 3), np.float32), verbose=0)
    with tempfile.TemporaryDirectory() as tmp:
        db = sqlite3.connect(Path(tmp) / "keras.db")
        db.execute("CREATE TABLE predictions (source TEXT, melanoma REAL, probabilities TEXT)")
        started = time.perf_counter()
        for path in files:
            image = keras.utils.img_to_array(keras.utils.load_img(path, target_size=(height, width)))
            outputs = classifier.model.predict(image[np.newaxis], verbose=0)
            # A model with a scope output answers [probabilities, scope distance].
            probabilities = (outputs[0] if isinstance(outputs, list) else outputs)[0]
            db.execute("INSERT INTO predictions VALUES (?, ?, ?)",
                       (path.name, float(probabilities[3]), json.dumps(probabilities.tolist())))
            db.commit()
        elapsed = time.perf_counter() - started
        db.close()
    return len(files) / elapsed


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_up(data_dir: Path, model: Path | None, concurrency: int) -> subprocess.Popen[bytes]:
    """`melanoscreen up` on a fresh data folder, on ports of its own (so it runs beside a running
    service); returns once its broker answers."""
    env = dict(os.environ, MELANOSCREEN_DATA_DIR=str(data_dir),
               MELANOSCREEN_FLOWER_PORT=str(free_port()), MELANOSCREEN_WEB_PORT=str(free_port()),
               MELANOSCREEN_REDIS_PORT=str(free_port()),
               MELANOSCREEN_WORKER_CONCURRENCY=str(concurrency), TF_CPP_MIN_LOG_LEVEL="2",
               MELANOSCREEN_BATCH_SIZE=os.environ.get("MELANOSCREEN_BATCH_SIZE", "32"),
               MELANOSCREEN_BATCH_DELAY=os.environ.get("MELANOSCREEN_BATCH_DELAY", "0.2"))
    if model is not None:
        env["MELANOSCREEN_MODEL"] = str(model)
    log = open(data_dir.parent / "up.log", "wb")  # noqa: SIM115 - lives as long as `up`
    process = subprocess.Popen([sys.executable, "-m", "melanoscreen", "up"], env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not (data_dir / "broker.url").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"up did not start; see {data_dir.parent / 'up.log'}")
        time.sleep(0.2)
    return process


def main() -> None:
    """Run the benchmark and print one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="180x180 JPEGs")
    parser.add_argument("--large-n", type=int, default=300, help="1024x768 JPEGs")
    parser.add_argument("--plain-n", type=int, default=200, help="files for the plain loop")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--concurrency", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    parser.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args()
    model = args.model or (Path(os.environ["MELANOSCREEN_MODEL"])
                           if os.environ.get("MELANOSCREEN_MODEL") else None)

    report: dict[str, object] = {"cpu_count": os.cpu_count(), "concurrency": args.concurrency}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        small = make_images(root / "staging-small", args.n, (180, 180), seed=1)
        large = make_images(root / "staging-large", args.large_n, (1024, 768), seed=2)
        plain_small = make_images(root / "plain-small", args.plain_n, (180, 180), seed=3)
        plain_large = make_images(root / "plain-large", min(args.plain_n, args.large_n),
                                  (1024, 768), seed=4)
        data_dir = root / "data"
        data_dir.mkdir()
        up = start_up(data_dir, model, args.concurrency)
        try:
            # One image first, so the workers' model load is not counted as throughput.
            warm = make_images(root / "warm", 1, (180, 180), seed=9)
            run_pipeline(data_dir, warm, "warm", args.timeout)
            report["pipeline_180x180"] = run_pipeline(data_dir, small, "small", args.timeout)
            report["pipeline_1024x768"] = run_pipeline(data_dir, large, "large", args.timeout)
        finally:
            up.send_signal(signal.SIGTERM)
            up.wait(timeout=120)
        # The plain loop runs after `up` stopped, so both had the machine to themselves.
        report["plain_180x180"] = run_plain_loop(model, plain_small)
        report["plain_1024x768"] = run_plain_loop(model, plain_large)
    print(json.dumps(report, indent=2))
    for name in ("180x180", "1024x768"):
        pipe = report[f"pipeline_{name}"]
        plain = report[f"plain_{name}"]
        assert isinstance(pipe, dict) and isinstance(plain, dict)
        print(f"{name}: pipeline {pipe['images_per_s']:.1f} img/s (p50 "
              f"{pipe['latency_p50_s']:.2f} s, p95 {pipe['latency_p95_s']:.2f} s), plain loop "
              f"{plain['plain_loop_images_per_s']:.1f} img/s, keras predict loop "
              f"{plain['keras_loop_images_per_s']:.1f} img/s, model batched "
              f"{plain['model_batched_images_per_s']:.1f} img/s", file=sys.stderr)


if __name__ == "__main__":
    main()
