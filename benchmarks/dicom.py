"""DICOM benchmark: images sent by C-STORE from a second process to a running `melanoscreen up`,
against the same images dropped into its inbox as JPEG files.

Reports, in one run and on one machine:
- JPEG drop: images/s from the first drop to the last finished row (benchmarks/pipeline.py's
  measure);
- DICOM C-STORE: images/s from the sender's start to the last finished row, the same
  pictures as JPEG-baseline DICOM objects (VL Photographic) sent over one association, one
  object after another, by a sender in its own process: DCMTK's `storescu` where it is
  installed (`apt install dcmtk`; run as a clinic runs it, Nagle's algorithm on), else a
  pynetdicom sender (Python, on the same cores as the service, so it costs the DICOM path
  about 3 ms of the machine per object that a modality would not); every acknowledged object
  must be screened once, with its study UID in `results --format json`;
- the ratio (the DICOM path should keep at least 80% of the JPEG path's throughput), and beside
  it the ratio of the machine's CPU per image (JPEG path over DICOM path, sender included),
  which sets the first where the cores are all busy;
- that an association from an AE title not in MELANOSCREEN_DICOM_PEERS is refused.

    python benchmarks/dicom.py                   # 200 images each way, two alternating rounds
    python benchmarks/dicom.py --n 50 --rounds 1 --model path/to/model.keras
    python benchmarks/dicom.py --sender pynetdicom   # the Python sender even where DCMTK is
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from PIL import Image
from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import free_port, make_images, run_pipeline, start_up

from scheduler.listener import request_association

#: The sender, run as `python -c SENDER PORT FILE...`: one association, one C-STORE per file;
#: prints when the association stands, then the SOP instance UID of each one acknowledged.
SENDER = """
import socket
import sys
import time
from pydicom import dcmread, uid
from pynetdicom import AE
ae = AE(ae_title="MODALITY1")
ae.add_requested_context(uid.VLPhotographicImageStorage, uid.JPEGBaseline8Bit)
assoc = ae.associate("127.0.0.1", int(sys.argv[1]), ae_title="MELANOSCREEN")
assert assoc.is_established, "association refused"
# As DCMTK's storescu does by default: without it each object waits ~40 ms (Nagle's algorithm
# holding the dataset for the delayed ACK of its command).
assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
# Read before the clock starts, as a C sender (DCMTK's storescu) costs next to nothing per file:
# what is timed is the service's side, not this Python sender's parsing.
datasets = [dcmread(name) for name in sys.argv[2:]]
print("started", time.time(), flush=True)
for ds in datasets:
    status = assoc.send_c_store(ds)
    if status and status.Status == 0:
        print(ds.SOPInstanceUID, flush=True)
