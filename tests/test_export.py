"""Reviewed cases back into training: `melanoscreen export --reviewed DIR` writes a folder per
diagnosis and a CSV (both databases), and training on that folder beside another one records
each folder's counts and fingerprint in the card; `evaluate --data` runs on the export alone."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

from db.accounts import add_user
from db.migrate import upgrade
from db.reviews import add_review
from db.schema import Image, ImageStatus, Prediction, Role, Verdict
from db.session import make_session_factory
from model.data import ISIC_CLASSES, scan_folder
from model.preparation import scan_data
from model.recipe import TrainConfig
from model.train import train

REPO = Path(__file__).resolve().parent.parent
AT = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)


def lesion_png(path: Path, class_index: int, seed: int) -> None:
    """A 40x40 'lesion' coloured by its class, with noise."""
    rng = np.random.default_rng(seed)
    base = np.array([(class_index * 28) % 256, (255 - class_index * 28) % 256,
                     (class_index * 70) % 256], np.float32)
    pixels = np.clip(base + rng.normal(0, 20, (40, 40, 3)), 0, 255).astype(np.uint8)
    PILImage.fromarray(pixels).save(path)


#: (source, verdict, diagnosis) of the reviews, oldest first; the last one of an image counts.
REVIEWS = [
    *[(f"clinic-a/mel-{i}.png", Verdict.REFER, "melanoma") for i in range(4)],
    *[(f"clinic-a/nev-{i}.png", Verdict.BENIGN, "nevus") for i in range(4)],
    ("clinic-b/sus-0.png", Verdict.REFER, None),
    ("clinic-b/sus-1.png", Verdict.REFER, None),
    ("clinic-b/blurred.png", Verdict.NOT_ASSESSABLE, None),
    ("clinic-b/changed.png", Verdict.REFER, None),
    ("clinic-b/changed.png", Verdict.BENIGN, "seborrheic keratosis"),
]


def seed_clinic(database: str, store: Path) -> dict[str, str]:
    """Images in a store with the reviews above, plus one never reviewed; source -> sha256."""
    upgrade(database)
    sessions = make_session_factory(database)
    store.mkdir(parents=True, exist_ok=True)
    shas: dict[str, str] = {}
    with sessions.begin() as s:
        derm = add_user(s, name="derm-a", email="derm-a@clinic.example", role=Role.REVIEWER,
                        password_hash="x", now=AT)
        images: dict[str, Image] = {}
        for n, source in enumerate([*dict.fromkeys(r[0] for r in REVIEWS), "clinic-b/new.png"]):
            sha = uuid.uuid4().hex * 2
            location = store / f"{sha}.png"
            kind = source.split("/")[1].split("-")[0]
            lesion_png(location, ISIC_CLASSES.index("melanoma") if kind == "mel" else n % 9, n)
            image = Image(sha256=sha, source=source, size_bytes=1, location=str(location),
                          status=ImageStatus.SCREENED, received_at=AT, attempts=1, screened_at=AT)
            s.add(image)
            s.flush()
            s.add(Prediction(image_id=image.id, model_version="v-test", threshold=0.3,
                             probabilities={"melanoma": 0.5}, melanoma_probability=0.5,
                             predicted_class="melanoma", flagged=True, seconds=0.01, created_at=AT))
            images[source], shas[source] = image, sha
        for step, (source, verdict, diagnosis) in enumerate(REVIEWS):
            add_review(s, images[source], derm, verdict=verdict, diagnosis=diagnosis, note="",
                       now=AT + timedelta(minutes=step))
    sessions.kw["bind"].dispose()
    return shas


def export(database: str, data_dir: Path, target: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MELANOSCREEN_")}
    env.update(MELANOSCREEN_DATA_DIR=str(data_dir), MELANOSCREEN_DATABASE_URL=database)
    return subprocess.run([sys.executable, "-m", "melanoscreen", "export", "--reviewed", str(target)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_export_writes_a_folder_per_diagnosis_and_a_csv(database_url: str, tmp_path: Path) -> None:
    shas = seed_clinic(database_url, tmp_path / "data" / "store")
    target = tmp_path / "export"
    result = export(database_url, tmp_path / "data", target)
    assert result.returncode == 0, result.stderr
    assert "wrote 11 reviewed image(s)" in result.stdout
    assert "skipped (not_assessable without a diagnosis): 1" in result.stderr
    folders = {p.name: sorted(f.name for f in p.iterdir()) for p in target.iterdir() if p.is_dir()}
    assert {name: len(files) for name, files in folders.items()} == {
        "melanoma": 4, "nevus": 4, "melanoma-suspected": 2, "seborrheic keratosis": 1}
    # The latest review counts: `changed` is a seborrheic keratosis now, not suspected.
    assert f"{shas['clinic-b/changed.png']}.png" in folders["seborrheic keratosis"]
    with (target / "reviewed.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["sha256", "source", "verdict", "diagnosis", "reviewer", "date", "file"]
    by_source = {row["source"]: row for row in rows}
    assert set(by_source) == set(shas) - {"clinic-b/blurred.png", "clinic-b/new.png"}
    assert by_source["clinic-b/sus-0.png"]["verdict"] == "refer"
    assert by_source["clinic-b/sus-0.png"]["diagnosis"] == ""
    assert by_source["clinic-a/mel-0.png"]["reviewer"] == "derm-a"
    assert by_source["clinic-a/mel-0.png"]["file"] == f"melanoma/{shas['clinic-a/mel-0.png']}.png"
    assert datetime.fromisoformat(by_source["clinic-a/mel-0.png"]["date"]) == AT
    # Again: the same folder, nothing doubled.
    assert export(database_url, tmp_path / "data", target).returncode == 0
    assert sum(1 for _ in target.rglob("*.png")) == 11
    # Training skips melanoma-suspected/ unless asked to count it as melanoma.
    assert scan_folder(target).counts()["melanoma"] == 4
    merged, _ = scan_data([target], suspected_as_melanoma=True)
    assert merged.counts()["melanoma"] == 6


def test_training_on_an_isic_folder_and_the_export_records_both_then_evaluates_on_the_export(
        tmp_path: Path) -> None:
    database = f"sqlite:///{tmp_path / 'clinic.db'}"
    seed_clinic(database, tmp_path / "data" / "store")
    exported = tmp_path / "export"
    assert export(database, tmp_path / "data", exported).returncode == 0
    isic = tmp_path / "isic-train"
    for c, name in enumerate(ISIC_CLASSES):
        (isic / name).mkdir(parents=True)
        for i in range(4):
            lesion_png(isic / name / f"{name[:3]}-{i}.png", c, 1000 + 10 * c + i)

    out = tmp_path / "model" / "clinic.keras"
    card = train([isic, exported], out, TrainConfig(arch="melanonet2", members=0, epochs=1, folds=2,
                                                    batch_size=8, input_size=(32, 32), seed=3),
                 report=lambda line: None)
    sources = card.training_set["sources"]
    assert [s["folder"] for s in sources] == ["isic-train", "export"]
    assert sources[0]["unique_images"] == 36
    assert sources[1]["unique_images"] == 9  # the suspected ones skipped
    assert sources[1]["class_counts"]["melanoma"] == 4
    assert sources[1]["fingerprint"] == scan_folder(exported).fingerprint()
    assert card.training_set["unique_images"] == 45
    assert card.training_set["folder"] == "isic-train+export"

    result = subprocess.run([sys.executable, "-m", "melanoscreen", "evaluate", "--data",
                             str(exported), "--model", str(out), "--json"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["n"] == 9  # the clinic's own reviewed images, suspected ones skipped
