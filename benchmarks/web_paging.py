"""Paging the review app's worklist over 100,000 seeded images.

Seeds a fresh database (SQLite in a temporary folder, or `--database-url` for PostgreSQL) with
N images, their predictions (10% flagged) and reviews of a third of the flagged ones, then times
the worklist's queries and the pages over real HTTP (uvicorn on loopback, logged in):

    python benchmarks/web_paging.py [--rows 100000] [--database-url URL]

It prints figures; it is not a timed test.
"""

from __future__ import annotations

import argparse
import functools
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CLASSES = ("actinic keratosis", "basal cell carcinoma", "dermatofibroma", "melanoma", "nevus",
           "pigmented benign keratosis", "seborrheic keratosis", "squamous cell carcinoma",
           "vascular lesion")


def seed(url: str, rows: int) -> None:
    """N images with predictions; 10% flagged, a third of those reviewed."""
    from sqlalchemy import insert

    from db import accounts
    from db.migrate import upgrade
    from db.schema import Image, Prediction, Review, Role
    from db.session import make_session_factory
    from service.accounts import hash_password

    upgrade(url)
    sessions = make_session_factory(url)
    rng = random.Random(7)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    with sessions.begin() as session:
        user = accounts.add_user(session, name="bench", email="bench@clinic.example", role=Role.ADMIN,
                                password_hash=hash_password("bench password"), now=start)
        user_id = user.id
    batch = 5000
    for first in range(0, rows, batch):
        images, predictions, written = [], [], []
        for number in range(first, min(rows, first + batch)):
            p = rng.random() ** 3
            flagged = p >= 0.5
            reviewed = flagged and number % 3 == 0
            when = start + timedelta(minutes=number)
            images.append({
                "id": number + 1, "sha256": f"{number:064x}", "size_bytes": 1000,
                "source": f"clinic-{number % 7}/patient-{number // 7}/lesion{number % 5}.jpg",
                "location": "/nonexistent", "status": "screened", "received_at": when,
                "screened_at": when, "attempts": 1, "melanoma_probability": p, "flagged": flagged,
                "reviewed_at": when if reviewed else None, "needs_review": flagged and not reviewed})
            rest = (1 - p) / 8
            predictions.append({
                "id": number + 1, "image_id": number + 1, "model_version": "bench-1",
                "probabilities": {c: p if c == "melanoma" else rest for c in CLASSES},
                "melanoma_probability": p, "predicted_class": "melanoma" if p > rest else "nevus",
                "threshold": 0.5, "flagged": flagged, "out_of_scope": False, "seconds": 0.01,
                "created_at": when})
            if reviewed:
                written.append({"image_id": number + 1, "reviewer_id": user_id,
                                "prediction_id": number + 1, "verdict": "refer", "note": "",
                                "created_at": when})
        with sessions.begin() as session:
            session.execute(insert(Image), images)
            session.execute(insert(Prediction), predictions)
            if written:
                session.execute(insert(Review), written)
    sessions.kw["bind"].dispose()


def timed(label: str, call: Callable[[], object], repeat: int = 7) -> None:
    """Print the median and max of `repeat` calls (after one warm-up)."""
    call()
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        call()
        times.append(time.perf_counter() - began)
    print(f"  {label:<58} median {1000 * statistics.median(times):7.1f} ms   max "
          f"{1000 * max(times):7.1f} ms")


def main() -> None:
    """Seed, then time the queries and the pages."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="web-paging-"))
    url = args.database_url or f"sqlite:///{folder / 'bench.db'}"
    began = time.perf_counter()
    seed(url, args.rows)
    print(f"seeded {args.rows:,} images into {url.split(':')[0]} in {time.perf_counter() - began:.1f} s")

    import httpx
    import uvicorn
    from sqlalchemy import text

    from db import worklist
    from db.schema import ImageStatus
    from db.session import make_session_factory
    from web.app import create_app
    from web.deps import WebConfig

    sessions = make_session_factory(url)
    where_default = worklist.WorklistFilter()
    print("queries (db.reviews):")
    with sessions() as session:
        if url.startswith("sqlite"):
            plan = session.execute(text(
                "EXPLAIN QUERY PLAN SELECT * FROM images ORDER BY needs_review DESC, "
                "melanoma_probability DESC NULLS LAST, id DESC LIMIT 50")).all()
            print("  plan of the first page:", "; ".join(str(row[-1]) for row in plan))
        for label, where, offset in (
                ("first page (unreviewed flagged first)", where_default, 0),
                ("page 1,000 (offset 49,950)", where_default, 49_950),
                ("last page (offset 99,950)", where_default, max(0, args.rows - 50)),
                ("flagged and not reviewed, first page",
                 worklist.WorklistFilter(flagged=True, reviewed=False), 0),
                ("clinic-3, first page", worklist.WorklistFilter(clinic="clinic-3"), 0),
                ("status screened, received in March, first page", worklist.WorklistFilter(
                    status=ImageStatus.SCREENED, received_from=datetime(2026, 3, 1, tzinfo=UTC),
                    received_before=datetime(2026, 4, 1, tzinfo=UTC)), 0),
                ("name search 'patient-1234/', first page",
                 worklist.WorklistFilter(search="patient-1234/"), 0)):
            timed(label, functools.partial(worklist.worklist, session, where, limit=50,
                                           offset=offset))
        timed("count of all images (the page count)", lambda: worklist.worklist_count(session, where_default))

    config = WebConfig(database_url=url, secret="bench-secret-" + "x" * 40, overlays_dir=folder)
    server = uvicorn.Server(uvicorn.Config(create_app(config), host="127.0.0.1", port=0,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    print("over HTTP (uvicorn, one logged-in client; the whole page rendered):")
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        auth = ("bench", "bench password")
        token = client.get("/login").text.split('name="csrf_token" value="')[1].split('"')[0]
        client.post("/login", data={"name": "bench", "password": "bench password", "csrf_token": token})
        last = max(1, args.rows // 50)
        timed("GET / (worklist, first page)", lambda: client.get("/").raise_for_status())
        timed(f"GET /?page={last // 2}", lambda: client.get(f"/?page={last // 2}").raise_for_status())
        timed(f"GET /?page={last} (the last)", lambda: client.get(f"/?page={last}").raise_for_status())
        timed("GET /?clinic=clinic-3&reviewed=no", lambda: client.get(
            "/?clinic=clinic-3&reviewed=no").raise_for_status())
        timed("GET /api/images?flagged=true&reviewed=false&limit=100 (Basic auth: argon2 per call)",
              lambda: client.get("/api/images?flagged=true&reviewed=false&limit=100",
                                 auth=auth).raise_for_status())
        timed("GET /api/images?limit=100&offset=90000 (session cookie)", lambda: client.get(
            "/api/images?limit=100&offset=90000").raise_for_status())
    server.should_exit = True
    thread.join(10)


if __name__ == "__main__":
    main()