print("done", time.time(), flush=True)
assoc.release()
"""


def dcmtk_storescu() -> str | None:
    """DCMTK's storescu, where it is installed (pynetdicom installs a Python `storescu` too,
    which is not it)."""
    for folder in [*os.environ.get("PATH", "").split(os.pathsep), "/usr/bin"]:
        candidate = shutil.which("storescu", path=folder)
        if candidate is None:
            continue
        try:
            version = subprocess.run([candidate, "--version"], capture_output=True, text=True,
                                     timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        if "dcmtk" in version.lower():
            return candidate
    return None


def send_with_storescu(storescu: str, port: int, files: list[Path],
                       timeout: float) -> tuple[float, float, set[str]]:
    """(started, finished, names of the files acknowledged with success) of one storescu run
    over one association (as a clinic runs it: its default environment, Nagle's algorithm on)."""
    started = time.time()
    sent = subprocess.run([storescu, "-v", "-aet", "MODALITY1", "-aec", "MELANOSCREEN", "-xy",
                           "127.0.0.1", str(port), *map(str, files)],
                          capture_output=True, text=True, timeout=timeout)
    finished = time.time()
    acknowledged, current = set(), None
    for line in (sent.stdout + sent.stderr).splitlines():
        if match := re.search(r"Sending file: (.+)$", line):
            current = Path(match.group(1).strip()).name
        elif "Received Store Response (Success)" in line and current is not None:
            acknowledged.add(current)
            current = None
    return started, finished, acknowledged


def make_dicom(jpegs: list[Path], folder: Path, study: str) -> list[Path]:
    """Each JPEG as a VL Photographic DICOM object holding the same JPEG codestream."""
    from pydicom import uid
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for jpeg in jpegs:
        with Image.open(jpeg) as picture:
            width, height = picture.size
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = uid.VLPhotographicImageStorage
        meta.MediaStorageSOPInstanceUID = uid.generate_uid()
        meta.TransferSyntaxUID = uid.JPEGBaseline8Bit
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.PatientID, ds.PatientName = "BENCH-1", "Bench^Patient"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, uid.generate_uid()
        ds.Modality = "XC"
        ds.Rows, ds.Columns = height, width
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 3, "YBR_FULL_422"
        ds.PlanarConfiguration = 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit, ds.PixelRepresentation = 7, 0
        ds.PixelData = encapsulate([jpeg.read_bytes()])
        path = folder / f"{jpeg.stem}.dcm"
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        path.write_bytes(out.getvalue())
        paths.append(path)
    return paths


def run_dicom(data_dir: Path, port: int, files: list[Path], study: str,
              timeout: float, storescu: str | None) -> dict[str, object]:
    """Send `files` from a second process; wait until every acknowledged object is final."""
    from pydicom import dcmread

    if storescu is not None:
        uids = {path.name: str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
                for path in files}
        started, sent_at, names = send_with_storescu(storescu, port, files, timeout)
        acknowledged = {uids[name] for name in names}
    else:
        sent = subprocess.run([sys.executable, "-c", SENDER, str(port), *map(str, files)],
                              capture_output=True, text=True, timeout=timeout)
        lines = sent.stdout.split("\n")
        # The clock starts when the association stands (the JPEG drop's starts at the first
        # rename): the Python sender's own start-up (Python, pydicom) is not the service's time.
        started = float(lines[0].split()[1])
        sent_at = float(next(line for line in lines if line.startswith("done")).split()[1])
        acknowledged = {line.strip() for line in lines[1:] if line.strip()
                        and not line.startswith("done")}
    engine = create_engine(f"sqlite:///{data_dir / 'melanoscreen.db'}")
    query = text("SELECT d.sop_instance_uid, i.status, i.screened_at FROM images i "
                 "JOIN dicom_instances d ON d.image_id = i.id WHERE d.study_uid = :s "
                 "AND i.status IN ('screened', 'rejected', 'failed')")
    deadline = time.monotonic() + timeout
    while True:
        with engine.connect() as connection:
            rows = list(connection.execute(query, {"s": study}))
        if len({r[0] for r in rows}) >= len(acknowledged) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    engine.dispose()
    screened = [r for r in rows if r[1] == "screened"]
    # Finished when the last row was (its screened_at, UTC), as the JPEG drop's measure.
    finished = max((datetime.fromisoformat(str(r[2])).replace(tzinfo=UTC).timestamp()
                    for r in screened), default=float("nan"))
    return {"images": len(files), "acknowledged": len(acknowledged),
            "screened": len(screened), "screened_once": len({r[0] for r in screened}) == len(screened),
            "send_seconds": sent_at - started, "last_row_seconds": finished - started,
            "images_per_s": len(screened) / (finished - started) if screened else float("nan")}


def results_with_study(data_dir: Path, study: str) -> int:
    """How many rows of `results --format json` carry this study UID."""
    env = dict(os.environ, MELANOSCREEN_DATA_DIR=str(data_dir))
    out = subprocess.run([sys.executable, "-m", "melanoscreen", "results", "--format", "json"],
                         env=env, capture_output=True, text=True, check=True, timeout=300)
    return sum(1 for row in json.loads(out.stdout) if row["study_uid"] == study)


def tree_cpu(root: int) -> float:
    """CPU seconds (user and system) used so far by process `root` and every descendant alive."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        parents[int(entry.name)] = int(fields[1])
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    total, stack = 0.0, [root]
    while stack:
        pid = stack.pop()
        total += times.get(pid, 0.0)
        stack.extend(child for child, parent in parents.items() if parent == pid)
    return total


def sender_cpu() -> float:
    """CPU seconds used so far by this process's finished children (the senders)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measured(up: int, run: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """`run(*args)`'s figures, with the CPU the service (process `up` and its children) and
    the sender used for it per image: a figure that another job on the machine does not move,
    where images/s does."""
    service, sender = tree_cpu(up), sender_cpu()
    figures = run(*args)
    figures["service_cpu_ms_per_image"] = (tree_cpu(up) - service) * 1000 / figures["images"]
    figures["sender_cpu_ms_per_image"] = (sender_cpu() - sender) * 1000 / figures["images"]
    return figures


def refused(port: int) -> bool:
    """Whether an association from an unlisted AE title is refused."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title="STRANGER")
    ae.add_requested_context(Verification)
    assoc, refused = request_association(ae, "127.0.0.1", port, ae_title="MELANOSCREEN")
    if assoc.is_established:
        assoc.release()
    return refused


def _size(text: str) -> tuple[int, int]:
    """`1024x768` as (1024, 768)."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size like 1024x768: {text!r}") from None
    if not (16 <= width <= 8192 and 16 <= height <= 8192):
        raise argparse.ArgumentTypeError(f"a side out of 16..8192: {text!r}")
    return width, height


def main() -> None:
    """Run the benchmark and print one JSON object; exit 1 below 80% of the JPEG path."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="images each way")
    parser.add_argument("--size", type=_size, default=(180, 180), metavar="WxH",
                        help="the pictures' size (default 180x180, the training images' size: "
                             "the model's cost per image is then at its lowest, so what DICOM "
                             "adds weighs the most)")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--concurrency", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; best kept")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--sender", choices=("auto", "storescu", "pynetdicom"), default="auto",
                        help="DCMTK's storescu (auto: where installed) or a pynetdicom sender")
    args = parser.parse_args()
    storescu = dcmtk_storescu() if args.sender != "pynetdicom" else None
    if args.sender == "storescu" and storescu is None:
        parser.error("--sender storescu: DCMTK's storescu is not installed (apt install dcmtk)")
    model = args.model or (Path(os.environ["MELANOSCREEN_MODEL"])
                           if os.environ.get("MELANOSCREEN_MODEL") else None)
    port = free_port()
    os.environ.update(MELANOSCREEN_DICOM_PORT=str(port), MELANOSCREEN_DICOM_PEERS="MODALITY1")
    report: dict[str, object] = {"cpu_count": os.cpu_count(), "concurrency": args.concurrency,
                                 "sender": "dcmtk storescu" if storescu else "pynetdicom",
                                 "picture_size": "{}x{}".format(*args.size)}
    from pydicom import uid

    jpeg_runs: list[dict[str, Any]] = []
    dicom_runs: list[dict[str, Any]] = []
    studies = [str(uid.generate_uid()) for _ in range(args.rounds)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data_dir = root / "data"
        data_dir.mkdir()
        up = start_up(data_dir, model, args.concurrency)
        try:
            # A burst first, so the model's first batches (TensorFlow traces each new batch
            # size) count against neither path.
            warm = make_images(root / "warm", max(1, args.n // 2), args.size, seed=9)
            run_pipeline(data_dir, warm, "warm", args.timeout)
            # Alternating rounds, the best of each kept: the machine's other load varies.
            for number, study in enumerate(studies):
                jpegs = make_images(root / f"jpeg-{number}", args.n, args.size, seed=10 + number)
                dicoms = make_dicom(make_images(root / f"for-dicom-{number}", args.n, args.size,
                                                seed=20 + number), root / f"dicom-{number}", study)
                jpeg_runs.append(measured(up.pid, run_pipeline, data_dir, jpegs,
                                          f"jpeg-{number}", args.timeout))
                dicom_runs.append(measured(up.pid, run_dicom, data_dir, port, dicoms, study,
                                           args.timeout, storescu))
            report["jpeg_drop"] = jpeg_runs
            report["dicom_c_store"] = dicom_runs
            report["results_with_study_uid"] = min(results_with_study(data_dir, study)
                                                   for study in studies)
            report["unlisted_ae_title_refused"] = refused(port)
        finally:
            up.send_signal(signal.SIGTERM)
            up.wait(timeout=120)
    jpeg_rate = max(float(run["images_per_s"]) for run in jpeg_runs)
    dicom_rate = max(float(run["images_per_s"]) for run in dicom_runs)
    report["dicom_over_jpeg"] = dicom_rate / jpeg_rate if jpeg_rate else float("nan")
    # Where the service keeps the cores busy (two here: the worker's TensorFlow takes both), the
    # ratio is about the machine's CPU per image of each path, sender included; that figure
    # does not move with the machine's other load, where images/s does.
    jpeg_cpu = statistics.median(float(run["service_cpu_ms_per_image"]) for run in jpeg_runs)
    dicom_cpu = statistics.median(float(run["service_cpu_ms_per_image"])
                                  + float(run["sender_cpu_ms_per_image"]) for run in dicom_runs)
    report["cpu_per_image_jpeg_over_dicom"] = jpeg_cpu / dicom_cpu
    print(json.dumps(report, indent=2))
    ok = (report["dicom_over_jpeg"] >= 0.8  # type: ignore[operator]
          and report["unlisted_ae_title_refused"]
          and report["results_with_study_uid"] == args.n)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
