"""Alert benchmark: drop → alert accepted by the SMTP server, in a running `melanoscreen up`.

Starts an aiosmtpd server on loopback and `melanoscreen up` on a fresh data folder with that
server as its SMTP host and threshold 0 (every image is flagged), then drops one 180x180 JPEG at
a time (an atomic rename into the inbox) and times it until the server's DATA handler has the
alert. One warm-up drop first (it pays for the model load and Grad-CAM's first trace) is reported
apart. Prints one JSON object and a summary line: p50, p95 and max over `--runs` drops.

    python benchmarks/alerts.py                       # the shipped model, 20 runs
    python benchmarks/alerts.py --model path/to/model.keras --runs 50

Without the shipped model (a checkout without trained weights) it builds an untrained MelanoNet
of the shipped size (160x160, same layers, same cost per image) and says so.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from email import policy
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import numpy as np
from aiosmtpd.controller import Controller
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


class TimingHandler:
    """aiosmtpd handler noting when each message (by subject) was accepted."""

    def __init__(self) -> None:
        self.accepted: dict[str, float] = {}
        self.lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        """Record the moment of acceptance."""
        now = time.time()
        message = BytesParser(policy=policy.default).parsebytes(envelope.original_content)
        with self.lock:
            self.accepted[str(message["Subject"])] = now
        return "250 OK"

    def wait_for(self, suffix: str, timeout: float) -> float:
        """The acceptance time of the message whose subject ends with `suffix`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                for subject, when in self.accepted.items():
                    if subject.endswith(suffix):
                        return when
            time.sleep(0.005)
        raise TimeoutError(f"no alert for {suffix} within {timeout:.0f} s")


def jpeg(seed: int, size: int = 180) -> bytes:
    """A distinct synthetic JPEG."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    pixels = np.asarray(base.resize((size, size), Image.Resampling.BILINEAR), np.int16)
    pixels = pixels + rng.integers(-12, 12, (size, size, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def stand_in_model(folder: Path) -> Path:
    """An untrained MelanoNet of the shipped size, with a card (built in a child process)."""
    path = folder / "stand-in.keras"
    script = f"""
import os
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from pathlib import Path
from model.architectures import build_melanonet
from model.card import ModelCard, card_path_for
from model.data import ISIC_CLASSES
path = Path({str(path)!r})
build_melanonet((160, 160, 3), len(ISIC_CLASSES)).save(path)
ModelCard(version="untrained-stand-in", architecture="melanonet", classes=list(ISIC_CLASSES),
          input_size=[160, 160], alert_threshold=0.5).write(card_path_for(path))
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO, timeout=600)
    return path


def main() -> None:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per alert")
    args = parser.parse_args()

    from melanoscreen.cli.supervisor import free_port
    from model.card import shipped_model_path

    handler = TimingHandler()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    report: dict[str, Any] = {"runs": args.runs, "cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = args.model or (shipped_model_path() if shipped_model_path().is_file() else None)
        if model is None:
            model = stand_in_model(root)
            report["model"] = "untrained stand-in MelanoNet 160x160 (no shipped model found)"
        else:
            report["model"] = str(model)
        data_dir = root / "data"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MELANOSCREEN_")}
        env.update(MELANOSCREEN_DATA_DIR=str(data_dir), MELANOSCREEN_MODEL=str(model),
                   MELANOSCREEN_ALERT_THRESHOLD="0", MELANOSCREEN_ALERT_RECIPIENTS="oncall@clinic.example",
                   MELANOSCREEN_SMTP_HOST="127.0.0.1", MELANOSCREEN_SMTP_PORT=str(port),
                   MELANOSCREEN_SMTP_SECURITY="none", MELANOSCREEN_WORKER_CONCURRENCY="1",
                   MELANOSCREEN_FLOWER_PORT=str(free_port()), TF_CPP_MIN_LOG_LEVEL="2")
        env.setdefault("MELANOSCREEN_BATCH_DELAY", os.environ.get("MELANOSCREEN_BATCH_DELAY", "0.2"))
        log = open(root / "up.log", "wb")  # noqa: SIM115 - lives as long as `up`
        up = subprocess.Popen([sys.executable, "-m", "melanoscreen", "up"], env=env, stdout=log,
                              stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while not (data_dir / "broker.url").exists():
                if up.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"up did not start: {(root / 'up.log').read_text()[-2000:]}")
                time.sleep(0.2)
            staging = root / "staging"
            staging.mkdir()
            inbox = data_dir / "inbox"

            def drop(name: str, seed: int) -> float:
                path = staging / name
                path.write_bytes(jpeg(seed))
                started = time.time()
                os.rename(path, inbox / name)
                return handler.wait_for(name, args.timeout) - started

            report["cold_first_alert_s"] = round(drop("warm-up.jpg", 0), 3)
            latencies = [drop(f"run-{i:03d}.jpg", i + 1) for i in range(args.runs)]
        finally:
            up.send_signal(signal.SIGTERM)
            up.wait(timeout=120)
            controller.stop()
    values = np.asarray(latencies)
    report.update(p50_s=round(float(np.percentile(values, 50)), 3),
                  p95_s=round(float(np.percentile(values, 95)), 3),
                  max_s=round(float(values.max()), 3), min_s=round(float(values.min()), 3))
    print(json.dumps(report, indent=2))
    print(f"drop -> alert accepted over {args.runs} runs: p50 {report['p50_s']:.2f} s, "
          f"p95 {report['p95_s']:.2f} s, max {report['max_s']:.2f} s (goal: p50 under 2 s)",
          file=sys.stderr)


if __name__ == "__main__":
    main()
